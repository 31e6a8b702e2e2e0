//! The product driver, written once for every tile: `c = a · w` against weights packed at load
//! in panels of [`NR`] columns, the activations packed per product in panels of [`MR`] rows, so
//! that a tile of `MR × NR` outputs streams one contiguous weight panel while its accumulators
//! stay in registers. Work splits over the weight panels, on the thread pool of tract's current
//! executor; each thread writes only its panels' columns of the output.
//!
//! A [`Tile`] says what one tile computes (float32 sums with the bias, or int8 sums scaled back
//! to float32); [`run_panels`] runs it over every panel, folds in the GELU and stores the tiles.

use rayon::prelude::*;
use tract_linalg::multithread::{current_tract_executor, Executor};

pub use crate::kernels::shape::{Acc, MR, NR};

/// Where element `(row, col)` of a matrix lies in its slice: `row * self.row + col * self.col`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Strides {
    pub row: usize,
    pub col: usize,
}

/// Values of a plain numeric type, zero by default.
pub trait Plain: Copy + Default + PartialEq {}
impl Plain for f32 {}
impl Plain for i8 {}
impl Plain for i16 {}

/// A zeroed buffer of `len` values that starts on a cache line, so that the tiles' 64-byte
/// loads of weight panels (each a whole number of lines long) never straddle two lines.
pub struct Aligned<T: Plain> {
    values: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Plain> Aligned<T> {
    pub fn zeroed(len: usize) -> Self {
        // One line of values more than asked for: the first line boundary lies within it.
        let spare = 64 / std::mem::size_of::<T>().max(1);
        let values = vec![T::default(); len + spare];
        let start = values.as_ptr().align_offset(64).min(spare);
        Self { values, start, len }
    }
}

impl<T: Plain> Clone for Aligned<T> {
    fn clone(&self) -> Self {
        // A copy of the vector could start anywhere: lay the values out anew.
        let mut copy = Self::zeroed(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl<T: Plain> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.values[self.start..self.start + self.len]
    }
}

impl<T: Plain> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.values[self.start..self.start + self.len]
    }
}

impl<T: Plain> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} values on cache lines", self.len)
    }
}

impl<T: Plain> PartialEq for Aligned<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

/// What a product's tiles fold in after the sums: each column's bias (zero where there is none,
/// padded to whole panels) and an exact GELU, the layer's activation.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    bias: Vec<f32>,
    pub gelu: bool,
}

impl Ending {
    /// No bias and no GELU, for `n` columns.
    pub fn new(n: usize) -> Self {
        Self {
            bias: vec![0f32; n.div_ceil(NR) * NR],
            gelu: false,
        }
    }

    /// Adds `bias[j]` to column `j`.
    pub fn add_bias(&mut self, bias: &[f32]) {
        for (b, v) in self.bias.iter_mut().zip(bias) {
            *b += v;
        }
    }

    /// Adds `bias`, if any, and sets the GELU.
    pub fn fold(&mut self, bias: Option<&[f32]>, gelu: bool) {
        if let Some(bias) = bias {
            self.add_bias(bias);
        }
        self.gelu = gelu;
    }

    /// The bias of panel `p`'s columns.
    pub fn bias(&self, p: usize) -> &[f32; NR] {
        self.bias[p * NR..(p + 1) * NR]
            .try_into()
            .expect("whole panels")
    }
}

/// What one kind of tile computes: from a packed activation panel and one weight panel, an
/// `MR × NR` block of float32 outputs.
pub trait Tile: Sync {
    /// The packed activations' values.
    type A: Sync;
    /// What the tiles of one weight panel read, prepared once per panel.
    type Panel<'a>
    where
        Self: 'a;
    /// Values in one packed activation panel.
    fn a_panel_len(&self) -> usize;
    /// Weight panel `p`, ready for its tiles.
    fn panel(&self, p: usize) -> Self::Panel<'_>;
    /// `acc` = the tile of activation panel `a` by `panel`.
    fn tile<'a>(&'a self, panel: &Self::Panel<'a>, a: &[Self::A], acc: &mut Acc);
    /// Where the loops around the tiles (GELU's scaling) run.
    fn vector(&self) -> crate::kernels::vector::Vector;
}

