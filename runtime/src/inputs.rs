//! Inputs of `predict`, `eval` and `calibrate`: image files, folders (recursive), DICOM files and
//! MedMNIST `.npz` splits, decoded and preprocessed on a background thread while the model runs.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use anyhow::{bail, Context};
use image::RgbImage;
use mae_models::imaging::preprocess_eval;
use mae_models::input::ImageFolder;
use mae_models::preprocess::PreprocessSpec;

/// Lowercase hex SHA-256, as every output names inputs and models by it.
pub use mae_models::digest::sha256_hex;

/// Whether a file met while walking a folder is an input: an image or DICOM file by the
/// shared extension list (`mae_models::input::EXTENSIONS`), a `.dicom` file or an `.npz` file.
fn is_input_name(name: &str) -> bool {
    let lower = name.to_lowercase();
    mae_models::input::is_image_name(name) || lower.ends_with(".dicom") || lower.ends_with(".npz")
}

/// One image to run.
#[derive(Debug, Clone)]
pub struct Item {
    /// The file, or `file.npz:split[i]`.
    pub name: String,
    pub source: Source,
    /// The label(s) when known (`.npz` splits, class folders).
    pub label: Option<Vec<i64>>,
}

/// Where an item's pixels come from.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    /// One frame (from 0) of a DICOM file.
    Frame(PathBuf, u32),
    Image(Arc<RgbImage>),
    /// A file inside a zip archive (its path: the archive's joined with the member's).
    Archived(Arc<mae_models::input::Archive>, PathBuf),
}

/// Which frames of multi-frame DICOM files are read (`--frame`). Without the option, the first
/// frame, under the file's own name; with it, items are named `FILE#N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frames {
    /// Frame N of every DICOM file.
    One(u32),
    /// Every frame, each its own item.
    All,
}

impl std::str::FromStr for Frames {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("all") {
            return Ok(Frames::All);
        }
        s.parse()
            .map(Frames::One)
            .map_err(|_| format!("`{s}` is neither a frame number (from 0) nor `all`"))
    }
}

/// `FILE#N` as a DICOM file and a frame, when FILE exists and `FILE#N` does not.
fn frame_suffix(input: &Path) -> Option<(PathBuf, u32)> {
    let text = input.to_str()?;
    let (file, n) = text.rsplit_once('#')?;
    let n = n.parse().ok()?;
    let file = PathBuf::from(file);
    (!input.exists() && file.is_file()).then_some((file, n))
}

/// Whether the file is DICOM, by its `DICM` magic or its name.
fn is_dicom_file(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    let magic = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && mae_models::input::dicom::is_dicom(&head);
    magic || mae_models::input::is_dicom_name(path)
}

/// Applies `--frame` to listed items: DICOM files become the frame asked for, or one item per
/// frame (their labels kept); other items are left as they are. A DICOM file whose frames
/// cannot be counted is a failure.
pub fn with_frames(items: Vec<Item>, frames: Option<Frames>) -> (Vec<Item>, Vec<Failure>) {
    let Some(frames) = frames else {
        return (items, Vec::new());
    };
    let mut out = Vec::with_capacity(items.len());
    let mut failures = Vec::new();
    for item in items {
        let Source::File(path) = &item.source else {
            out.push(item);
            continue;
        };
        if !is_dicom_file(path) {
            out.push(item);
            continue;
        }
        let numbers: Vec<u32> = match frames {
            Frames::One(n) => vec![n],
            Frames::All => match std::fs::read(path)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(mae_models::input::dicom::frame_count(&b, path)?))
            {
                Ok(count) => (0..count).collect(),
                Err(e) => {
                    failures.push(Failure::new(item.name.clone(), &e));
                    continue;
                }
            },
        };
        out.extend(numbers.into_iter().map(|k| Item {
            name: format!("{}#{k}", item.name),
            source: Source::Frame(path.clone(), k),
            label: item.label.clone(),
        }));
    }
    (out, failures)
}

