//! Data sets (ImageFolder trees, in folders or zip archives, and MedMNIST `.npz` files), subsets,
//! transforms and a multi-threaded batch loader that decodes and augments ahead of the model.

pub mod erasing;
pub mod export;
pub mod loader;
pub mod mixup;
pub mod randaug;
pub mod transform;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use image::RgbImage;
use mae_models::checkpoint::Task;
use mae_models::input::{is_zip, Archive, ImageFolder};

use crate::rng::Rng;

/// Extensions read from ImageFolder trees (torchvision's, and `.dcm`; any case): the shared
/// input layer's list.
pub const IMAGE_EXTENSIONS: [&str; 10] = mae_models::input::EXTENSIONS;

/// Where one sample's pixels are.
#[derive(Debug, Clone)]
pub enum Pixels {
    File(PathBuf),
    /// An entry of a zip archive, by its path below the archive's.
    Archived(Arc<Archive>, PathBuf),
    Memory(Arc<RgbImage>),
}

/// One sample: its pixels and its labels (one class index, or a 0/1 vector for multi-label).
#[derive(Debug, Clone)]
pub struct Item {
    pub pixels: Pixels,
    pub labels: Vec<i64>,
    /// How the sample is named in reports (a path, or `file.npz:split[i]`).
    pub name: String,
}

impl Item {
    /// Decodes the pixels (an image or DICOM file, or such an entry of a zip archive, through
    /// the shared input layer); errors name the file.
    pub fn image(&self) -> anyhow::Result<RgbImage> {
        match &self.pixels {
            Pixels::File(p) => Ok(mae_models::input::load(p)?),
            Pixels::Archived(a, p) => Ok(a.load(p)?),
            Pixels::Memory(img) => Ok((**img).clone()),
        }
    }

    /// The single class of a multi-class or binary sample.
    pub fn class(&self) -> usize {
        self.labels.first().copied().unwrap_or(0).max(0) as usize
    }
}

/// A labelled split.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub items: Vec<Item>,
    pub class_names: Vec<String>,
    pub task: Task,
    pub source: String,
}

impl Dataset {
    /// Outputs of the head: classes, or labels for multi-label tasks.
    pub fn num_outputs(&self) -> usize {
        self.class_names.len()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Opens split `split` of `data_path`: a MedMNIST `.npz` file, an ImageFolder root holding
/// `{split}/{class}/image`, or a `.zip` holding that tree (at its top or inside one top folder).
pub fn open(data_path: &Path, split: &str) -> anyhow::Result<Dataset> {
    if data_path.extension().is_some_and(|e| e == "npz") {
        open_npz(data_path, split)
    } else {
        open_image_folder(ImageFolder::open_split(data_path, split)?)
    }
}

/// An ImageFolder split read by the shared rules (torchvision's): sorted class folders, their
/// images and DICOM files found recursively; other files are reported on standard error.
fn open_image_folder(folder: ImageFolder) -> anyhow::Result<Dataset> {
    if let Some(note) = folder.skipped_note() {
        eprintln!("mae-train: {note}");
    }
    let root = folder.root;
    if folder.classes.len() < 2 {
        bail!(
            "{} must hold one folder per class (found {})",
            root.display(),
            folder.classes.len()
        );
    }
    let archive = folder.archive;
    let items = folder
        .samples
        .into_iter()
        .map(|(p, label)| Item {
            name: p.display().to_string(),
            pixels: match &archive {
                Some(a) => Pixels::Archived(a.clone(), p),
                None => Pixels::File(p),
            },
            labels: vec![label as i64],
        })
        .collect();
    let task = if folder.classes.len() == 2 {
        Task::Binary
    } else {
        Task::MultiClass
    };
    Ok(Dataset {
        items,
        class_names: folder.classes,
        task,
        source: root.display().to_string(),
    })
}

/// Every image of a data set without labels (each labelled 0), sorted by path: under the
/// folder `path` (recursively, links followed), or every image entry of the zip archive `path`.
pub fn unlabeled_items(path: &Path) -> anyhow::Result<Vec<Item>> {
    let item = |p: &Path, pixels| Item {
        name: p.display().to_string(),
        pixels,
        labels: vec![0],
    };
    if is_zip(path) && !path.is_dir() {
        let archive = Arc::new(Archive::open(path)?);
        return Ok(archive
            .image_paths()
            .into_iter()
            .map(|p| item(&p, Pixels::Archived(archive.clone(), p.clone())))
            .collect());
    }
    let mut files = Vec::new();
    collect_images(path, &mut files)?;
    files.sort();
    Ok(files
        .into_iter()
        .map(|p| item(&p, Pixels::File(p.clone())))
        .collect())
}

/// Whether the data set at `path` has split `split`: a `.npz` file (its splits are checked
/// when read), a folder holding `split/`, or a zip archive holding it.
pub fn has_split(path: &Path, split: &str) -> anyhow::Result<bool> {
    if path.extension().is_some_and(|e| e == "npz") {
        return Ok(true);
    }
    if is_zip(path) && !path.is_dir() {
        return Ok(Archive::open(path)?.split_parent(split).is_ok());
    }
    Ok(path.join(split).is_dir())
}

/// Every image or DICOM file under `dir`, recursively (links followed).
pub fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let p = e
            .with_context(|| format!("cannot read {}", dir.display()))?
            .path();
        if p.is_dir() {
            collect_images(&p, out)?;
        } else if mae_models::input::is_image_file(&p) {
            out.push(p);
        }
    }
    Ok(())
}

