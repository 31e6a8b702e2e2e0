//! One image's multi-head self-attention on the float32 tiles of the linear layers.

use rayon::prelude::*;
use tract_linalg::multithread::{current_tract_executor, Executor};

use crate::kernels::driver::{Aligned, Strides};
use crate::kernels::f32::{pack_panel, F32Tile};
use crate::kernels::shape::{Body, MR, NR};

/// Multi-head self-attention over one image's `qkv` (`tokens × 3·heads·dim`, token-major: the
/// queries, then the keys, then the values, each head's `dim` values together), into `out`
/// (`tokens × heads·dim`, token-major): per head, `softmax(scale · q·kᵀ) · v`.
///
/// Each head runs transposed, by blocks of [`NR`] queries, on the tiles of the linear layers:
/// the scores `k · (scale · q)ᵀ` of a block come out as `tokens × NR`, which is already the
/// weight layout of the second product `vᵀ · p`, so nothing is packed between the two; the
/// softmax runs down the columns (its exponential on tract's own kernel) and divides the
/// outputs by its sums. Heads split over the thread pool of tract's current executor.
///
/// With `probabilities` (`heads × tokens × tokens`: per head, each query's row over the keys),
/// the softmax's outputs are written there too, for graphs that read them (attention rollout).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    qkv: &[f32],
    tokens: usize,
    heads: usize,
    dim: usize,
    scale: f32,
    out: &mut [f32],
    probabilities: Option<&mut [f32]>,
    tile: F32Tile,
) -> anyhow::Result<()> {
    let width = heads * dim;
    anyhow::ensure!(
        qkv.len() == tokens * 3 * width && out.len() == tokens * width,
        "attention: {} and {} values for {tokens} tokens of {heads} heads × {dim}",
        qkv.len(),
        out.len()
    );
    if let Some(p) = &probabilities {
        anyhow::ensure!(
            p.len() == heads * tokens * tokens,
            "attention: {} probabilities for {heads} heads of {tokens} × {tokens}",
            p.len()
        );
    }
    if tokens == 0 || width == 0 {
        return Ok(());
    }
    let exp = tract_linalg::routines::Func::Softmax2.map_reduce_f32()?;
    // Each head's columns of every token's row: the part of `out` that head alone writes.
    let mut columns: Vec<Vec<&mut [f32]>> =
        (0..heads).map(|_| Vec::with_capacity(tokens)).collect();
    for row in out.chunks_exact_mut(width) {
        for (head, piece) in columns.iter_mut().zip(row.chunks_exact_mut(dim)) {
            head.push(piece);
        }
    }
    // Each head's block of the probabilities, or none.
    let blocks: Vec<Option<&mut [f32]>> = match probabilities {
        Some(p) => p.chunks_exact_mut(tokens * tokens).map(Some).collect(),
        None => (0..heads).map(|_| None).collect(),
    };
    let one_head = |(h, (mut dst, probs)): (usize, HeadWork)| {
        head(
            qkv,
            (tokens, heads, dim),
            h,
            scale,
            &*exp,
            tile,
            &mut dst,
            probs,
        )
    };
    let work = columns.into_iter().zip(blocks);
    match current_tract_executor() {
        Executor::MultiThread(pool) => pool.install(|| {
            work.collect::<Vec<_>>()
                .into_par_iter()
                .enumerate()
                .try_for_each(one_head)
        }),
        _ => work.enumerate().try_for_each(one_head),
    }
}

/// What one head writes: its columns of every token's output, and its probabilities.
type HeadWork<'a> = (Vec<&'a mut [f32]>, Option<&'a mut [f32]>);