/// An input that could not be read, by name.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub input: String,
    pub error: String,
}

impl Failure {
    /// The failure of `input` with `error`, whose text leaves out the input's name when the
    /// error starts with it (errors of the input layer name their file), so that
    /// `input: error` names the file once.
    pub fn new(input: impl Into<String>, error: &anyhow::Error) -> Self {
        let input = input.into();
        let text = format!("{error:#}");
        let error = text
            .strip_prefix(&format!("{input}: "))
            .map_or_else(|| text.clone(), str::to_string);
        Self { input, error }
    }
}

/// Expands `inputs` (files, `FILE.dcm#N` frames, folders walked recursively in name order,
/// `.npz` files read at `split`) into items, DICOM files at `frames`; what cannot be listed or
/// read is returned as failures.
pub fn collect(
    inputs: &[PathBuf],
    split: &str,
    frames: Option<Frames>,
) -> (Vec<Item>, Vec<Failure>) {
    let mut items = Vec::new();
    let mut failures = Vec::new();
    for input in inputs {
        let fail = |e: String| Failure {
            input: input.display().to_string(),
            error: e,
        };
        if let Some((file, n)) = frame_suffix(input) {
            items.push(Item {
                name: input.display().to_string(),
                source: Source::Frame(file, n),
                label: None,
            });
            continue;
        }
        let mut listed = Vec::new();
        match std::fs::metadata(input) {
            Err(e) => failures.push(fail(format!("cannot read: {e}"))),
            Ok(m) if m.is_dir() => {
                let mut files = Vec::new();
                walk(input, &mut files, &mut failures);
                files.sort();
                for f in files {
                    push_file(&f, split, &mut listed, &mut failures);
                }
            }
            Ok(_) => push_file(input, split, &mut listed, &mut failures),
        }
        let (listed, unreadable) = with_frames(listed, frames);
        items.extend(listed);
        failures.extend(unreadable);
    }
    (items, failures)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, failures: &mut Vec<Failure>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            failures.push(Failure {
                input: dir.display().to_string(),
                error: format!("cannot list folder: {e}"),
            });
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if hidden {
            continue;
        }
        match entry.file_type() {
            Ok(t) if t.is_dir() => walk(&path, files, failures),
            Ok(_) => {
                if is_input_name(&entry.file_name().to_string_lossy()) {
                    files.push(path);
                }
            }
            Err(_) => {}
        }
    }
}

fn is_npz(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
}

fn push_file(path: &Path, split: &str, items: &mut Vec<Item>, failures: &mut Vec<Failure>) {
    if !is_npz(path) {
        items.push(Item {
            name: path.display().to_string(),
            source: Source::File(path.to_path_buf()),
            label: None,
        });
        return;
    }
    match mae_models::npz::read_split(path, split) {
        Ok(s) => {
            for (i, (img, label)) in s.images.into_iter().zip(s.labels).enumerate() {
                items.push(Item {
                    name: format!("{}:{split}[{i}]", path.display()),
                    source: Source::Image(Arc::new(img)),
                    label: Some(label),
                });
            }
        }
        Err(e) => failures.push(Failure::new(path.display().to_string(), &e.into())),
    }
}

/// Decodes image or DICOM bytes to RGB through the shared input layer; errors name `name`.
pub fn decode_bytes(bytes: &[u8], name: &Path) -> anyhow::Result<RgbImage> {
    Ok(mae_models::input::decode(bytes, name)?)
}

/// Reads and decodes one item; also returns the SHA-256 of its bytes (of its file for a frame,
/// of its raw RGB pixels for `.npz` items), for audit logs.
pub fn load(item: &Item) -> anyhow::Result<(RgbImage, String)> {
    match &item.source {
        Source::Image(img) => Ok(((**img).clone(), sha256_hex(img.as_raw()))),
        Source::File(p) => {
            let bytes =
                std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()))?;
            Ok((decode_bytes(&bytes, p)?, sha256_hex(&bytes)))
        }
        Source::Frame(p, k) => {
            let bytes =
                std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()))?;
            let img = mae_models::input::dicom::decode_frame(&bytes, p, *k)?;
            Ok((img, sha256_hex(&bytes)))
        }
        Source::Archived(archive, p) => {
            let bytes = archive.read(p)?;
            Ok((decode_bytes(&bytes, p)?, sha256_hex(&bytes)))
        }
    }
}

