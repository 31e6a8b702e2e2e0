//! A small labelled image set for trying the tools without data of one's own: grayscale
//! images of three shapes on a noisy background, in the ImageFolder layout
//! (`{train,val,test}/{circle,square,triangle}/NNNN.png`).

use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::cli::SynthArgs;
use crate::data::export::atomic_dir;

use std::fmt;
use std::path::{Path, PathBuf};

use image::{GrayImage, Luma};

/// Class names, in label order.
pub const CLASSES: [&str; 3] = ["circle", "square", "triangle"];

/// What [`generate`] wrote.
#[derive(Debug)]
pub struct Summary {
    pub root: PathBuf,
    /// Images per split: train, val, test.
    pub counts: [usize; 3],
    pub size: u32,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [tr, va, te] = self.counts;
        write!(
            f,
            "wrote {} images of {}×{} ({tr} train, {va} val, {te} test; classes {}) to {}",
            tr + va + te,
            self.size,
            self.size,
            CLASSES.join(", "),
            self.root.display()
        )
    }
}

/// SplitMix64: small, seedable and identical everywhere.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

/// Draws one image of class `label`.
fn draw(label: usize, size: u32, rng: &mut Rng) -> GrayImage {
    let s = size as f32;
    let r = rng.uniform(0.22, 0.36) * s;
    let cx = rng.uniform(r, s - r);
    let cy = rng.uniform(r, s - r);
    let fg = rng.uniform(170.0, 250.0);
    let bg = rng.uniform(10.0, 70.0);
    let inside = |x: f32, y: f32| -> bool {
        let (dx, dy) = (x - cx, y - cy);
        match label {
            0 => dx * dx + dy * dy <= r * r,
            1 => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
            // Upward triangle with apex at (cx, cy - r) and base at cy + r.
            _ => dy >= -r && dy <= r && dx.abs() <= (dy + r) * 0.5,
        }
    };
    GrayImage::from_fn(size, size, |x, y| {
        let v = if inside(x as f32 + 0.5, y as f32 + 0.5) {
            fg
        } else {
            bg
        };
        let noisy = v + rng.uniform(-25.0, 25.0);
        Luma([noisy.clamp(0.0, 255.0) as u8])
    })
}

/// Writes the image set under `root`, which must not exist or be empty. Everything is written
/// into a temporary folder beside it first and renamed into place at the end, so a failure
/// leaves no partial set behind.
pub fn generate(root: &Path, per_class: usize, size: u32, seed: u64) -> anyhow::Result<Summary> {
    if per_class == 0 {
        bail!("--per-class must be at least 1");
    }
    if !(8..=1024).contains(&size) {
        bail!("--size {size} is out of range 8..=1024");
    }
    let counts = atomic_dir(root, |tmp| write_all(tmp, per_class, size, seed))?;
    Ok(Summary {
        root: root.to_path_buf(),
        counts,
        size,
    })
}

fn write_all(tmp: &Path, per_class: usize, size: u32, seed: u64) -> anyhow::Result<[usize; 3]> {
    let held_out = (per_class / 4).max(4);
    let splits = [("train", per_class), ("val", held_out), ("test", held_out)];
    let mut rng = Rng(seed);
    let mut counts = [0; 3];
    for (si, (split, n)) in splits.iter().enumerate() {
        for (label, class) in CLASSES.iter().enumerate() {
            let dir = tmp.join(split).join(class);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            for i in 0..*n {
                let path = dir.join(format!("{i:04}.png"));
                draw(label, size, &mut rng)
                    .save(&path)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                counts[si] += 1;
            }
        }
    }
    Ok(counts)
}

pub fn synth(a: &SynthArgs) -> anyhow::Result<ExitCode> {
    let summary = generate(&a.output, a.per_class, a.size, a.seed)?;
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn writes_imagefolder_layout_deterministically() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let s = generate(&a, 5, 16, 3).unwrap();
        assert_eq!(s.counts, [15, 12, 12]);
        let img = image::open(a.join("train/square/0002.png")).unwrap();
        assert_eq!((img.width(), img.height()), (16, 16));
        let b = dir.path().join("b");
        generate(&b, 5, 16, 3).unwrap();
        let f = "val/triangle/0003.png";
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap()
        );
        // A non-empty destination is refused and left as it was.
        let err = generate(&a, 5, 16, 3).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn classes_differ_in_foreground_area() {
        // Areas: triangle 2r², square 2.89r², circle πr².
        let mut rng = Rng(1);
        let area = |label, rng: &mut Rng| -> f32 {
            (0..50)
                .map(|_| {
                    draw(label, 32, rng)
                        .pixels()
                        .filter(|p| p.0[0] > 120)
                        .count() as f32
                })
                .sum::<f32>()
        };
        let (c, s, t) = (area(0, &mut rng), area(1, &mut rng), area(2, &mut rng));
        assert!(t < s && s < c, "circle {c} square {s} triangle {t}");
    }
}