/// Head `h` of [`attention`], into `dst` (each token's `dim` outputs of this head).
#[allow(clippy::too_many_arguments)]
fn head(
    qkv: &[f32],
    (tokens, heads, dim): (usize, usize, usize),
    h: usize,
    scale: f32,
    exp: &dyn tract_linalg::reduce::MapReduce<f32, f32>,
    tile: F32Tile,
    dst: &mut [&mut [f32]],
    mut probs: Option<&mut [f32]>,
) -> anyhow::Result<()> {
    let width = heads * dim;
    let row = Strides {
        row: 3 * width,
        col: 1,
    };
    // The keys as row panels (`tokens × dim`), the values transposed (`dim × tokens`).
    let mut keys = vec![0f32; tokens.div_ceil(MR) * dim * MR];
    for (t, p) in keys.chunks_exact_mut((dim * MR).max(1)).enumerate() {
        pack_panel(&qkv[width + h * dim..], tokens, dim, row, t, p);
    }
    let mut values = vec![0f32; dim.div_ceil(MR) * tokens * MR];
    let by_dim = Strides {
        row: 1,
        col: 3 * width,
    };
    for (t, p) in values.chunks_exact_mut(tokens * MR).enumerate() {
        pack_panel(&qkv[2 * width + h * dim..], dim, tokens, by_dim, t, p);
    }
    // The two weight panels of the tiles, on cache lines.
    let mut queries = Aligned::<f32>::zeroed(dim * NR);
    let mut scores = Aligned::<f32>::zeroed(tokens * NR);
    let zero = [0f32; NR];
    let mut acc = [[0f32; NR]; MR];
    for first in (0..tokens).step_by(NR) {
        let cols = (tokens - first).min(NR);
        // This block's queries, scaled, as a weight panel `dim × NR` (zero past `cols`).
        queries.fill(0.0);
        for c in 0..cols {
            let q = &qkv[(first + c) * 3 * width + h * dim..][..dim];
            for (kk, v) in q.iter().enumerate() {
                queries[kk * NR + c] = scale * v;
            }
        }
        // The scores, `tokens × NR`: key-major, each row one key against the block.
        for (t, kp) in keys.chunks_exact((dim * MR).max(1)).enumerate() {
            tile.run(kp, &queries, dim, &zero, &mut acc);
            let rows = (tokens - t * MR).min(MR);
            for (r, a) in acc.iter().enumerate().take(rows) {
                scores[(t * MR + r) * NR..][..NR].copy_from_slice(a);
            }
        }
        let inv = softmax_columns(&mut scores, exp, tile)?;
        if let Some(p) = probs.as_deref_mut() {
            // Query `first + c`'s row: column `c` of the scores, times its sum's inverse.
            for (c, i) in inv.iter().enumerate().take(cols) {
                let row = &mut p[(first + c) * tokens..][..tokens];
                for (k, v) in row.iter_mut().enumerate() {
                    *v = scores[k * NR + c] * i;
                }
            }
        }
        // The outputs, transposed: `dim × NR`, each row one of the head's values.
        for (t, vp) in values.chunks_exact(tokens * MR).enumerate() {
            tile.run(vp, &scores, tokens, &zero, &mut acc);
            let rows = (dim - t * MR).min(MR);
            for a in acc.iter_mut() {
                for (v, i) in a.iter_mut().zip(&inv) {
                    *v *= i;
                }
            }
            for (j, out) in dst[first..first + cols].iter_mut().enumerate() {
                for (r, a) in acc.iter().enumerate().take(rows) {
                    out[t * MR + r] = a[j];
                }
            }
        }
    }
    Ok(())
}

/// The softmax down each column of `scores` (`rows × NR`), in place: each value less its
/// column's largest, exponentiated on tract's kernel; returns the inverses of the columns' sums
/// (by which the outputs are then multiplied).
fn softmax_columns(
    scores: &mut [f32],
    exp: &dyn tract_linalg::reduce::MapReduce<f32, f32>,
    tile: F32Tile,
) -> anyhow::Result<[f32; NR]> {
    #[cfg(target_arch = "x86_64")]
    if let F32Tile::Avx512(cpu) = tile {
        cpu.subtract_column_max(scores);
        exp.run_with_params(scores, 0.0)?;
        return Ok(cpu.column_sums(scores).map(f32::recip));
    }
    let vector = tile.vector();
    vector.run(SubtractColumnMax(scores));
    exp.run_with_params(scores, 0.0)?;
    Ok(vector.run(ColumnSums(scores)).map(f32::recip))
}

/// Each value of `scores` (`rows × NR`) less its column's largest, as a [`Body`].
struct SubtractColumnMax<'a>(&'a mut [f32]);

impl Body for SubtractColumnMax<'_> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let mut max = [f32::NEG_INFINITY; NR];
        for s in self.0.chunks_exact(NR) {
            for (m, v) in max.iter_mut().zip(s) {
                *m = if *v > *m { *v } else { *m };
            }
        }
        for s in self.0.chunks_exact_mut(NR) {
            for (v, m) in s.iter_mut().zip(&max) {
                *v -= m;
            }
        }
    }
}

/// The sums of the columns of `scores` (`rows × NR`), as a [`Body`].
struct ColumnSums<'a>(&'a [f32]);

impl Body for ColumnSums<'_> {
    type Out = [f32; NR];
    #[inline(always)]
    fn run(self) -> [f32; NR] {
        let mut sum = [0f32; NR];
        for s in self.0.chunks_exact(NR) {
            for (t, v) in sum.iter_mut().zip(s) {
                *t += v;
            }
        }
        sum
    }
}
