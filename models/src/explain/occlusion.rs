//! Occlusion sensitivity (Zeiler & Fergus 2014, arXiv:1311.2901), as `captum.attr.Occlusion`
//! computes it: a square window of the (normalised) image, over every channel, is replaced by a
//! baseline value; the drop in each class's probability is credited to every pixel the window
//! covers; each pixel's map value is the mean over the windows that cover it.
//!
//! Windows start at `0, stride, 2·stride, …` along each axis, `⌈(size - window) / stride⌉ + 1`
//! of them, the last one cut at the border (so every pixel is covered), as captum places them.
//! It costs one pass of the model per window position, batched.

use super::{Explanation, Method};
use crate::Error;

fn invalid(why: String) -> Error {
    Error::Explain(why)
}

/// Where and with what the image is occluded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Occlusion {
    /// Side of the square window, in pixels of the model's input.
    pub window: usize,
    /// Step between window positions, in pixels.
    pub stride: usize,
    /// The value occluded pixels take, in the model's normalised input (0: the mean colour).
    pub baseline: f32,
}

impl Occlusion {
    /// The parameters for an input of side `size`: `window` defaults to `size / 8` (at least
    /// 1), `stride` to half the window; both are checked against the input. The error comes
    /// in the caller's type (`anyhow::Error` in the binaries, [`Error`] here).
    pub fn resolve<E: From<Error>>(
        window: Option<usize>,
        stride: Option<usize>,
        baseline: f32,
        size: usize,
    ) -> std::result::Result<Self, E> {
        let window = window.unwrap_or((size / 8).max(1));
        if window == 0 || window > size {
            return Err(invalid(format!(
                "--occlusion-window {window} must be between 1 and the input size {size}"
            ))
            .into());
        }
        let stride = stride.unwrap_or((window / 2).max(1));
        if stride == 0 {
            return Err(invalid("--occlusion-stride must be at least 1".into()).into());
        }
        if stride > window && window < size {
            return Err(invalid(format!(
                "--occlusion-stride {stride} is larger than --occlusion-window {window}: pixels \
                 between windows would never be occluded"
            ))
            .into());
        }
        if !baseline.is_finite() {
            return Err(invalid("--occlusion-baseline must be a finite number".into()).into());
        }
        Ok(Self {
            window,
            stride,
            baseline,
        })
    }

    /// The first row (or column) of each window along an axis of `size` pixels.
    pub fn starts(&self, size: usize) -> Vec<usize> {
        let span = size.saturating_sub(self.window);
        let count = span.div_ceil(self.stride) + 1;
        (0..count).map(|k| k * self.stride).collect()
    }

    /// Passes of the model for one image of side `size`.
    pub fn passes(&self, size: usize) -> usize {
        self.starts(size).len().pow(2)
    }
}

/// Probabilities (one row per image) of `n` normalised images `[n, 3, s, s]`, or the caller's
/// error.
pub type RunBatch<'a, E> = dyn FnMut(&[f32], usize) -> std::result::Result<Vec<Vec<f32>>, E> + 'a;

