//! Files on disk that must never be half there: [`write_atomic`] (a temporary file in the same
//! folder, written, fsynced, renamed, the folder fsynced), and the spool of received instances
//! (`SPOOL/incoming/`), which the node answers Success for only once the instance is in it.
//!
//! Layout under `--dicom-spool DIR`: `incoming/` (received, not yet classified), `failed/`
//! (instances that could not be classified, each with a `.reason.txt`), `outbox/` (results
//! waiting to be sent, `queue.rs`).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use anyhow::Context;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `dir/name` atomically and durably: into a hidden temporary file of the
/// same folder, fsynced, renamed over `name`, and the folder fsynced, so that after a crash
/// `name` is either absent or whole.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.part", std::process::id()));
    let out = dir.join(name);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &out)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| out)
}

/// Fsyncs a folder, so that a rename or removal in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes the temporary files a crash left in `dir` (those [`write_atomic`] names).
pub fn clear_partial(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".part") {
            fs::remove_file(entry.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// The `.dcm` files of `dir`, oldest first.
pub fn dicom_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<(SystemTime, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "dcm") && entry.file_type()?.is_file() {
            let t = entry
                .metadata()?
                .modified()
                .unwrap_or(SystemTime::UNIX_EPOCH);
            files.push((t, path));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// The spool of received instances.
#[derive(Debug)]
pub struct Spool {
    pub dir: PathBuf,
    incoming: PathBuf,
    failed: PathBuf,
}

impl Spool {
    /// Opens (creating) the spool at `dir` and clears what a crash left half-written.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let spool = Self {
            dir: dir.to_path_buf(),
            incoming: dir.join("incoming"),
            failed: dir.join("failed"),
        };
        for d in [&spool.incoming, &spool.failed, &dir.join("outbox")] {
            fs::create_dir_all(d)
                .with_context(|| format!("cannot create the spool folder {}", d.display()))?;
        }
        let cleared = clear_partial(&spool.incoming)
            .with_context(|| format!("cannot read {}", spool.incoming.display()))?;
        if cleared > 0 {
            tracing::warn!(
                "spool {}: removed {cleared} partly received instance(s) left by a crash \
                 (never acknowledged)",
                dir.display()
            );
        }
        Ok(spool)
    }

    /// Keeps a received instance (a whole DICOM file) durably as `incoming/UID.dcm`.
    pub fn put(&self, sop_instance: &str, file: &[u8]) -> io::Result<PathBuf> {
        write_atomic(&self.incoming, &format!("{sop_instance}.dcm"), file)
    }

    /// The received instances not yet classified, oldest first.
    pub fn pending(&self) -> anyhow::Result<Vec<PathBuf>> {
        dicom_files(&self.incoming)
            .with_context(|| format!("cannot read the spool {}", self.incoming.display()))
    }

    /// Forgets an instance whose results are safe (written or queued).
    pub fn done(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)?;
        sync_dir(&self.incoming)
    }

    /// Moves an instance that cannot be classified to `failed/`, with the reason beside it.
    pub fn fail(&self, path: &Path, reason: &str) -> io::Result<PathBuf> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        write_atomic(
            &self.failed,
            &format!("{name}.reason.txt"),
            format!("{reason}\n").as_bytes(),
        )?;
        let to = self.failed.join(&*name);
        fs::rename(path, &to)?;
        sync_dir(&self.incoming)?;
        sync_dir(&self.failed)?;
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn spool_keeps_whole_files_and_clears_partial_ones() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let p = spool.put("1.2.3", b"abc").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"abc");
        // A crash between write and rename leaves a hidden part, never a .dcm.
        fs::write(dir.path().join("incoming/.1.2.4.dcm.1.0.part"), b"ab").unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.pending().unwrap(), vec![p.clone()]);
        let failed = spool.fail(&p, "bad").unwrap();
        assert!(failed.exists() && spool.pending().unwrap().is_empty());
        let reason = dir.path().join("failed/1.2.3.dcm.reason.txt");
        assert_eq!(fs::read_to_string(reason).unwrap(), "bad\n");
    }
}