/// Checks that an `m × k` input and an `m × n` output (`extents`) lie within slices of
/// `a.0` and `c.0` values at strides `a.1` and `c.1`; `what` names the product in the errors.
/// False when the output is empty (nothing to compute).
pub fn check_extents(
    what: &str,
    a: (usize, Strides),
    c: (usize, Strides),
    (m, k, n): (usize, usize, usize),
) -> anyhow::Result<bool> {
    let last = |rows: usize, cols: usize, s: Strides| {
        (rows > 0 && cols > 0).then(|| (rows - 1) * s.row + (cols - 1) * s.col)
    };
    if let Some(end) = last(m, k, a.1) {
        anyhow::ensure!(end < a.0, "{what}: input of {} values for {m}×{k}", a.0);
    }
    let Some(end) = last(m, n, c.1) else {
        return Ok(false);
    };
    anyhow::ensure!(end < c.0, "{what}: output of {} values for {m}×{n}", c.0);
    Ok(true)
}

/// What a product runs with once its operands are checked: the threads, and GELU's `erf`.
pub struct Start {
    pub pool: Option<std::sync::Arc<rayon::ThreadPool>>,
    pub erf: Option<Box<dyn tract_linalg::element_wise::ElementWise<f32>>>,
}

impl std::fmt::Debug for Start {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pool: {}, gelu: {}",
            self.pool.is_some(),
            self.erf.is_some()
        )
    }
}

/// Checks a product's operands as [`check_extents`] does, and finds what it runs with: `None`
/// when there is nothing to compute.
pub fn start(
    what: &str,
    a: (usize, Strides),
    c: (usize, Strides),
    extents: (usize, usize, usize),
    gelu: bool,
) -> anyhow::Result<Option<Start>> {
    if !check_extents(what, a, c, extents)? {
        return Ok(None);
    }
    Ok(Some(Start {
        pool: current_pool(),
        erf: crate::kernels::gelu::erf_if(gelu)?,
    }))
}

/// The thread pool of tract's current executor, if it has one.
pub fn current_pool() -> Option<std::sync::Arc<rayon::ThreadPool>> {
    match current_tract_executor() {
        Executor::MultiThread(pool) => Some(pool),
        _ => None,
    }
}

/// The first `len` values of a scratch buffer, grown with zeros as needed (what it held before
/// is kept, not cleared).
pub fn grown<T: Clone + Default>(buffer: &mut Vec<T>, len: usize) -> &mut [T] {
    if buffer.len() < len {
        buffer.resize(len, T::default());
    }
    &mut buffer[..len]
}

/// Calls `f((t, panel))` on each panel `t` of `size` values of `packed`: spread over `pool`
/// when there is one and more than one panel, else in turn on this thread.
pub fn for_each_panel<T: Send>(
    packed: &mut [T],
    size: usize,
    pool: Option<&rayon::ThreadPool>,
    f: impl Fn((usize, &mut [T])) + Send + Sync,
) {
    match pool {
        Some(pool) if packed.len() > size => {
            pool.install(|| packed.par_chunks_exact_mut(size).enumerate().for_each(f))
        }
        _ => packed.chunks_exact_mut(size).enumerate().for_each(f),
    }
}

/// The part of a product's output that one group of consecutive weight panels writes.
enum Columns<'c> {
    /// Row-major output: each row's piece, from the group's first column.
    Rows(Vec<&'c mut [f32]>),
    /// Column-major output (rows one apart, columns `col` apart): the group's columns, from its
    /// first.
    Block(&'c mut [f32], usize),
    /// Any layout: the whole output, written by one group alone.
    Whole(&'c mut [f32], Strides),
}

impl Columns<'_> {
    /// Writes `rows × cols` of `acc` as rows `t·MR..` and the columns from `first` of this part.
    fn store(&mut self, acc: &Acc, t: usize, first: usize, (rows, cols): (usize, usize)) {
        match self {
            Columns::Rows(pieces) => {
                for (piece, row) in pieces[t * MR..].iter_mut().zip(acc).take(rows) {
                    piece[first..first + cols].copy_from_slice(&row[..cols]);
                }
            }
            Columns::Block(block, col) => {
                for j in 0..cols {
                    let column = &mut block[(first + j) * *col + t * MR..][..rows];
                    for (v, row) in column.iter_mut().zip(acc) {
                        *v = row[j];
                    }
                }
            }
            Columns::Whole(c, s) => {
                let at = |r: usize, j: usize| (t * MR + r) * s.row + (first + j) * s.col;
                if s.col == 1 {
                    for (r, row) in acc.iter().enumerate().take(rows) {
                        c[at(r, 0)..][..cols].copy_from_slice(&row[..cols]);
                    }
                } else {
                    for j in 0..cols {
                        for (r, row) in acc.iter().enumerate().take(rows) {
                            c[at(r, j)] = row[j];
                        }
                    }
                }
            }
        }
    }
}

/// Splits an `m × n` output laid out as `s` says into the disjoint parts that the groups of
/// panels `groups` (consecutive, from panel 0, covering every column) write; `None` for a
/// layout whose groups' columns cannot be told apart by slicing (one group then writes all).
fn split_columns<'c>(
    c: &'c mut [f32],
    s: Strides,
    (m, n): (usize, usize),
    groups: &[(usize, usize)],
) -> Option<Vec<Columns<'c>>> {
    let width = |&(p0, p1): &(usize, usize)| (p1 * NR).min(n) - p0 * NR;
    if s.col == 1 && (m == 1 || s.row >= n) {
        let mut parts: Vec<Vec<&mut [f32]>> =
            groups.iter().map(|_| Vec::with_capacity(m)).collect();
        let rows: Vec<&mut [f32]> = if m == 1 {
            vec![c]
        } else {
            c.chunks_mut(s.row).take(m).collect()
        };
        for row in rows {
            let mut rest = &mut row[..n];
            for (part, g) in parts.iter_mut().zip(groups) {
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(width(g));
                part.push(piece);
                rest = tail;
            }
        }
        Some(parts.into_iter().map(Columns::Rows).collect())
    } else if s.row == 1 && (n == 1 || s.col >= m) {
        let mut parts = Vec::with_capacity(groups.len());
        let mut rest = c;
        for (i, g) in groups.iter().enumerate() {
            let len = if i + 1 == groups.len() {
                rest.len()
            } else {
                width(g) * s.col
            };
            let (block, tail) = std::mem::take(&mut rest).split_at_mut(len);
            parts.push(Columns::Block(block, s.col));
            rest = tail;
        }
        Some(parts)
    } else {
        None
    }
}

