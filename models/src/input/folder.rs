//! ImageFolder trees, read by the rules of `torchvision.datasets.ImageFolder` (which upstream's
//! `main_finetune.py` uses), so that a tree gives the same samples and labels in PyTorch,
//! `mae-train` and `mae-run`:
//!
//! - the class folders are the sub-folders of the root (symbolic links followed, hidden ones
//!   included), in sorted order, and a class's label is its index in that order;
//! - a class's samples are found by walking its folder recursively (links followed), the
//!   folders in sorted order of their full path and the files of each folder sorted by name;
//! - a file is a sample when its name ends, case-insensitively, with one of torchvision's
//!   `IMG_EXTENSIONS` or `.dcm` (DICOM);
//! - a class folder without samples is an error.
//!
//! Unlike torchvision, files with other extensions are not dropped silently: they are listed in
//! [`ImageFolder::skipped`] for the tools to report.
//!
//! A tree packed in a zip archive is read in place by the same rules ([`ImageFolder::open_split`]),
//! its folders being those its entries' names imply; it gives the samples and labels of the
//! unzipped tree.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;

use super::archive::{is_zip, Archive};
use super::names::{is_image_file, EXTENSIONS};
use crate::error::{Error, Result};

/// One ImageFolder split: class names in label order, samples in torchvision's order.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// The split's folder; inside a zip archive, the archive's path joined with the folder's
    /// (`data.zip/mednist/train`).
    pub root: PathBuf,
    /// Class folder names, sorted; a class's label is its index.
    pub classes: Vec<String>,
    /// Every sample and its class index. Read a sample's bytes with [`ImageFolder::read`]
    /// (or decode it with [`ImageFolder::load`]), which also reads samples of an archive.
    pub samples: Vec<(PathBuf, usize)>,
    /// Files in the class folders that are not images (another extension; in an archive,
    /// also links).
    pub skipped: Vec<PathBuf>,
    /// Files directly in the root, outside any class folder.
    pub outside: Vec<PathBuf>,
    /// The zip archive the tree is read from, or `None` for a folder on disk.
    pub archive: Option<Arc<Archive>>,
}

/// One class folder's files in torchvision's order, each with whether it is a regular file.
type ClassFiles = Vec<(PathBuf, bool)>;

impl ImageFolder {
    /// Reads the tree under the folder `root`.
    pub fn open(root: &Path) -> Result<Self> {
        let mut classes = Vec::new();
        let mut outside = Vec::new();
        for entry in read_dir_sorted(root)? {
            if entry.is_dir() {
                classes.push(name_of(&entry));
            } else {
                outside.push(entry);
            }
        }
        let mut files = Vec::with_capacity(classes.len());
        for class in &classes {
            let walked = walk_sorted(&root.join(class))?;
            files.push(
                walked
                    .into_iter()
                    .flat_map(|(_, fs)| fs)
                    .map(|f| (f, true))
                    .collect(),
            );
        }
        Self::check(root.to_path_buf(), classes, files, outside, None)
    }

    /// Reads split `split` of the data set at `data`: the folder `data/split`, or, when
    /// `data` is a `.zip` file, the `split/` folder at the top of the archive or inside its
    /// one top folder. Either gives the samples and labels of the unzipped tree.
    pub fn open_split(data: &Path, split: &str) -> Result<Self> {
        if is_zip(data) && !data.is_dir() {
            Self::open_archive(Arc::new(Archive::open(data)?), split)
        } else {
            Self::open(&data.join(split))
        }
    }

