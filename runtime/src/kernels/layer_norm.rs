//! LayerNorm's core, `(x - mean(x)) / sqrt(var(x) + eps)` over one axis (without its scale and
//! shift, which tract folds into the next product): plain loops the compiler vectorises, run
//! compiled for the path's instruction set.

use crate::kernels::shape::Body;
use crate::kernels::vector::Vector;

/// Normalises `xs` into `ys` (blocks of `d × inner`: the normalised axis, of length `d`, at
/// stride `inner`), on `vector`.
pub fn layer_norm(
    xs: &[f32],
    ys: &mut [f32],
    (d, inner): (usize, usize),
    eps: f32,
    vector: Vector,
) {
    vector.run(Core {
        xs,
        ys,
        d,
        inner,
        eps,
    })
}

/// [`layer_norm_core`] as a [`Body`].
struct Core<'a> {
    xs: &'a [f32],
    ys: &'a mut [f32],
    d: usize,
    inner: usize,
    eps: f32,
}

impl Body for Core<'_> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        layer_norm_core(self.xs, self.ys, self.d, self.inner, self.eps)
    }
}

/// Normalises `xs` (blocks of `d × inner`, the normalised axis of length `d` with stride
/// `inner`) into `ys`: two passes for the mean and the variance, one to write.
#[inline(always)]
pub(crate) fn layer_norm_core(xs: &[f32], ys: &mut [f32], d: usize, inner: usize, eps: f32) {
    if d == 0 || inner == 0 {
        return;
    }
    let block = d * inner;
    if inner == 1 {
        for (x, y) in xs.chunks_exact(d).zip(ys.chunks_exact_mut(d)) {
            let mean = lane_sum(x, |v| v) / d as f32;
            let var = lane_sum(x, |v| (v - mean) * (v - mean)) / d as f32;
            let r = 1.0 / (var + eps).sqrt();
            for (o, v) in y.iter_mut().zip(x) {
                *o = (v - mean) * r;
            }
        }
        return;
    }
    let mut mean = vec![0f32; inner];
    let mut scale = vec![0f32; inner];
    for (x, y) in xs.chunks_exact(block).zip(ys.chunks_exact_mut(block)) {
        mean.fill(0.0);
        for row in x.chunks_exact(inner) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        mean.iter_mut().for_each(|m| *m /= d as f32);
        scale.fill(0.0);
        for row in x.chunks_exact(inner) {
            for ((s, v), m) in scale.iter_mut().zip(row).zip(&mean) {
                *s += (v - m) * (v - m);
            }
        }
        scale
            .iter_mut()
            .for_each(|s| *s = 1.0 / (*s / d as f32 + eps).sqrt());
        for (row, out) in x.chunks_exact(inner).zip(y.chunks_exact_mut(inner)) {
            for (((o, v), m), s) in out.iter_mut().zip(row).zip(&mean).zip(&scale) {
                *o = (v - m) * s;
            }
        }
    }
}

/// `Σ f(x)` in 16 lanes (so that the compiler vectorises it), then across them.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| f(v)).sum::<f32>()
}
