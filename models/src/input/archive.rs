//! Zip archives of images, read in place: an ImageFolder tree packed in a `.zip` (as MedNIST is
//! distributed) gives the same samples as the unzipped tree, without unzipping it.
//!
//! An entry is named by a path below the archive's own, `data.zip/mednist/train/CXR/1.jpeg`,
//! which is how errors and reports name it. Entries are read concurrently: every read clones
//! the parsed central directory (shared, not copied) with its own position in the file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use zip::ZipArchive;

use crate::error::{Error, Result};

/// The largest entry read, in bytes; an image file is far smaller, and the limit keeps a
/// damaged or hostile archive from declaring gigabytes.
const MAX_ENTRY_BYTES: u64 = 1 << 30;

/// Folders that archivers add beside the content (macOS's resource forks); never part of a tree.
const FOREIGN_TOPS: [&str; 1] = ["__MACOSX"];

/// Whether `path` names a zip archive (`.zip`, any case).
pub fn is_zip(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"))
}

/// One entry of the archive, by its normalised name.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The name's components, without empty and `.` ones.
    pub(crate) parts: Vec<String>,
    pub(crate) is_dir: bool,
    pub(crate) is_symlink: bool,
}

/// A zip archive opened for reading its entries in place.
#[derive(Debug, Clone)]
pub struct Archive {
    path: PathBuf,
    zip: ZipArchive<SharedFile>,
    entries: Arc<Vec<Entry>>,
    /// Entry index by path below the archive's ([`Archive::entry_path`]).
    index: Arc<HashMap<PathBuf, usize>>,
}

impl Archive {
    /// Opens the archive at `path` and reads its central directory; a damaged or truncated
    /// file is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let reader = SharedFile {
            file: Arc::new(file),
            pos: 0,
            len,
        };
        let zip = ZipArchive::new(reader).map_err(|e| {
            Error::format(
                path,
                format!("not a readable zip archive (damaged or truncated?): {e}"),
            )
        })?;
        let mut entries = Vec::with_capacity(zip.len());
        let mut index = HashMap::with_capacity(zip.len());
        for i in 0..zip.len() {
            let data = zip
                .by_index_data(i)
                .map_err(|e| Error::format(path, format!("entry {i}: {e}")))?;
            let name = data
                .name()
                .map_err(|e| Error::format(path, format!("entry {i}: {e}")))?;
            let parts: Vec<String> = name
                .split('/')
                .filter(|p| !p.is_empty() && *p != ".")
                .map(str::to_string)
                .collect();
            // A name climbing out of the archive names nothing in a tree.
            if parts.is_empty() || parts.iter().any(|p| p == "..") {
                continue;
            }
            index.insert(join(path, &parts), i);
            entries.push(Entry {
                parts,
                is_dir: data.is_dir(),
                is_symlink: data.is_symlink(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            zip,
            entries: Arc::new(entries),
            index: Arc::new(index),
        })
    }

    /// The archive's own path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The path naming the entry `parts` (the archive's path joined with them).
    pub(crate) fn entry_path(&self, parts: &[String]) -> PathBuf {
        join(&self.path, parts)
    }

    /// The folder of the archive that holds `split/`: its top, or its one top folder (as
    /// `mednist.zip` holds `mednist/train/...`). Returns the folder's components.
    pub fn split_parent(&self, split: &str) -> Result<Vec<String>> {
        let has = |prefix: &[&str]| {
            self.entries.iter().any(|e| {
                e.parts.len() > prefix.len() && e.parts.iter().zip(prefix).all(|(a, b)| a == b)
            })
        };
        if has(&[split]) {
            return Ok(Vec::new());
        }
        let mut tops: Vec<&str> = self
            .entries
            .iter()
            .map(|e| e.parts[0].as_str())
            .filter(|t| !FOREIGN_TOPS.contains(t))
            .collect();
        tops.sort_unstable();
        tops.dedup();
        if let [top] = tops[..] {
            if has(&[top, split]) {
                return Ok(vec![top.to_string()]);
            }
        }
        Err(Error::Missing {
            path: self.path.clone(),
            what: format!(
                "a '{split}/' folder (looked at the top of the archive and inside its one top \
                 folder; the top holds {})",
                if tops.is_empty() {
                    "nothing".to_string()
                } else {
                    tops.iter()
                        .take(5)
                        .map(|t| format!("'{t}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        })
    }

    /// Every image or DICOM entry (by torchvision's extensions), in path order.
    pub fn image_paths(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self
            .entries
            .iter()
            .filter(|e| !e.is_dir && !e.is_symlink)
            .filter(|e| {
                e.parts
                    .last()
                    .is_some_and(|n| super::names::is_image_name(n))
            })
            .map(|e| self.entry_path(&e.parts))
            .collect();
        out.sort();
        out
    }

    /// The bytes of the entry at `path` (a path below the archive's, as the archive's
    /// listings give them); errors name that path.
    pub fn read(&self, path: &Path) -> Result<Vec<u8>> {
        let &i = self.index.get(path).ok_or_else(|| Error::Missing {
            path: self.path.clone(),
            what: format!("entry '{}'", path.display()),
        })?;
        let fail = |e: &dyn std::fmt::Display| {
            Error::format(path, format!("cannot read it from the zip archive: {e}"))
        };
        let mut zip = self.zip.clone();
        let entry = zip.by_index(i).map_err(|e| fail(&e))?;
        if entry.size() > MAX_ENTRY_BYTES {
            return Err(Error::format(
                path,
                format!(
                    "the entry declares {} bytes, more than the {MAX_ENTRY_BYTES} accepted",
                    entry.size()
                ),
            ));
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        // The CRC is checked as the end of the entry is read: damage is an error here.
        entry
            .take(MAX_ENTRY_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| fail(&e))?;
        Ok(bytes)
    }

    /// Reads and decodes the image or DICOM entry at `path` as 8-bit RGB, through the same
    /// decoder as files.
    pub fn load(&self, path: &Path) -> Result<RgbImage> {
        super::decode::decode(&self.read(path)?, path)
    }
}

fn join(root: &Path, parts: &[String]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(parts);
    p
}

/// A file read at positions of its own, so that clones read the same file concurrently (each
/// read is one positioned read, without moving a shared cursor).
#[derive(Debug, Clone)]
struct SharedFile {
    file: Arc<File>,
    pos: u64,
    len: u64,
}

impl Read for SharedFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = read_at(&self.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SharedFile {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let (base, delta) = match to {
            SeekFrom::Start(n) => {
                self.pos = n;
                return Ok(n);
            }
            SeekFrom::End(d) => (self.len, d),
            SeekFrom::Current(d) => (self.pos, d),
        };
        self.pos = base.checked_add_signed(delta).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of the file",
            )
        })?;
        Ok(self.pos)
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, pos)
}

#[cfg(windows)]
fn read_at(file: &File, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, pos)
}