/// A batch ready for the model: the items, their preprocessed pixels (the failed ones left
/// out) and the failures.
#[derive(Debug, Default)]
pub struct Batch {
    /// Items whose pixels are in `pixels`, in order.
    pub items: Vec<Item>,
    /// SHA-256 of each item's input bytes.
    pub sha256: Vec<String>,
    pub pixels: Vec<f32>,
    pub failures: Vec<Failure>,
}

/// Decodes and preprocesses `items` on `workers` background threads, in order, in batches of
/// `batch_size`; the model runs on the caller's thread meanwhile.
pub fn pipeline(
    items: Vec<Item>,
    spec: PreprocessSpec,
    batch_size: usize,
    workers: usize,
) -> Receiver<Batch> {
    let (tx, rx) = sync_channel::<Batch>(2);
    let batch_size = batch_size.max(1);
    std::thread::spawn(move || {
        for chunk in items.chunks(batch_size) {
            let results: Vec<anyhow::Result<(Vec<f32>, String)>> =
                parallel_map(chunk, workers, |item| {
                    load(item).map(|(img, sha)| (preprocess_eval(&img, &spec), sha))
                });
            let mut batch = Batch::default();
            for (item, r) in chunk.iter().zip(results) {
                match r {
                    Ok((px, sha)) => {
                        batch.pixels.extend(px);
                        batch.sha256.push(sha);
                        batch.items.push(item.clone());
                    }
                    Err(e) => batch.failures.push(Failure::new(item.name.clone(), &e)),
                }
            }
            if tx.send(batch).is_err() {
                return;
            }
        }
    });
    rx
}

