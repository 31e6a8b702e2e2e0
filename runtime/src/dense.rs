//! Float32 matrix products against constant weights packed once at load: `c = a · w + bias`,
//! for the linear layers of a ViT in tract plans (see `tract_rewrite::dense_products`).
//!
//! The weights are packed in panels of [`NR`] columns, `[n / NR][k][NR]`, so that a tile of
//! [`MR`] rows by [`NR`] columns streams one contiguous panel while its accumulators stay in
//! registers; the activations are packed per product in panels of [`MR`] rows, `[m / MR][k][MR]`,
//! from whatever strides they have. Work splits over the weight panels, on the thread pool of
//! tract's current executor. On CPUs with AVX-512F the tile is written with its intrinsics; the
//! portable tile gives the same sums (in the same order) everywhere else.
//!
//! The tiles and the threads' shared output need `unsafe` (intrinsics, raw writes to disjoint
//! columns); each use states what makes it sound.
#![allow(unsafe_code)]

use rayon::prelude::*;
use tract_linalg::multithread::{current_tract_executor, Executor};

/// Columns of one weight panel (two 16-lane vectors).
pub const NR: usize = 32;
/// Rows of one activation panel.
pub const MR: usize = 12;

/// Where element `(row, col)` of a matrix lies in its slice: `row * self.row + col * self.col`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Strides {
    pub row: usize,
    pub col: usize,
}

/// Values of a plain numeric type whose every bit pattern is valid, so a zeroed buffer of
/// bytes holds zeros of it.
pub(crate) trait Plain: Copy + PartialEq {}
impl Plain for f32 {}
impl Plain for i8 {}

/// One 64-byte cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A zeroed buffer of `len` values that starts on a cache line, so that the tiles' 64-byte
/// loads of weight panels (each a whole number of lines long) never straddle two lines.
#[derive(Clone)]
pub(crate) struct Aligned<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

impl<T: Plain> Aligned<T> {
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        Self {
            lines: vec![Line([0; 64]); bytes.div_ceil(64)],
            len,
            _values: std::marker::PhantomData,
        }
    }
}

impl<T: Plain> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least `len` values of `T` (a plain type, valid for any
        // bytes, whose alignment divides 64), owned by `self` and borrowed with it.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<T>(), self.len) }
    }
}

