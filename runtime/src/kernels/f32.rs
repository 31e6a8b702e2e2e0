//! Float32 matrix products against constant weights packed once at load: `c = a · w + bias`,
//! for the linear layers of a ViT in tract plans (`crate::accel::ops::product`).
//!
//! The weights are packed in panels of [`NR`] columns, `[n / NR][k][NR]`; the activations per
//! product in panels of [`MR`] rows, `[m / MR][k][MR]`, from whatever strides they have. The
//! AVX-512 tile (`x86_64/avx512.rs`) and the portable one here give the same sums, in the same
//! order, as do the AVX2 tile (`x86_64/avx2.rs`) and the portable one.

use crate::kernels::driver::{self, Acc, Aligned, Ending, Strides, Tile, MR, NR};

/// A `k × n` weight matrix in panels of [`NR`] columns (the last zero-padded), and its bias
/// (zero when there is none), padded alike.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeights {
    pub k: usize,
    pub n: usize,
    panels: Aligned<f32>,
    /// The bias and GELU the tiles fold in.
    pub end: Ending,
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
            end: Ending::new(n),
        }
    }

    pub(crate) fn panel(&self, p: usize) -> &[f32] {
        &self.panels[p * self.k * NR..(p + 1) * self.k * NR]
    }
}

/// Which tile computes the float32 products.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum F32Tile {
    /// AVX-512F intrinsics: only made where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    Avx512(crate::kernels::x86_64::avx512::Avx512),
    /// AVX2 and FMA intrinsics: only made where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    Avx2(crate::kernels::x86_64::avx2::Avx2),
    /// Plain Rust, on any CPU.
    Portable,
}

impl std::fmt::Debug for F32Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl F32Tile {
    /// The tile's instruction set, as `MAE_KERNELS` spells it: its vector level's.
    pub fn name(self) -> &'static str {
        self.vector().name()
    }

    /// The vector code that goes with this tile (attention's softmax).
    pub fn vector(self) -> crate::kernels::vector::Vector {
        use crate::kernels::vector::Vector;
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512(cpu) => Vector::Avx512(cpu),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(cpu) => Vector::Avx2(cpu),
            Self::Portable => Vector::Portable,
        }
    }

    /// The AVX2 tile, where this CPU runs it.
    pub fn avx2() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            crate::kernels::x86_64::avx2::Avx2::detect().map(Self::Avx2)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// The AVX-512 tile, where this CPU runs it.
    pub fn avx512() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            crate::kernels::x86_64::avx512::Avx512::detect().map(Self::Avx512)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// `acc = bias + a · w`: `a` one activation panel (`k · MR` values), `w` one weight panel
    /// (`k · NR`).
    pub(crate) fn run(self, a: &[f32], w: &[f32], k: usize, bias: &[f32; NR], acc: &mut Acc) {
        assert!(a.len() >= k * MR && w.len() >= k * NR, "tile: short panels");
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512(cpu) => cpu.f32_tile(a, w, k, bias, acc),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(cpu) => cpu.f32_tile(a, w, k, bias, acc),
            Self::Portable => portable_tile(a, w, k, bias, acc),
        }
    }
}

/// One tile: `acc[r][j] = bias[j] + Σ_kk a[kk][r] · w[kk][j]`, in order of kk.
fn portable_tile(a: &[f32], w: &[f32], k: usize, bias: &[f32; NR], acc: &mut Acc) {
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

/// The float32 product as a [`Tile`] of the driver.
struct Panels<'w> {
    w: &'w PackedWeights,
    tile: F32Tile,
}

impl<'w> Tile for Panels<'w> {
    type A = f32;
    type Panel<'a>
        = (&'a [f32], &'a [f32; NR])
    where
        Self: 'a;

    fn a_panel_len(&self) -> usize {
        self.w.k * MR
    }

    fn panel(&self, p: usize) -> Self::Panel<'_> {
        (self.w.panel(p), self.w.end.bias(p))
    }

    fn tile<'a>(&'a self, (wp, bias): &Self::Panel<'a>, a: &[f32], acc: &mut Acc) {
        self.tile.run(a, wp, self.w.k, bias, acc);
    }

    fn vector(&self) -> crate::kernels::vector::Vector {
        self.tile.vector()
    }
}

thread_local! {
    /// The packed activations of the last product on this thread, kept for the next.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `c = a · w + bias`, then GELU if `w.end.gelu`: `a` is `m × w.k` laid out as `a_strides` says,
/// `c` is `m × w.n` laid out as `c_strides` says. Every element of `c` is written. Fails
/// (instead of reading or writing out of bounds) when a slice is too short for its shape and
/// strides.
pub fn product(
    a: &[f32],
    m: usize,
    a_strides: Strides,
    w: &PackedWeights,
    c: &mut [f32],
    c_strides: Strides,
    tile: F32Tile,
) -> anyhow::Result<()> {
    let (k, n) = (w.k, w.n);
    let (a_at, c_at) = ((a.len(), a_strides), (c.len(), c_strides));
    let Some(start) = driver::start("dense product", a_at, c_at, (m, k, n), w.end.gelu)? else {
        return Ok(());
    };
    let (pool, erf) = (start.pool.as_deref(), start.erf.as_deref());
    SCRATCH.with_borrow_mut(|packed| -> anyhow::Result<()> {
        pack_rows(a, m, k, a_strides, packed, pool);
        let packed = &packed[..m.div_ceil(MR) * k * MR];
        let tiles = Panels { w, tile };
        driver::run_panels(&tiles, packed, (m, n), erf, c, c_strides, pool)
    })
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
    driver::grown(packed, len);
    let size = k * MR;
    if size == 0 {
        return;
    }
    let packed = &mut packed[..len];
    driver::for_each_panel(packed, size, pool, |(t, p)| pack_panel(a, m, k, s, t, p));
}

/// Packs rows `t·MR..` of `a` into `panel`.
pub(crate) fn pack_panel(a: &[f32], m: usize, k: usize, s: Strides, t: usize, panel: &mut [f32]) {
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
    tile: F32Tile,
) -> anyhow::Result<tract_onnx::prelude::Tensor> {
    driver::output_tensor("dense product", shape, m * w.n, |c| {
        product(a, m, a_strides, w, c, c_strides, tile)
    })
}