/// `f` over `xs` on up to `workers` scoped threads, results in order.
fn parallel_map<T: Sync, R: Send>(xs: &[T], workers: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = workers.clamp(1, xs.len().max(1));
    if workers == 1 {
        return xs.iter().map(f).collect();
    }
    let per = xs.len().div_ceil(workers);
    std::thread::scope(|s| {
        let handles: Vec<_> = xs
            .chunks(per)
            .map(|c| s.spawn(|| c.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// Labelled samples of a data set: `.npz` split, an ImageFolder root whose `<split>/` holds the
/// class folders (as `mae-train eval --data-path ROOT --split test` reads it), a `.zip` of such
/// a root (read in place, as `mae-train` reads it), or class folders.
///
/// Class folders are read by the shared ImageFolder rules (torchvision's) and labelled by the
/// model's class names: a folder the model does not name is an error. A model without class
/// names takes the folders in sorted order, with a note.
pub fn labelled_items(
    path: &Path,
    split: &str,
    class_names: &[String],
) -> anyhow::Result<Vec<Item>> {
    let split_dir = path.join(split);
    let path = if path.is_dir() && split_dir.is_dir() {
        split_dir.as_path()
    } else {
        path
    };
    let zipped = mae_models::input::is_zip(path) && !path.is_dir();
    if path.is_dir() || zipped {
        let folder = if zipped {
            ImageFolder::open_split(path, split)?
        } else {
            ImageFolder::open(path)?
        };
        if let Some(note) = folder.skipped_note() {
            eprintln!("mae-run: {note}");
        }
        let labels = folder_labels(&folder.root, &folder.classes, class_names)?;
        let archive = folder.archive.clone();
        Ok(folder
            .samples
            .into_iter()
            .map(|(file, k)| Item {
                name: file.display().to_string(),
                source: match &archive {
                    Some(a) => Source::Archived(a.clone(), file),
                    None => Source::File(file),
                },
                label: Some(vec![labels[k] as i64]),
            })
            .collect())
    } else {
        let split_data = mae_models::npz::read_split(path, split)?;
        Ok(split_data
            .images
            .into_iter()
            .zip(split_data.labels)
            .enumerate()
            .map(|(i, (img, label))| Item {
                name: format!("{}:{split}[{i}]", path.display()),
                source: Source::Image(std::sync::Arc::new(img)),
                label: Some(label),
            })
            .collect())
    }
}

/// The model's class index of each class folder (in the folders' sorted order).
fn folder_labels(
    root: &Path,
    folders: &[String],
    class_names: &[String],
) -> anyhow::Result<Vec<usize>> {
    if class_names.is_empty() {
        eprintln!(
            "mae-run: note: the model does not name its classes; the class folders of {} are \
             taken in sorted order as classes 0..{}: {}",
            root.display(),
            folders.len(),
            folders.join(", ")
        );
        return Ok((0..folders.len()).collect());
    }
    let unknown: Vec<&String> = folders
        .iter()
        .filter(|f| !class_names.contains(f))
        .collect();
    if !unknown.is_empty() {
        let list: Vec<String> = unknown.iter().map(|f| format!("'{f}'")).collect();
        bail!(
            "{}: class folder{} {} {} not among the model's classes ({})",
            root.display(),
            if unknown.len() == 1 { "" } else { "s" },
            list.join(", "),
            if unknown.len() == 1 { "is" } else { "are" },
            class_names.join(", ")
        );
    }
    Ok(folders
        .iter()
        .filter_map(|f| class_names.iter().position(|c| c == f))
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn walks_folders_in_order_and_reports_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("b/c")).unwrap();
        for f in [
            "b/c/2.png",
            "a.jpg",
            "b/1.dcm",
            "notes.txt",
            ".hidden.png",
            "c.WEBP",
            "d.ppm",
        ] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let missing = dir.path().join("missing.png");
        let (items, failures) = collect(&[dir.path().to_path_buf(), missing], "test", None);
        let names: Vec<String> = items
            .iter()
            .map(|i| {
                Path::new(&i.name)
                    .strip_prefix(dir.path())
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["a.jpg", "b/1.dcm", "b/c/2.png", "c.WEBP", "d.ppm"]);
        assert_eq!(failures.len(), 1);
        assert!(failures[0].input.ends_with("missing.png"));
    }

    #[test]
    fn failures_name_the_input_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.dcm");
        std::fs::write(&path, b"not dicom").unwrap();
        let item = Item {
            name: path.display().to_string(),
            source: Source::File(path),
            label: None,
        };
        let f = Failure::new(item.name.clone(), &load(&item).unwrap_err());
        assert!(
            f.error.starts_with("cannot read DICOM image"),
            "{}",
            f.error
        );
        assert!(!f.error.contains("x.dcm"), "{}", f.error);
    }

    #[test]
    fn parallel_map_keeps_order() {
        let xs: Vec<u32> = (0..37).collect();
        assert_eq!(
            parallel_map(&xs, 4, |x| x * 2),
            xs.iter().map(|x| x * 2).collect::<Vec<_>>()
        );
    }

    fn names(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn folders_take_the_models_labels() {
        let root = Path::new("data/test");
        let folders = names(&["10_x", "Normal", "abnormal"]);
        let model = names(&["abnormal", "Normal", "2_y", "10_x"]);
        assert_eq!(folder_labels(root, &folders, &model).unwrap(), [3, 1, 0]);
        // Without names: the sorted order.
        assert_eq!(folder_labels(root, &folders, &[]).unwrap(), [0, 1, 2]);
    }

    #[test]
    fn an_unknown_folder_is_refused_by_name() {
        let folders = names(&["Normal", "renamed", "other"]);
        let model = names(&["Normal", "abnormal"]);
        let err = folder_labels(Path::new("d"), &folders, &model)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("class folders 'renamed', 'other' are not among the model's classes"),
            "{err}"
        );
        assert!(err.contains("(Normal, abnormal)"), "{err}");
    }
}
