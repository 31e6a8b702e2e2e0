//! A MedMNIST `.npz` file written out as an ImageFolder tree, `{split}/{class}/NNNNNN.png`, so
//! that tools that read only folders (torchvision's `ImageFolder`, a file browser, a zip) see
//! the same images and labels. PNG is lossless and keeps grayscale sets single-channel, so
//! reading the tree back gives the pixels and labels of the `.npz`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use image::{DynamicImage, ImageFormat};
use mae_models::npz::{self, NpzSplit};

/// What [`npz_to_image_folder`] wrote.
#[derive(Debug)]
pub struct Exported {
    pub root: PathBuf,
    /// Images written per split, in the order written.
    pub splits: Vec<(String, usize)>,
    pub class_names: Vec<String>,
    /// Side lengths (width, height) and channels of the images.
    pub size: (u32, u32),
    pub channels: usize,
}

impl std::fmt::Display for Exported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: usize = self.splits.iter().map(|(_, n)| n).sum();
        let per: Vec<String> = self
            .splits
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        write!(
            f,
            "wrote {total} images ({}; classes {}) of {}×{} {} as PNG to {}",
            per.join(", "),
            self.class_names.join(", "),
            self.size.0,
            self.size.1,
            if self.channels == 1 {
                "grayscale"
            } else {
                "RGB"
            },
            self.root.display()
        )
    }
}

/// The folder names of `k` classes when none are given: the label, zero-padded to one width
/// so that sorted order is label order (`00`, ..., `10` for 11 classes).
pub fn default_class_names(k: usize) -> Vec<String> {
    let width = k.saturating_sub(1).to_string().len();
    (0..k).map(|i| format!("{i:0width$}")).collect()
}

/// Checks that `names` can name the folders of `k` classes: one each, none empty or holding a
/// path separator, in sorted order, since an ImageFolder labels its folders in sorted order.
pub fn check_class_names(names: &[String], k: usize) -> anyhow::Result<()> {
    if names.len() != k {
        bail!(
            "--class-names gives {} names but the labels have {k} classes",
            names.len()
        );
    }
    if let Some(bad) = names
        .iter()
        .find(|n| n.is_empty() || *n == "." || *n == ".." || n.contains(['/', '\\']))
    {
        bail!("--class-names: '{bad}' cannot name a folder");
    }
    if let Some(w) = names.windows(2).find(|w| w[0] >= w[1]) {
        bail!(
            "--class-names must be distinct and in sorted order ('{}' comes before '{}'): an \
             ImageFolder labels its class folders in sorted order, so only then does class i \
             keep label i",
            w[0],
            w[1]
        );
    }
    Ok(())
}