/// The occlusion map `[classes, s, s]` of one normalised image `[3, s, s]` whose unoccluded
/// probabilities are `probs`, through `run`, which gives the probabilities of `n` images
/// (`[n, 3, s, s]`, at most `batch` at a time). `run`'s errors come back as they are.
pub fn explain_with<E: From<Error>>(
    image: &[f32],
    s: usize,
    probs: &[f32],
    p: &Occlusion,
    batch: usize,
    run: &mut RunBatch<'_, E>,
) -> std::result::Result<Explanation, E> {
    let plane = s * s;
    if image.len() != 3 * plane {
        return Err(invalid(format!(
            "occlusion: {} input values, expected 3 × {s} × {s}",
            image.len()
        ))
        .into());
    }
    let c = probs.len();
    let starts = p.starts(s);
    let windows: Vec<(usize, usize)> = starts
        .iter()
        .flat_map(|&y| starts.iter().map(move |&x| (y, x)))
        .collect();
    let batch = batch.max(1);
    let mut total = vec![0f32; c * plane];
    let mut count = vec![0u32; plane];
    let mut pixels = Vec::with_capacity(batch * image.len());
    for chunk in windows.chunks(batch) {
        pixels.clear();
        for &(y0, x0) in chunk {
            let at = pixels.len();
            pixels.extend_from_slice(image);
            let (y1, x1) = ((y0 + p.window).min(s), (x0 + p.window).min(s));
            for ch in 0..3 {
                for y in y0..y1 {
                    let row = at + ch * plane + y * s;
                    pixels[row + x0..row + x1].fill(p.baseline);
                }
            }
        }
        let occluded = run(&pixels, chunk.len())?;
        if occluded.len() != chunk.len() {
            return Err(invalid(format!(
                "occlusion: {} rows of probabilities for {} images",
                occluded.len(),
                chunk.len()
            ))
            .into());
        }
        for (&(y0, x0), q) in chunk.iter().zip(&occluded) {
            if q.len() != c {
                return Err(invalid(format!(
                    "occlusion: the model gave {} classes, then {c}",
                    q.len()
                ))
                .into());
            }
            let (y1, x1) = ((y0 + p.window).min(s), (x0 + p.window).min(s));
            for y in y0..y1 {
                for x in x0..x1 {
                    count[y * s + x] += 1;
                }
            }
            for k in 0..c {
                let drop = probs[k] - q[k];
                let map = &mut total[k * plane..(k + 1) * plane];
                for y in y0..y1 {
                    map[y * s + x0..y * s + x1]
                        .iter_mut()
                        .for_each(|v| *v += drop);
                }
            }
        }
    }
    for k in 0..c {
        for (v, &n) in total[k * plane..(k + 1) * plane].iter_mut().zip(&count) {
            *v = if n > 0 { *v / n as f32 } else { 0.0 };
        }
    }
    Ok(Explanation {
        method: Method::Occlusion,
        shape: vec![c, s, s],
        values: total,
        per_class: true,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Result;

    #[test]
    fn windows_are_placed_as_captum_places_them() {
        let p = Occlusion::resolve::<Error>(Some(4), Some(2), 0.0, 10).unwrap();
        // ⌈(10 - 4) / 2⌉ + 1 = 4 positions.
        assert_eq!(p.starts(10), vec![0, 2, 4, 6]);
        assert_eq!(p.passes(10), 16);
        // ⌈(10 - 4) / 4⌉ + 1 = 3: the last window, from 8, is cut at the border.
        let p = Occlusion::resolve::<Error>(Some(4), Some(4), 0.0, 10).unwrap();
        assert_eq!(p.starts(10), vec![0, 4, 8]);
        let whole = Occlusion::resolve::<Error>(Some(10), Some(3), 0.0, 10).unwrap();
        assert_eq!(whole.starts(10), vec![0]);
        let d = Occlusion::resolve::<Error>(None, None, 0.0, 224).unwrap();
        assert_eq!((d.window, d.stride), (28, 14));
    }

    #[test]
    fn the_drop_is_credited_to_the_covered_pixels() {
        // A "model" whose one probability is the mean of channel 0's top-left 2×2 pixels.
        let s = 4;
        let image = vec![1.0f32; 3 * s * s];
        let p = Occlusion::resolve::<Error>(Some(2), Some(2), 0.0, s).unwrap();
        let mut run = |px: &[f32], n: usize| -> Result<Vec<Vec<f32>>> {
            let plane = 3 * s * s;
            Ok((0..n)
                .map(|i| {
                    let x = &px[i * plane..];
                    vec![(x[0] + x[1] + x[s] + x[s + 1]) / 4.0]
                })
                .collect())
        };
        let e = explain_with(&image, s, &[1.0], &p, 3, &mut run).unwrap();
        assert_eq!(e.shape, vec![1, s, s]);
        // Only the window at (0, 0) hides those pixels: a drop of 1 there, 0 elsewhere.
        for y in 0..s {
            for x in 0..s {
                let want = if y < 2 && x < 2 { 1.0 } else { 0.0 };
                assert_eq!(e.values[y * s + x], want, "({y}, {x})");
            }
        }
        let mut short = |_: &[f32], _: usize| -> Result<Vec<Vec<f32>>> { Ok(vec![]) };
        assert!(explain_with(&image, s, &[1.0], &p, 3, &mut short).is_err());
        assert!(explain_with(&image[1..], s, &[1.0], &p, 3, &mut run).is_err());
    }

    #[test]
    fn bad_parameters_are_refused_by_name() {
        let e = Occlusion::resolve::<Error>(Some(40), None, 0.0, 32).unwrap_err();
        assert!(e.to_string().contains("--occlusion-window 40"), "{e}");
        let e = Occlusion::resolve::<Error>(Some(4), Some(8), 0.0, 32).unwrap_err();
        assert!(e.to_string().contains("--occlusion-stride 8"), "{e}");
        let e = Occlusion::resolve::<Error>(Some(4), Some(0), 0.0, 32).unwrap_err();
        assert!(e.to_string().contains("--occlusion-stride"), "{e}");
        assert!(Occlusion::resolve::<Error>(Some(4), None, f32::NAN, 32).is_err());
    }
}