/// Runs `tile` over every weight panel of an `m × n` product whose activations are `packed`
/// (panels of [`Tile::a_panel_len`] values), then GELU (`erf`, tract's kernel) if given, and
/// stores each tile in `c`, laid out as `cs` says (checked by the caller to hold `m × n`).
/// Panels split over `pool`'s threads, in groups of consecutive panels.
#[allow(clippy::too_many_arguments)]
pub fn run_panels<T: Tile>(
    tile: &T,
    packed: &[T::A],
    (m, n): (usize, usize),
    erf: Option<&dyn tract_linalg::element_wise::ElementWise<f32>>,
    c: &mut [f32],
    cs: Strides,
    pool: Option<&rayon::ThreadPool>,
) -> anyhow::Result<()> {
    let size = tile.a_panel_len();
    let panels = n.div_ceil(NR);
    let run = |(p0, p1): (usize, usize), mut out: Columns| -> anyhow::Result<()> {
        for p in p0..p1 {
            let cols = (n - p * NR).min(NR);
            let panel = tile.panel(p);
            for (t, ap) in packed.chunks_exact(size.max(1)).enumerate() {
                let rows = (m - t * MR).min(MR);
                let mut acc = [[0f32; NR]; MR];
                tile.tile(&panel, ap, &mut acc);
                if let Some(erf) = erf {
                    crate::kernels::gelu::apply(acc.as_flattened_mut(), erf, tile.vector())?;
                }
                out.store(&acc, t, (p - p0) * NR, (rows, cols));
            }
        }
        Ok(())
    };
    let whole = [(0, panels)];
    let Some(pool) = pool.filter(|_| panels > 1) else {
        return run(whole[0], Columns::Whole(c, cs));
    };
    // A few groups a thread, so that a thread held up elsewhere leaves its share to others.
    let count = panels.min(4 * pool.current_num_threads().max(1));
    let groups: Vec<(usize, usize)> = (0..count)
        .map(|g| (g * panels / count, (g + 1) * panels / count))
        .collect();
    match split_columns(c, cs, (m, n), &groups) {
        Some(parts) => pool.install(|| {
            groups
                .into_par_iter()
                .zip(parts)
                .try_for_each(|(g, part)| run(g, part))
        }),
        None => run(whole[0], Columns::Whole(c, cs)),
    }
}

/// A new float32 tensor of `shape` (of `values` values), filled by `fill`.
pub fn output_tensor(
    what: &str,
    shape: &[usize],
    values: usize,
    fill: impl FnOnce(&mut [f32]) -> anyhow::Result<()>,
) -> anyhow::Result<tract_onnx::prelude::Tensor> {
    let volume: usize = shape.iter().product();
    anyhow::ensure!(
        volume == values,
        "{what}: an output of shape {shape:?} for {values} values"
    );
    let mut out = tract_onnx::prelude::Tensor::zero::<f32>(shape)?;
    {
        let mut ram = out.try_as_plain_ram_mut()?;
        fill(ram.as_slice_mut::<f32>()?)?;
    }
    Ok(out)
}