/// Writes splits `splits` (every split of the file when empty) of the `.npz` at `npz_path` as
/// an ImageFolder tree at `root`, which must not exist or be empty. The tree is written into a
/// temporary folder beside `root` and renamed into place when complete: a failure leaves
/// nothing behind. `progress` is called after each image.
pub fn npz_to_image_folder(
    npz_path: &Path,
    root: &Path,
    splits: &[String],
    class_names: Option<&[String]>,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<Exported> {
    let available = npz::splits(npz_path)?;
    let splits: Vec<String> = if splits.is_empty() {
        available.clone()
    } else {
        splits.to_vec()
    };
    if let Some(s) = splits.iter().find(|s| !available.contains(s)) {
        bail!(
            "{}: no split '{s}' (the file holds {})",
            npz_path.display(),
            available.join(", ")
        );
    }
    if splits.is_empty() {
        bail!("{}: holds no split to export", npz_path.display());
    }
    let data: Vec<(String, NpzSplit)> = splits
        .iter()
        .map(|s| Ok((s.clone(), npz::read_split(npz_path, s)?)))
        .collect::<anyhow::Result<_>>()?;
    let k = classes_of(npz_path, &data)?;
    let class_names = match class_names {
        Some(names) => names.to_vec(),
        None => default_class_names(k),
    };
    check_class_names(&class_names, k)?;
    let total: usize = data.iter().map(|(_, d)| d.images.len()).sum();
    let first = data.iter().find_map(|(_, d)| d.images.first());
    let size = first.map_or((0, 0), |img| img.dimensions());
    let channels = data.first().map_or(3, |(_, d)| d.channels);

    atomic_dir(root, |tmp| {
        let mut done = 0;
        for (split, d) in &data {
            let width = d.images.len().saturating_sub(1).to_string().len().max(6);
            let mut missing: Vec<&str> = Vec::new();
            for (c, name) in class_names.iter().enumerate() {
                if d.labels.iter().any(|l| l.first() == Some(&(c as i64))) {
                    let dir = tmp.join(split).join(name);
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                } else {
                    missing.push(name);
                }
            }
            if !missing.is_empty() {
                eprintln!(
                    "mae-train: warning: split '{split}' has no images of class {}: read as an \
                     ImageFolder, its other classes' labels shift down",
                    missing.join(", ")
                );
            }
            for (i, (img, label)) in d.images.iter().zip(&d.labels).enumerate() {
                let c = label.first().copied().unwrap_or(0) as usize;
                let path = tmp
                    .join(split)
                    .join(&class_names[c])
                    .join(format!("{i:0width$}.png"));
                let img = if d.channels == 1 {
                    DynamicImage::ImageLuma8(DynamicImage::ImageRgb8(img.clone()).to_luma8())
                } else {
                    DynamicImage::ImageRgb8(img.clone())
                };
                img.save_with_format(&path, ImageFormat::Png)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                done += 1;
                progress(done, total);
            }
        }
        Ok(())
    })?;
    Ok(Exported {
        root: root.to_path_buf(),
        splits: data
            .iter()
            .map(|(s, d)| (s.clone(), d.images.len()))
            .collect(),
        class_names,
        size,
        channels,
    })
}

/// Classes of single-label data: one more than the largest label over the splits (at least 2,
/// as `mae-train` reads the `.npz`). Multi-label data has no ImageFolder form.
fn classes_of(path: &Path, data: &[(String, NpzSplit)]) -> anyhow::Result<usize> {
    let mut max = 0i64;
    for (split, d) in data {
        for l in &d.labels {
            match l[..] {
                [c] if c >= 0 => max = max.max(c),
                [c] => bail!(
                    "{}: split '{split}' has the negative label {c}",
                    path.display()
                ),
                _ => bail!(
                    "{}: split '{split}' is multi-label ({} labels per image); an ImageFolder \
                     tree holds one class per image",
                    path.display(),
                    l.len()
                ),
            }
        }
    }
    Ok((max as usize + 1).max(2))
}

/// Creates the folder `root` (which must not exist, or be empty) from what `fill` writes into
/// a temporary folder beside it, renamed into place only when `fill` succeeds; on failure the
/// temporary folder is removed and `root` is left as it was.
pub fn atomic_dir<T>(
    root: &Path,
    fill: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    if root.exists() {
        let empty = std::fs::read_dir(root)
            .with_context(|| format!("cannot read {}", root.display()))?
            .next()
            .is_none();
        if !empty {
            bail!("{} already exists and is not empty", root.display());
        }
    }
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} does not name a folder", root.display()))?;
    let tmp = root.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = std::fs::create_dir_all(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))
        .and_then(|()| fill(&tmp))
        .and_then(|value| {
            if root.exists() {
                std::fs::remove_dir(root)
                    .with_context(|| format!("cannot replace {}", root.display()))?;
            }
            std::fs::rename(&tmp, root)
                .with_context(|| format!("cannot move the tree to {}", root.display()))?;
            Ok(value)
        });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn default_names_sort_in_label_order() {
        assert_eq!(default_class_names(2), ["0", "1"]);
        let eleven = default_class_names(11);
        assert_eq!((eleven[0].as_str(), eleven[10].as_str()), ("00", "10"));
        let mut sorted = eleven.clone();
        sorted.sort();
        assert_eq!(sorted, eleven);
    }

    #[test]
    fn class_names_are_checked() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(check_class_names(&s(&["normal", "pneumonia"]), 2).is_ok());
        let e = check_class_names(&s(&["pneumonia", "normal"]), 2).unwrap_err();
        assert!(e.to_string().contains("sorted order"), "{e}");
        assert!(check_class_names(&s(&["a"]), 2).is_err());
        assert!(check_class_names(&s(&["a", "b/c"]), 2).is_err());
        assert!(check_class_names(&s(&["a", "a"]), 2).is_err());
    }

    #[test]
    fn a_failed_fill_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let err = atomic_dir(&root, |tmp| -> anyhow::Result<()> {
            std::fs::write(tmp.join("half"), b"x")?;
            bail!("stopped")
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "stopped");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        atomic_dir(&root, |tmp| Ok(std::fs::write(tmp.join("f"), b"x")?)).unwrap();
        assert!(root.join("f").is_file());
        let err = atomic_dir(&root, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
    }
}