    /// Reads split `split` of an open zip archive (see [`ImageFolder::open_split`]).
    pub fn open_archive(archive: Arc<Archive>, split: &str) -> Result<Self> {
        let mut prefix = archive.split_parent(split)?;
        prefix.push(split.to_string());
        let root = archive.entry_path(&prefix);
        // class → (folder below the class's, file name, path, regular file)
        let mut by_class: BTreeMap<&str, Vec<(String, &str, PathBuf, bool)>> = BTreeMap::new();
        let mut outside = Vec::new();
        for e in archive.entries() {
            let Some(rel) = e.parts.strip_prefix(&prefix[..]) else {
                continue;
            };
            let Some((name, folders)) = rel.split_last() else {
                continue;
            };
            if e.is_dir {
                if let Some(class) = rel.first() {
                    by_class.entry(class).or_default();
                }
                continue;
            }
            let Some((class, below)) = folders.split_first() else {
                outside.push((name.as_str(), archive.entry_path(&e.parts)));
                continue;
            };
            let mut folder = class.clone();
            for f in below {
                folder.push('/');
                folder.push_str(f);
            }
            let path = archive.entry_path(&e.parts);
            by_class
                .entry(class)
                .or_default()
                .push((folder, name, path, !e.is_symlink));
        }
        // The order of `sorted(os.walk(class))`: folders by their path, files by name.
        let mut classes = Vec::with_capacity(by_class.len());
        let mut files = Vec::with_capacity(by_class.len());
        for (class, mut fs) in by_class {
            fs.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
            classes.push(class.to_string());
            files.push(
                fs.into_iter()
                    .map(|(_, _, p, regular)| (p, regular))
                    .collect(),
            );
        }
        outside.sort_by(|a, b| a.0.cmp(b.0));
        let outside = outside.into_iter().map(|(_, p)| p).collect();
        Self::check(root, classes, files, outside, Some(archive))
    }

    /// The samples and what was skipped, from the classes' files in order; a tree without
    /// classes, or with a class without images, is an error.
    fn check(
        root: PathBuf,
        classes: Vec<String>,
        files: Vec<ClassFiles>,
        outside: Vec<PathBuf>,
        archive: Option<Arc<Archive>>,
    ) -> Result<Self> {
        if classes.is_empty() {
            return Err(Error::format(
                root,
                "no class folders (an ImageFolder tree holds one folder of images per class)",
            ));
        }
        let mut samples = Vec::new();
        let mut skipped = Vec::new();
        let mut empty = Vec::new();
        for (label, (class, fs)) in classes.iter().zip(files).enumerate() {
            let before = samples.len();
            for (f, regular) in fs {
                if regular && is_image_file(&f) {
                    samples.push((f, label));
                } else {
                    skipped.push(f);
                }
            }
            if samples.len() == before {
                empty.push(class.clone());
            }
        }
        if !empty.is_empty() {
            let s = if empty.len() == 1 { "" } else { "s" };
            return Err(Error::format(
                root,
                format!(
                    "class folder{s} {} hold{} no images (extensions {}, any case)",
                    quoted(&empty),
                    if empty.len() == 1 { "s" } else { "" },
                    EXTENSIONS.join(" ")
                ),
            ));
        }
        Ok(Self {
            root,
            classes,
            samples,
            skipped,
            outside,
            archive,
        })
    }

    /// The bytes of a sample (a path of [`ImageFolder::samples`]): from its file, or from the
    /// archive the tree is read from. Errors name the sample.
    pub fn read(&self, sample: &Path) -> Result<Vec<u8>> {
        match &self.archive {
            Some(a) => a.read(sample),
            None => std::fs::read(sample).map_err(|e| Error::io(sample, e)),
        }
    }

    /// A sample decoded as 8-bit RGB, through the same decoder as any file.
    pub fn load(&self, sample: &Path) -> Result<RgbImage> {
        super::decode::decode(&self.read(sample)?, sample)
    }

    /// What was left out, for the tools to print: `skipped 3 files with other extensions:
    /// a.txt, ...` (and the files outside class folders), or `None` when nothing was.
    pub fn skipped_note(&self) -> Option<String> {
        let mut parts = Vec::new();
        if !self.skipped.is_empty() {
            parts.push(format!(
                "skipped {} with other extensions: {}",
                files(self.skipped.len()),
                self.list(&self.skipped)
            ));
        }
        if !self.outside.is_empty() {
            parts.push(format!(
                "skipped {} outside the class folders: {}",
                files(self.outside.len()),
                self.list(&self.outside)
            ));
        }
        if parts.is_empty() {
            None
        } else {
            Some(format!("{}: {}", self.root.display(), parts.join("; ")))
        }
    }

