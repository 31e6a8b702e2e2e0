//! Atomic publication of one or more files: they are written and synced in a hidden staging
//! folder beside the destination, checked there under their final names (an `.onnx` file finds
//! its external data by name), then renamed into place, data files first and the `.onnx` file
//! last. Anything that fails before that, or a panic, removes the staging folder: a failed
//! export leaves nothing behind.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// A staging folder for files that will appear beside `dest`.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    dest_dir: PathBuf,
    files: Vec<String>,
    committed: bool,
}

impl Staging {
    /// Creates the staging folder in the destination's folder, which must exist.
    pub fn new(dest: &Path) -> anyhow::Result<Self> {
        let dest_dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dest_dir.is_dir() {
            bail!(
                "cannot write {}: folder {} does not exist",
                dest.display(),
                dest_dir.display()
            );
        }
        let name = file_name(dest)?;
        let dir = dest_dir.join(format!(".{name}.{}.staging", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            dir,
            dest_dir,
            files: Vec::new(),
            committed: false,
        })
    }

    /// Where file `name` lives until [`Staging::commit`].
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes staged file `name` through a buffered writer and syncs it. Files are published in
    /// the order they were written.
    pub fn write_with(
        &mut self,
        name: &str,
        fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        let path = self.path(name);
        let result = File::create(&path).and_then(|f| {
            let mut w = BufWriter::with_capacity(1 << 20, f);
            fill(&mut w)?;
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()
        });
        result.with_context(|| format!("cannot write {}", path.display()))?;
        self.files.push(name.to_string());
        Ok(())
    }

    /// Renames every staged file into the destination folder and removes the staging folder.
    pub fn commit(mut self) -> anyhow::Result<()> {
        for name in &self.files {
            let to = self.dest_dir.join(name);
            std::fs::rename(self.dir.join(name), &to)
                .with_context(|| format!("cannot move the export to {}", to.display()))?;
        }
        self.committed = true;
        std::fs::remove_dir(&self.dir)
            .with_context(|| format!("cannot remove {}", self.dir.display()))?;
        if let Ok(d) = File::open(&self.dest_dir) {
            // Makes the renames durable; not every platform can sync a folder.
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The last component of `path`, which must name a file.
pub fn file_name(path: &Path) -> anyhow::Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} does not name a file", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    #[test]
    fn commit_publishes_and_drop_cleans() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m.onnx");
        let mut s = Staging::new(&dest).unwrap();
        s.write_with("m.onnx.data", |w| w.write_all(b"data"))
            .unwrap();
        s.write_with("m.onnx", |w| w.write_all(b"model")).unwrap();
        assert!(!dest.exists());
        s.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"model");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

        let other = dir.path().join("n.onnx");
        let mut s = Staging::new(&other).unwrap();
        s.write_with("n.onnx", |w| w.write_all(b"x")).unwrap();
        drop(s);
        assert!(!other.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn missing_folder_is_named() {
        let err = Staging::new(Path::new("/nonexistent-mae/x.onnx"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent-mae"), "{err}");
    }
}