impl<T: Plain> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, borrowed mutably with `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<T>(), self.len) }
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

/// A `k × n` weight matrix in panels of [`NR`] columns (the last zero-padded), and its bias
/// (zero when there is none), padded alike.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeights {
    pub k: usize,
    pub n: usize,
    panels: Aligned<f32>,
    bias: Vec<f32>,
    /// Exact (erf) GELU applied to the sums, as the layer's activation.
    pub gelu: bool,
}

impl PackedWeights {
    /// Packs the weights `at(kk, j)` for `kk < k`, `j < n`.
    pub fn new(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let count = n.div_ceil(NR);
        let mut panels = Aligned::zeroed(count * k * NR);
        for (p, panel) in panels.chunks_exact_mut(k * NR.max(1)).enumerate() {
            let cols = (n - p * NR).min(NR);
            for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
                for (c, v) in row[..cols].iter_mut().enumerate() {
                    *v = at(kk, p * NR + c);
                }
            }
        }
        Self {
            k,
            n,
            panels,
            bias: vec![0f32; count * NR],
            gelu: false,
        }
    }

    /// Packs `scale · src[kk·s.row + j·s.col]`, read in the order of `src`'s shorter stride.
    pub fn from_strided(
        k: usize,
        n: usize,
        src: &[f32],
        s: Strides,
        scale: f32,
    ) -> anyhow::Result<Self> {
        if k > 0 && n > 0 {
            let end = (k - 1) * s.row + (n - 1) * s.col;
            anyhow::ensure!(
                end < src.len(),
                "packing {k}×{n} weights from {} values",
                src.len()
            );
        }
        let count = n.div_ceil(NR);
        let mut panels = Aligned::zeroed(count * k * NR);
        for (p, panel) in panels.chunks_exact_mut(k * NR.max(1)).enumerate() {
            let cols = (n - p * NR).min(NR);
            if s.col <= s.row {
                for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
                    let start = kk * s.row + p * NR * s.col;
                    for (c, v) in row[..cols].iter_mut().enumerate() {
                        *v = scale * src[start + c * s.col];
                    }
                }
            } else {
                for c in 0..cols {
                    let start = (p * NR + c) * s.col;
                    for kk in 0..k {
                        panel[kk * NR + c] = scale * src[start + kk * s.row];
                    }
                }
            }
        }
        Ok(Self {
            k,
            n,
            panels,
            bias: vec![0f32; count * NR],
            gelu: false,
        })
    }

    /// Adds `bias[j]` to every row's column `j`.
    pub fn add_bias(&mut self, bias: &[f32]) {
        for (b, v) in self.bias.iter_mut().zip(bias) {
            *b += v;
        }
    }

    fn panel(&self, p: usize) -> &[f32] {
        &self.panels[p * self.k * NR..(p + 1) * self.k * NR]
    }
}

/// Whether this CPU runs the AVX-512 tile.
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which tile computes the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// AVX-512F intrinsics (only where [`avx512`] holds).
    Avx512,
    /// Plain Rust, on any CPU.
    Portable,
}

impl Tile {
    /// The fastest tile this CPU runs.
    pub fn native() -> Self {
        if avx512() {
            Self::Avx512
        } else {
            Self::Portable
        }
    }
}

/// A raw output pointer shared by the threads that write disjoint columns of it.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: each thread writes only the columns of its own weight panels (see `product` and
// `qdense::quant_product`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer `i` values on (through a method, so closures capture the whole wrapper).
    ///
    /// # Safety
    /// `i` must be within the output slice.
    pub(crate) unsafe fn at(self, i: usize) -> *mut f32 {
        // SAFETY: as the caller guarantees.
        unsafe { self.0.add(i) }
    }
}

/// `c = a · w + bias`, then GELU if `w.gelu`: `a` is `m × w.k` laid out as `a_strides` says,
/// `c` is `m × w.n` laid out as `c_strides` says. Every element of `c` is written. Fails (instead of reading or
/// writing out of bounds) when a slice is too short for its shape and strides.
pub fn product(
    a: &[f32],
    m: usize,
    a_strides: Strides,
    w: &PackedWeights,
    c: &mut [f32],
    c_strides: Strides,
    tile: Tile,
) -> anyhow::Result<()> {
    let pool = current_pool();
    product_on(a, m, a_strides, w, c, c_strides, tile, pool.as_deref())
}

/// As [`product`], its weight panels split over `pool`'s threads, or all on this thread.
#[allow(clippy::too_many_arguments)]
fn product_on(
    a: &[f32],
    m: usize,
    a_strides: Strides,
    w: &PackedWeights,
    c: &mut [f32],
    c_strides: Strides,
    tile: Tile,
    pool: Option<&rayon::ThreadPool>,
) -> anyhow::Result<()> {
    let (k, n) = (w.k, w.n);
    let extents = (m, k, n);
    if !check_extents(
        "dense product",
        (a.len(), a_strides),
        (c.len(), c_strides),
        extents,
    )? {
        return Ok(());
    }
    anyhow::ensure!(
        tile == Tile::Portable || avx512(),
        "dense product: this CPU has no AVX-512F"
    );
    let erf = gelu_erf(w.gelu)?;
    SCRATCH.with_borrow_mut(|packed| -> anyhow::Result<()> {
        pack_rows(a, m, k, a_strides, packed, pool);
        let packed = &packed[..m.div_ceil(MR) * k * MR];
        let out = Out(c.as_mut_ptr());
        let panels = n.div_ceil(NR);
        let run = |p: usize| -> anyhow::Result<()> {
            let cols = (n - p * NR).min(NR);
            let wp = w.panel(p);
            let bias: &[f32; NR] = w.bias[p * NR..(p + 1) * NR].try_into().expect("NR values");
            for (t, ap) in packed.chunks_exact(k * MR).enumerate() {
                let rows = (m - t * MR).min(MR);
                let mut acc = [[0f32; NR]; MR];
                match tile {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX-512F was checked above; the panels hold k·MR and k·NR values.
                    Tile::Avx512 => unsafe { avx512_tile(ap, wp, k, bias, &mut acc) },
                    _ => portable_tile(ap, wp, k, bias, &mut acc),
                }
                if let Some(erf) = &erf {
                    gelu(acc.as_flattened_mut(), &**erf)?;
                }
                // SAFETY: rows t·MR.. of m and columns p·NR.. of n lie within `c`, as checked;
                // no other thread writes this panel's columns.
                unsafe { store_tile(out, &acc, (t, p), (rows, cols), c_strides) };
            }
            Ok(())
        };
        match pool {
            Some(pool) if panels > 1 => {
                pool.install(|| (0..panels).into_par_iter().try_for_each(run))
            }
            _ => (0..panels).try_for_each(run),
        }
    })?;
    Ok(())
}

/// Checks that an `m × k` input and an `m × n` output (`extents`) lie within slices of
/// `a.0` and `c.0` values at strides `a.1` and `c.1`; `what` names the product in the errors.
/// False when the output is empty (nothing to compute).
pub(crate) fn check_extents(
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

/// Writes `rows × cols` of a tile's `acc` as rows `t·MR..` and columns `p·NR..` of the output
/// at `out`, laid out as `c` says.
///
/// # Safety
/// Every index written must lie within the output, and no other thread may write these
/// columns meanwhile.
pub(crate) unsafe fn store_tile(
    out: Out,
    acc: &[[f32; NR]; MR],
    (t, p): (usize, usize),
    (rows, cols): (usize, usize),
    c: Strides,
) {
    let at = |r: usize, j: usize| (t * MR + r) * c.row + (p * NR + j) * c.col;
    if c.col == 1 {
        for (r, row) in acc.iter().enumerate().take(rows) {
            // SAFETY (each write here): as the caller guarantees.
            let dst = unsafe { out.at(at(r, 0)) };
            if cols == NR {
                // A whole row: a copy of known size.
                unsafe { (dst as *mut [f32; NR]).write_unaligned(*row) };
            } else {
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst, cols) };
            }
        }
    } else {
        for j in 0..cols {
            for (r, row) in acc.iter().enumerate().take(rows) {
                // SAFETY: as the caller guarantees.
                unsafe { *out.at(at(r, j)) = row[j] };
            }
        }
    }
}

/// The thread pool of tract's current executor, if it has one.
pub(crate) fn current_pool() -> Option<std::sync::Arc<rayon::ThreadPool>> {
    match current_tract_executor() {
        Executor::MultiThread(pool) => Some(pool),
        _ => None,
    }
}

/// tract's `erf` kernel, for layers that end in GELU (`gelu`), else none.
pub(crate) fn gelu_erf(
    gelu: bool,
) -> anyhow::Result<Option<Box<dyn tract_linalg::element_wise::ElementWise<f32>>>> {
    Ok(if gelu {
        Some(tract_linalg::routines::Func::Erf.ew_f32()?)
    } else {
        None
    })
}

/// `x · ½ · (1 + erf(x / √2))` in place, with tract's vectorised `erf`.
pub(crate) fn gelu(
    xs: &mut [f32],
    erf: &dyn tract_linalg::element_wise::ElementWise<f32>,
) -> anyhow::Result<()> {
    let mut e = [0f32; MR * NR];
    for chunk in xs.chunks_mut(MR * NR) {
        let e = &mut e[..chunk.len()];
        for (e, x) in e.iter_mut().zip(chunk.iter()) {
            *e = *x * std::f32::consts::FRAC_1_SQRT_2;
        }
        erf.run(e)?;
        for (x, e) in chunk.iter_mut().zip(e.iter()) {
            *x = (*x * 0.5) * (*e + 1.0);
        }
    }
    Ok(())
}

thread_local! {
    /// The packed activations of the last product on this thread, kept for the next.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Packs `a` (`m × k`) into the start of `packed`, grown as needed, in panels of [`MR`] rows,
/// `[m / MR][k][MR]`. The last panel's rows past `m` keep whatever they held: their sums are
/// computed and never stored.
fn pack_rows(
    a: &[f32],
    m: usize,
    k: usize,
    s: Strides,
    packed: &mut Vec<f32>,
    pool: Option<&rayon::ThreadPool>,
) {
    let len = m.div_ceil(MR) * k * MR;
    if packed.len() < len {
        packed.resize(len, 0.0);
    }
    let size = k * MR;
    if size == 0 {
        return;
    }
    let packed = &mut packed[..len];
    for_each_panel(packed, size, pool, |(t, p)| pack_panel(a, m, k, s, t, p));
}

/// Calls `f((t, panel))` on each panel `t` of `size` values of `packed`: spread over `pool`
/// when there is one and more than one panel, else in turn on this thread.
pub(crate) fn for_each_panel<T: Send>(
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

/// Packs rows `t·MR..` of `a` into `panel`.
fn pack_panel(a: &[f32], m: usize, k: usize, s: Strides, t: usize, panel: &mut [f32]) {
    let rows = (m - t * MR).min(MR);
    if s.row == 1 {
        // Rows contiguous: each kk copies a run of `rows` values.
        for (kk, dst) in panel.chunks_exact_mut(MR).enumerate() {
            let start = t * MR + kk * s.col;
            dst[..rows].copy_from_slice(&a[start..start + rows]);
        }
    } else if s.col == 1 {
        // Each row contiguous: a transpose, read along the rows.
        let src: Vec<&[f32]> = (0..rows).map(|r| &a[(t * MR + r) * s.row..][..k]).collect();
        for (kk, dst) in panel.chunks_exact_mut(MR).enumerate() {
            for (d, row) in dst.iter_mut().zip(&src) {
                *d = row[kk];
            }
        }
    } else {
        for r in 0..rows {
            let base = (t * MR + r) * s.row;
            for kk in 0..k {
                panel[kk * MR + r] = a[base + kk * s.col];
            }
        }
    }
}

/// `a · w + bias` as a new tensor of `shape`, which holds the product's `m × w.n` values at
/// `c_strides` and nothing else.
pub fn product_tensor(
    a: &[f32],
    m: usize,
    a_strides: Strides,
    w: &PackedWeights,
    shape: &[usize],
    c_strides: Strides,
    tile: Tile,
) -> anyhow::Result<tract_onnx::prelude::Tensor> {
    // SAFETY: `product` writes every one of the m·n values (it checks the strides first and
    // fails before writing anything).
    unsafe {
        output_tensor("dense product", shape, m * w.n, |c| {
            product(a, m, a_strides, w, c, c_strides, tile)
        })
    }
}

/// A new float32 tensor of `shape` (of `values` values), filled by `fill`.
///
/// # Safety
/// `fill` must write every value of its slice, or fail; the tensor starts uninitialized (as
/// float32 has no invalid bit patterns, unwritten values would only be garbage, never unsound
/// to read, but they must not reach a caller).
pub(crate) unsafe fn output_tensor(
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
    // SAFETY: as the caller guarantees, `fill` writes every value before the tensor is
    // returned.
    let mut out = unsafe { tract_onnx::prelude::Tensor::uninitialized::<f32>(shape)? };
    {
        let mut ram = out.try_as_plain_ram_mut()?;
        fill(ram.as_slice_mut::<f32>()?)?;
    }
    Ok(out)
}

/// Multi-head self-attention over one image's `qkv` (`tokens × 3·heads·dim`, token-major: the
/// queries, then the keys, then the values, each head's `dim` values together), into `out`
/// (`tokens × heads·dim`, token-major): per head, `softmax(scale · q·kᵀ) · v`.
///
/// Each head runs transposed, by blocks of [`NR`] queries, on the tiles of the linear layers:
/// the scores `k · (scale · q)ᵀ` of a block come out as `tokens × NR`, which is already the
/// weight layout of the second product `vᵀ · p`, so nothing is packed between the two; the
/// softmax runs down the columns (its exponential on tract's own kernel) and divides the
/// outputs by its sums. Heads split over the thread pool of tract's current executor.
pub fn attention(
    qkv: &[f32],
    tokens: usize,
    heads: usize,
    dim: usize,
    scale: f32,
    out: &mut [f32],
    tile: Tile,
) -> anyhow::Result<()> {
    let width = heads * dim;
    anyhow::ensure!(
        qkv.len() == tokens * 3 * width && out.len() == tokens * width,
        "attention: {} and {} values for {tokens} tokens of {heads} heads × {dim}",
        qkv.len(),
        out.len()
    );
    anyhow::ensure!(
        tile == Tile::Portable || avx512(),
        "attention: this CPU has no AVX-512F"
    );
    if tokens == 0 || width == 0 {
        return Ok(());
    }
    let exp = tract_linalg::routines::Func::Softmax2.map_reduce_f32()?;
    let row = Strides {
        row: 3 * width,
        col: 1,
    };
    let dst = Out(out.as_mut_ptr());
    let one_head = |h: usize| -> anyhow::Result<()> {
        // The keys as row panels (`tokens × dim`), the values transposed (`dim × tokens`).
        let mut keys = vec![0f32; tokens.div_ceil(MR) * dim * MR];
        for (t, p) in keys.chunks_exact_mut(dim * MR).enumerate() {
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
            for (t, kp) in keys.chunks_exact(dim * MR).enumerate() {
                run_tile(tile, kp, &queries, dim, &zero, &mut acc);
                let rows = (tokens - t * MR).min(MR);
                for (r, a) in acc.iter().enumerate().take(rows) {
                    scores[(t * MR + r) * NR..][..NR].copy_from_slice(a);
                }
            }
            let inv = softmax_columns(&mut scores, &*exp, tile)?;
            // The outputs, transposed: `dim × NR`, each row one of the head's values.
            for (t, vp) in values.chunks_exact(tokens * MR).enumerate() {
                run_tile(tile, vp, &scores, tokens, &zero, &mut acc);
                let rows = (dim - t * MR).min(MR);
                for a in acc.iter_mut() {
                    for (v, i) in a.iter_mut().zip(&inv) {
                        *v *= i;
                    }
                }
                for j in 0..cols {
                    let at = (first + j) * width + h * dim + t * MR;
                    for (r, a) in acc.iter().enumerate().take(rows) {
                        // SAFETY: token first + j < tokens and h·dim + t·MR + r < width, so
                        // the index is within `out`; only this head writes its columns.
                        unsafe { *dst.at(at + r) = a[j] };
                    }
                }
            }
        }
        Ok(())
    };
    match current_tract_executor() {
        Executor::MultiThread(pool) => {
            pool.install(|| (0..heads).into_par_iter().try_for_each(one_head))
        }
        _ => (0..heads).try_for_each(one_head),
    }
}

/// The softmax down each column of `scores` (`rows × NR`), in place: each value less its
/// column's largest, exponentiated on tract's kernel; returns the inverses of the columns' sums
/// (by which the outputs are then multiplied).
fn softmax_columns(
    scores: &mut [f32],
    exp: &dyn tract_linalg::reduce::MapReduce<f32, f32>,
    tile: Tile,
) -> anyhow::Result<[f32; NR]> {
    #[cfg(target_arch = "x86_64")]
    if tile == Tile::Avx512 {
        // SAFETY: the caller checked AVX-512F for this tile.
        unsafe { subtract_column_max_avx512(scores) };
        exp.run_with_params(scores, 0.0)?;
        // SAFETY: as above.
        return Ok(unsafe { column_sums_avx512(scores) }.map(f32::recip));
    }
    let mut max = [f32::NEG_INFINITY; NR];
    for s in scores.chunks_exact(NR) {
        for (m, v) in max.iter_mut().zip(s) {
            *m = if *v > *m { *v } else { *m };
        }
    }
    for s in scores.chunks_exact_mut(NR) {
        for (v, m) in s.iter_mut().zip(&max) {
            *v -= m;
        }
    }
    exp.run_with_params(scores, 0.0)?;
    let mut sum = [0f32; NR];
    for s in scores.chunks_exact(NR) {
        for (t, v) in sum.iter_mut().zip(s) {
            *t += v;
        }
    }
    Ok(sum.map(f32::recip))
}

/// Each value of `scores` (`rows × NR`) less its column's largest, on AVX-512F.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn subtract_column_max_avx512(scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let (mut m0, mut m1) = (
        _mm512_set1_ps(f32::NEG_INFINITY),
        _mm512_set1_ps(f32::NEG_INFINITY),
    );
    for s in scores.chunks_exact(NR) {
        // SAFETY: each chunk holds NR = 32 values.
        unsafe {
            m0 = _mm512_max_ps(_mm512_loadu_ps(s.as_ptr()), m0);
            m1 = _mm512_max_ps(_mm512_loadu_ps(s.as_ptr().add(16)), m1);
        }
    }
    for s in scores.chunks_exact_mut(NR) {
        let p = s.as_mut_ptr();
        // SAFETY: as above.
        unsafe {
            _mm512_storeu_ps(p, _mm512_sub_ps(_mm512_loadu_ps(p), m0));
            _mm512_storeu_ps(p.add(16), _mm512_sub_ps(_mm512_loadu_ps(p.add(16)), m1));
        }
    }
}

/// The sums of the columns of `scores` (`rows × NR`), on AVX-512F.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn column_sums_avx512(scores: &[f32]) -> [f32; NR] {
    use std::arch::x86_64::*;
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for s in scores.chunks_exact(NR) {
        // SAFETY: each chunk holds NR = 32 values.
        unsafe {
            s0 = _mm512_add_ps(_mm512_loadu_ps(s.as_ptr()), s0);
            s1 = _mm512_add_ps(_mm512_loadu_ps(s.as_ptr().add(16)), s1);
        }
    }
    let mut sum = [0f32; NR];
    // SAFETY: `sum` holds NR = 32 values.
    unsafe {
        _mm512_storeu_ps(sum.as_mut_ptr(), s0);
        _mm512_storeu_ps(sum.as_mut_ptr().add(16), s1);
    }
    sum
}

/// `acc = bias + a · w` on `tile` (checked by the caller to run on this CPU).
fn run_tile(
    tile: Tile,
    a: &[f32],
    w: &[f32],
    k: usize,
    bias: &[f32; NR],
    acc: &mut [[f32; NR]; MR],
) {
    assert!(a.len() >= k * MR && w.len() >= k * NR, "tile: short panels");
    match tile {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked AVX-512F; the panels' lengths were just checked.
        Tile::Avx512 => unsafe { avx512_tile(a, w, k, bias, acc) },
        _ => portable_tile(a, w, k, bias, acc),
    }
}

/// One tile: `acc[r][j] = bias[j] + Σ_kk a[kk][r] · w[kk][j]`, in order of kk.
fn portable_tile(a: &[f32], w: &[f32], k: usize, bias: &[f32; NR], acc: &mut [[f32; NR]; MR]) {
    for row in acc.iter_mut() {
        *row = *bias;
    }
    for (av, wv) in a.chunks_exact(MR).zip(w.chunks_exact(NR)).take(k) {
        for (row, x) in acc.iter_mut().zip(av) {
            for (o, y) in row.iter_mut().zip(wv) {
                *o = x.mul_add(*y, *o);
            }
        }
    }
}

/// The same tile with AVX-512F: `MR × 2` accumulators of 16 lanes.
///
/// # Safety
/// The CPU must have AVX-512F; `a` must hold `k · MR` values and `w` `k · NR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_tile(a: &[f32], w: &[f32], k: usize, bias: &[f32; NR], acc: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= k * MR && w.len() >= k * NR);
    let (ap, wp) = (a.as_ptr(), w.as_ptr());
    let b0 = _mm512_loadu_ps(bias.as_ptr());
    let b1 = _mm512_loadu_ps(bias.as_ptr().add(16));
    let mut lo = [b0; MR];
    let mut hi = [b1; MR];
    for kk in 0..k {
        let w0 = _mm512_loadu_ps(wp.add(kk * NR));
        let w1 = _mm512_loadu_ps(wp.add(kk * NR + 16));
        let ar = ap.add(kk * MR);
        for r in 0..MR {
            let x = _mm512_set1_ps(*ar.add(r));
            lo[r] = _mm512_fmadd_ps(x, w0, lo[r]);
            hi[r] = _mm512_fmadd_ps(x, w1, hi[r]);
        }
    }
    for r in 0..MR {
        _mm512_storeu_ps(acc[r].as_mut_ptr(), lo[r]);
        _mm512_storeu_ps(acc[r].as_mut_ptr().add(16), hi[r]);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32
                    / 1000.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn aligned_buffers_start_on_a_cache_line_and_hold_zeros() {
        for len in [0, 1, 15, 16, 17, 100, 4099] {
            let mut f = Aligned::<f32>::zeroed(len);
            assert_eq!(f.len(), len);
            assert_eq!(f.as_ptr() as usize % 64, 0, "{len} floats");
            assert!(f.iter().all(|&v| v == 0.0));
            f.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
            let g = f.clone();
            assert_eq!(f, g);
            assert_eq!(g.as_ptr() as usize % 64, 0);
            let b = Aligned::<i8>::zeroed(len * 3);
            assert_eq!((b.len(), b.as_ptr() as usize % 64), (len * 3, 0));
        }
        let w = PackedWeights::new(100, 70, |kk, j| (kk * 70 + j) as f32);
        for p in 0..3 {
            assert_eq!(w.panel(p).as_ptr() as usize % 64, 0, "panel {p}");
            assert_eq!(w.panel(p)[NR + 1], (70 + p * NR + 1) as f32);
        }
    }

    /// Checks `tile` on the sizes around the panels' edges, in both layouts of the input and
    /// of the output, against a direct sum in f64.
    fn check_against_a_direct_sum(tile: Tile) {
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 3),
            (12, 16, 32),
            (13, 33, 65),
            (197, 24, 40),
        ] {
            let a = values(m * k, 1);
            let wv = values(k * n, 2);
            let bias = values(n, 3);
            let mut w = PackedWeights::new(k, n, |kk, j| wv[kk * n + j]);
            w.add_bias(&bias);
            let token_major = (Strides { row: k, col: 1 }, a.clone());
            let feature_major = (
                Strides { row: 1, col: m },
                (0..k * m)
                    .map(|x| a[(x % m) * k + x / m])
                    .collect::<Vec<f32>>(),
            );
            for (a_strides, laid) in [token_major, feature_major] {
                for c_strides in [Strides { row: n, col: 1 }, Strides { row: 1, col: m }] {
                    let mut c = vec![f32::NAN; m * n];
                    product(&laid, m, a_strides, &w, &mut c, c_strides, tile).unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let sum: f64 = (0..k)
                                .map(|kk| a[i * k + kk] as f64 * wv[kk * n + j] as f64)
                                .sum();
                            let want = bias[j] as f64 + sum;
                            let got = c[i * c_strides.row + j * c_strides.col] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{tile:?} {m}×{k}×{n}, a {a_strides:?}, c {c_strides:?}, \
                                 ({i}, {j}): {got} against {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_portable_tile_matches_a_direct_sum_in_every_layout() {
        check_against_a_direct_sum(Tile::Portable);
    }

    #[test]
    #[cfg_attr(not(host_avx512), ignore = "needs a CPU with AVX-512F")]
    fn the_avx512_tile_matches_a_direct_sum_and_the_portable_tile() {
        check_against_a_direct_sum(Tile::Avx512);
        let (m, k, n) = (29, 300, 70);
        let a = values(m * k, 4);
        let wv = values(k * n, 5);
        let w = PackedWeights::new(k, n, |kk, j| wv[kk * n + j]);
        let s = Strides { row: k, col: 1 };
        let cs = Strides { row: n, col: 1 };
        let mut x = vec![0f32; m * n];
        let mut y = vec![0f32; m * n];
        product(&a, m, s, &w, &mut x, cs, Tile::Avx512).unwrap();
        product(&a, m, s, &w, &mut y, cs, Tile::Portable).unwrap();
        assert_eq!(x, y, "the tiles sum in the same order");
    }

    /// Checks [`attention`] on `tile` against a direct softmax in f64, on sizes that cross the
    /// query blocks, the key panels and the value panels with partial ones.
    fn check_attention(tile: Tile) {
        for &(tokens, heads, dim) in &[(1, 1, 1), (13, 3, 8), (70, 2, 20), (33, 1, 12)] {
            let width = heads * dim;
            let qkv: Vec<f32> = values(tokens * 3 * width, 7)
                .iter()
                .map(|v| v * 3.0)
                .collect();
            let scale = 0.3f32;
            let mut out = vec![f32::NAN; tokens * width];
            attention(&qkv, tokens, heads, dim, scale, &mut out, tile).unwrap();
            let at = |t: usize, part: usize, h: usize, d: usize| {
                qkv[t * 3 * width + part * width + h * dim + d] as f64
            };
            for h in 0..heads {
                for i in 0..tokens {
                    let s: Vec<f64> = (0..tokens)
                        .map(|j| {
                            (0..dim)
                                .map(|d| at(i, 0, h, d) * at(j, 1, h, d))
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..dim {
                        let want: f64 = (0..tokens).map(|j| e[j] / sum * at(j, 2, h, d)).sum();
                        let got = out[i * width + h * dim + d] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{tile:?} {tokens}×{heads}×{dim}, token {i}, head {h}, {d}: \
                             {got} against {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn attention_on_the_portable_tile_matches_a_direct_softmax() {
        check_attention(Tile::Portable);
    }

    #[test]
    #[cfg_attr(not(host_avx512), ignore = "needs a CPU with AVX-512F")]
    fn attention_on_the_avx512_tile_matches_a_direct_softmax() {
        check_attention(Tile::Avx512);
    }

    #[test]
    fn short_slices_are_refused() {
        let w = PackedWeights::new(4, 3, |_, _| 1.0);
        let mut c = vec![0f32; 6];
        let err = product(
            &[1.0; 7],
            2,
            Strides { row: 4, col: 1 },
            &w,
            &mut c,
            Strides { row: 3, col: 1 },
            Tile::Portable,
        )
        .unwrap_err();
        assert!(err.to_string().contains("input of 7 values"), "{err}");
        let err = product(
            &[1.0; 8],
            2,
            Strides { row: 4, col: 1 },
            &w,
            &mut c[..5],
            Strides { row: 3, col: 1 },
            Tile::Portable,
        )
        .unwrap_err();
        assert!(err.to_string().contains("output of 5 values"), "{err}");
    }
}