fn open_npz(path: &Path, split: &str) -> anyhow::Result<Dataset> {
    let s = mae_models::npz::read_split(path, split)?;
    let n = s.images.len();
    let width = s.labels.first().map_or(1, Vec::len);
    let (task, class_names) = if width > 1 {
        (
            Task::MultiLabel,
            (0..width).map(|i| format!("label_{i}")).collect(),
        )
    } else {
        let max = s
            .labels
            .iter()
            .filter_map(|l| l.first())
            .copied()
            .max()
            .unwrap_or(0);
        let k = (max + 1).max(2) as usize;
        let task = if k == 2 {
            Task::Binary
        } else {
            Task::MultiClass
        };
        (task, (0..k).map(|i| i.to_string()).collect())
    };
    let items = s
        .images
        .into_iter()
        .zip(s.labels)
        .enumerate()
        .map(|(i, (img, labels))| Item {
            pixels: Pixels::Memory(Arc::new(img)),
            labels,
            name: format!("{}:{split}[{i}]", path.display()),
        })
        .collect();
    if n == 0 {
        bail!("{}: split '{split}' is empty", path.display());
    }
    Ok(Dataset {
        items,
        class_names,
        task,
        source: format!("{}:{split}", path.display()),
    })
}

/// A seeded, class-stratified subset of `n` items (by the first label for multi-label data):
/// each class keeps its share of `n` (within one image), and the subsets of one seed are nested
/// (the 600 images are among the 6000), which is what makes a data-efficiency curve a curve.
pub fn stratified_subset(ds: &Dataset, n: usize, seed: u64) -> Vec<usize> {
    if n >= ds.len() {
        return (0..ds.len()).collect();
    }
    let k = ds.num_outputs().max(1);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); k];
    for (i, item) in ds.items.iter().enumerate() {
        by_class[item.class().min(k - 1)].push(i);
    }
    let mut rng = Rng::derive(&[seed, 0x5eed]);
    for c in &mut by_class {
        rng.shuffle(c);
    }
    // Images are handed out one at a time to the class furthest below its share, so the quotas
    // of a larger subset never fall below those of a smaller one (no Alabama paradox).
    let total = ds.len() as f64;
    let mut quotas = vec![0usize; k];
    for t in 1..=n {
        let deficit = |c: usize| t as f64 * by_class[c].len() as f64 / total - quotas[c] as f64;
        let next = (0..k)
            .filter(|&c| quotas[c] < by_class[c].len())
            .max_by(|&a, &b| deficit(a).total_cmp(&deficit(b)).then(b.cmp(&a)));
        match next {
            Some(c) => quotas[c] += 1,
            None => break,
        }
    }
    let mut chosen: Vec<usize> = by_class
        .iter()
        .zip(&quotas)
        .flat_map(|(c, &q)| c.iter().take(q).copied())
        .collect();
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(counts: &[usize]) -> Dataset {
        let mut items = Vec::new();
        for (c, &n) in counts.iter().enumerate() {
            for i in 0..n {
                items.push(Item {
                    pixels: Pixels::File(PathBuf::from(format!("{c}/{i}.png"))),
                    labels: vec![c as i64],
                    name: format!("{c}/{i}"),
                });
            }
        }
        Dataset {
            items,
            class_names: counts
                .iter()
                .enumerate()
                .map(|(i, _)| i.to_string())
                .collect(),
            task: Task::MultiClass,
            source: "fake".into(),
        }
    }

    #[test]
    fn stratified_subset_keeps_class_shares() {
        let ds = fake(&[300, 100, 600]);
        let s = stratified_subset(&ds, 100, 1);
        assert_eq!(s.len(), 100);
        let count = |c: i64| s.iter().filter(|&&i| ds.items[i].labels[0] == c).count();
        assert_eq!((count(0), count(1), count(2)), (30, 10, 60));
        assert_eq!(s, stratified_subset(&ds, 100, 1));
        assert_ne!(s, stratified_subset(&ds, 100, 2));
        let mut d = s.clone();
        d.dedup();
        assert_eq!(d.len(), 100);
        // Uneven shares still sum to n.
        let ds = fake(&[7, 5, 3]);
        assert_eq!(stratified_subset(&ds, 8, 0).len(), 8);
        assert_eq!(stratified_subset(&ds, 100, 0).len(), 15);
    }

    #[test]
    fn stratified_subsets_of_one_seed_are_nested() {
        for counts in [&[388usize, 3494][..], &[7, 5, 3], &[50, 1, 20, 33]] {
            let ds = fake(counts);
            for seed in 0..3 {
                let mut prev: Vec<usize> = Vec::new();
                let step = (ds.len() / 200).max(1);
                for n in (1..ds.len()).step_by(step) {
                    let s = stratified_subset(&ds, n, seed);
                    assert_eq!(s.len(), n);
                    let nested = prev.iter().all(|i| s.binary_search(i).is_ok());
                    assert!(nested, "{counts:?} n={n} seed={seed}");
                    for (c, &size) in counts.iter().enumerate() {
                        let got = s
                            .iter()
                            .filter(|&&i| ds.items[i].labels[0] == c as i64)
                            .count();
                        let exact = n as f64 * size as f64 / ds.len() as f64;
                        let close = (got as f64 - exact).abs() < 1.0 + 1e-9;
                        assert!(close, "{counts:?} n={n} class {c}: {got} vs {exact}");
                    }
                    prev = s;
                }
            }
        }
    }
}