    /// Up to five paths relative to the root, then how many more.
    fn list(&self, paths: &[PathBuf]) -> String {
        const SHOWN: usize = 5;
        let mut names: Vec<String> = paths
            .iter()
            .take(SHOWN)
            .map(|p| {
                p.strip_prefix(&self.root)
                    .unwrap_or(p)
                    .display()
                    .to_string()
            })
            .collect();
        if paths.len() > SHOWN {
            names.push(format!("and {} more", paths.len() - SHOWN));
        }
        names.join(", ")
    }
}

fn files(n: usize) -> String {
    if n == 1 {
        "1 file".into()
    } else {
        format!("{n} files")
    }
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The entries of `dir`, sorted by name.
fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        out.push(e.map_err(|e| Error::io(dir, e))?.path());
    }
    out.sort_by(|a, b| {
        let key = |p: &Path| p.file_name().map(|n| n.as_encoded_bytes().to_vec());
        key(a).cmp(&key(b))
    });
    Ok(out)
}

/// Python's `sorted(os.walk(dir, followlinks=True))`: every folder under `dir` (itself
/// included) with its files sorted by name, the folders sorted by their full path as a string
/// (so `a/b-c` comes before `a/b/c`). A folder reached twice through links is walked once.
fn walk_sorted(dir: &Path) -> Result<Vec<(Vec<u8>, Vec<PathBuf>)>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(real) = d.canonicalize() {
            if !seen.insert(real) {
                continue;
            }
        }
        let mut files = Vec::new();
        for entry in read_dir_sorted(&d)? {
            if entry.is_dir() {
                stack.push(entry);
            } else {
                files.push(entry);
            }
        }
        out.push((d.as_os_str().as_encoded_bytes().to_vec(), files));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn touch(root: &Path, rel: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    fn rel(f: &ImageFolder) -> Vec<(String, usize)> {
        f.samples
            .iter()
            .map(|(p, l)| (p.strip_prefix(&f.root).unwrap().display().to_string(), *l))
            .collect()
    }

    #[test]
    fn classes_and_samples_in_torchvision_order() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for f in [
            "b/x.png",
            "b/sub/y.png",
            "b/sub-a/z.JPG",
            "b/sub/deep/w.png",
            "a/2.bmp",
            "a/10.bmp",
            "a/notes.txt",
            "B/q.webp",
            "top.png",
        ] {
            touch(r, f);
        }
        let f = ImageFolder::open(r).unwrap();
        assert_eq!(f.classes, ["B", "a", "b"]);
        assert_eq!(
            rel(&f),
            [
                ("B/q.webp".into(), 0),
                ("a/10.bmp".into(), 1),
                ("a/2.bmp".into(), 1),
                ("b/x.png".into(), 2),
                ("b/sub/y.png".into(), 2),
                ("b/sub-a/z.JPG".into(), 2),
                ("b/sub/deep/w.png".into(), 2),
            ]
        );
        let note = f.skipped_note().unwrap();
        assert!(
            note.contains("skipped 1 file with other extensions: a/notes.txt"),
            "{note}"
        );
        assert!(
            note.contains("outside the class folders: top.png"),
            "{note}"
        );
    }

    #[test]
    fn empty_class_folder_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), "ok/a.png");
        touch(dir.path(), "empty/readme.txt");
        let err = ImageFolder::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("class folder 'empty' holds no images"),
            "{err}"
        );
        let none = tempfile::tempdir().unwrap();
        let err = ImageFolder::open(none.path()).unwrap_err().to_string();
        assert!(err.contains("no class folders"), "{err}");
        let err = ImageFolder::open(&none.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn skipped_list_is_shortened() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), "c/a.png");
        for i in 0..8 {
            touch(dir.path(), &format!("c/{i}.txt"));
        }
        let note = ImageFolder::open(dir.path())
            .unwrap()
            .skipped_note()
            .unwrap();
        assert!(note.contains("skipped 8 files"), "{note}");
        assert!(note.ends_with("and 3 more"), "{note}");
    }
}
