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

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// torchvision's `IMG_EXTENSIONS`, then DICOM.
pub const EXTENSIONS: [&str; 10] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".dcm",
];

/// Whether a file name ends with one of [`EXTENSIONS`], ignoring case (torchvision's
/// `has_file_allowed_extension`).
pub fn is_image_name(name: &str) -> bool {
    let lower = name.to_lowercase();
    EXTENSIONS.iter().any(|e| lower.ends_with(e))
}

/// Whether `path`'s file name is that of an image or DICOM file.
pub fn is_image_file(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| is_image_name(&n.to_string_lossy()))
}

/// One ImageFolder split: class names in label order, samples in torchvision's order.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    /// Class folder names, sorted; a class's label is its index.
    pub classes: Vec<String>,
    /// Every sample and its class index.
    pub samples: Vec<(PathBuf, usize)>,
    /// Files in the class folders that are not images (another extension).
    pub skipped: Vec<PathBuf>,
    /// Files directly in the root, outside any class folder.
    pub outside: Vec<PathBuf>,
}

impl ImageFolder {
    /// Reads the tree under `root`.
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
        if classes.is_empty() {
            return Err(Error::format(
                root,
                "no class folders (an ImageFolder tree holds one folder of images per class)",
            ));
        }
        let mut samples = Vec::new();
        let mut skipped = Vec::new();
        let mut empty = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let before = samples.len();
            for (_, files) in walk_sorted(&root.join(class))? {
                for f in files {
                    if is_image_file(&f) {
                        samples.push((f, label));
                    } else {
                        skipped.push(f);
                    }
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
            root: root.to_path_buf(),
            classes,
            samples,
            skipped,
            outside,
        })
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
    fn extensions_are_torchvisions_in_any_case() {
        for n in [
            "a.jpg", "a.JPEG", "a.Png", "a.ppm", "a.BMP", "a.pgm", "a.tif", "a.TIFF", "a.webp",
            "a.DcM", ".png",
        ] {
            assert!(is_image_name(n), "{n}");
        }
        for n in ["a.txt", "a.gif", "png", "a.png.bak", "a.dicom", "a.npz"] {
            assert!(!is_image_name(n), "{n}");
        }
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
