//! Int8 matrix products against constant weights packed once at load, for the quantized linear
//! layers of a ViT in tract plans (`crate::accel::ops::product`): the float32 activations are
//! quantized to uint8 ([`crate::kernels::quantize`]), multiplied by int8 weights with 32-bit
//! sums, and the sums are scaled back to float32 per column, with the bias and an exact GELU
//! folded into the store.
//!
//! The numbers are those of tract's own plan for the same graph: the same quantized values,
//! exact integer sums (in any order), then `(sum as f32) · scale[j] + bias[j]`.
//!
//! The weights are packed in panels of [`NR`] columns by groups of four rows,
//! `[n / NR][k / 4][NR][4]`, the activations in panels of [`MR`] rows, `[m / MR][k / 4][MR][4]`:
//! one AVX-512 VNNI instruction (`x86_64/vnni.rs`) multiplies four uint8 values of a row by four
//! int8 weights of each of 16 columns and adds the four products to the column's sum. The
//! portable tile gives the same sums on any CPU.

use crate::kernels::driver::{self, Acc, Aligned, Ending, Strides, Tile, MR, NR};
use crate::kernels::quantize::{ActivationQuant, Quantizer};

/// A `k × n` int8 weight matrix in panels of [`NR`] columns and groups of four rows (the last
/// of each zero-padded), its column sums, each column's scale and bias (padded alike).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedI8 {
    pub k: usize,
    pub n: usize,
    /// Groups of four rows: `k / 4`, rounded up.
    quads: usize,
    panels: Aligned<i8>,
    col_sums: Vec<i32>,
    scales: Vec<f32>,
    /// The bias and GELU the tiles fold in after scaling.
    pub end: Ending,
    pub quant: ActivationQuant,
}

impl PackedI8 {
    /// Packs the weights `at(kk, j)` for `kk < k`, `j < n`, with the columns' scales (`n`
    /// values, or one for all).
    pub fn new(
        k: usize,
        n: usize,
        at: impl Fn(usize, usize) -> i8,
        scales: &[f32],
        quant: ActivationQuant,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            scales.len() == n || scales.len() == 1,
            "int8 product: {} column scales for {n} columns",
            scales.len()
        );
        let count = n.div_ceil(NR);
        let quads = k.div_ceil(4);
        let mut panels = Aligned::zeroed(count * quads * NR * 4);
        let mut col_sums = vec![0i32; count * NR];
        let size = quads * NR * 4;
        for (p, panel) in panels.chunks_exact_mut(size.max(1)).enumerate() {
            let cols = (n - p * NR).min(NR);
            for kk in 0..k {
                for c in 0..cols {
                    let v = at(kk, p * NR + c);
                    panel[((kk / 4) * NR + c) * 4 + kk % 4] = v;
                    col_sums[p * NR + c] += v as i32;
                }
            }
        }
        let mut padded = vec![0f32; count * NR];
        for (j, s) in padded.iter_mut().take(n).enumerate() {
            *s = scales[if scales.len() == 1 { 0 } else { j }];
        }
        Ok(Self {
            k,
            n,
            quads,
            panels,
            col_sums,
            scales: padded,
            end: Ending::new(n),
            quant,
        })
    }

    fn panel(&self, p: usize) -> &[i8] {
        let size = self.quads * NR * 4;
        &self.panels[p * size..(p + 1) * size]
    }
}

/// Which tile computes the integer sums.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum I8Tile {
    /// AVX-512 VNNI intrinsics: only made where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    Vnni(crate::kernels::x86_64::vnni::Vnni),
    /// Plain Rust, on any CPU.
    Portable,
}

impl std::fmt::Debug for I8Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            #[cfg(target_arch = "x86_64")]
            Self::Vnni(_) => "Vnni",
            Self::Portable => "Portable",
        })
    }
}

impl I8Tile {
    /// The AVX-512 VNNI tile, where this CPU runs it.
    pub fn vnni() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            crate::kernels::x86_64::vnni::Vnni::detect().map(Self::Vnni)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }
}

/// How one panel's integer sums become float32: `(sum − offset[j]) as f32 · scale[j] + bias[j]`.
#[derive(Debug)]
pub struct Scaling<'a> {
    pub offset: [i32; NR],
    pub scale: [f32; NR],
    pub bias: &'a [f32; NR],
}

impl Scaling<'_> {
    fn apply(&self, sums: &[[i32; NR]; MR], acc: &mut Acc) {
        for (row, s) in acc.iter_mut().zip(sums) {
            for j in 0..NR {
                row[j] = (s[j] - self.offset[j]) as f32 * self.scale[j] + self.bias[j];
            }
        }
    }
}

/// One tile of integer sums: `sums[r][j] = Σ_kk a[kk][r] · w[kk][j]`.
fn portable_tile(a: &[u8], w: &[i8], quads: usize, sums: &mut [[i32; NR]; MR]) {
    *sums = [[0; NR]; MR];
    for (av, wv) in a
        .chunks_exact(MR * 4)
        .zip(w.chunks_exact(NR * 4))
        .take(quads)
    {
        for (row, x) in sums.iter_mut().zip(av.chunks_exact(4)) {
            for (o, y) in row.iter_mut().zip(wv.chunks_exact(4)) {
                // Wrapping, as the VNNI instruction does (no sum of a real layer comes near).
                let four = (0..4).fold(0i32, |s, i| s.wrapping_add(x[i] as i32 * y[i] as i32));
                *o = o.wrapping_add(four);
            }
        }
    }
}

/// The int8 product as a [`Tile`] of the driver, for one quantized input.
struct Panels<'w> {
    w: &'w PackedI8,
    tile: I8Tile,
    /// The input's zero point and the factor of the columns' scales.
    zero: u8,
    factor: f32,
}

impl<'w> Tile for Panels<'w> {
    type A = u8;
    type Panel<'a>
        = (&'a [i8], Scaling<'a>)
    where
        Self: 'a;

    fn a_panel_len(&self) -> usize {
        self.w.quads * MR * 4
    }

    fn panel(&self, p: usize) -> Self::Panel<'_> {
        let w = self.w;
        let mut scale = [0f32; NR];
        let mut offset = [0i32; NR];
        for j in 0..NR {
            // As tract's graph: the weights' scale times the input's, then the sum times it.
            scale[j] = w.scales[p * NR + j] * self.factor;
            offset[j] = self.zero as i32 * w.col_sums[p * NR + j];
        }
        let bias = w.end.bias(p);
        (
            w.panel(p),
            Scaling {
                offset,
                scale,
                bias,
            },
        )
    }

    fn tile<'a>(&'a self, (wp, scaling): &Self::Panel<'a>, a: &[u8], acc: &mut Acc) {
        match self.tile {
            #[cfg(target_arch = "x86_64")]
            I8Tile::Vnni(cpu) => {
                let s = (&scaling.offset, &scaling.scale, scaling.bias);
                cpu.tile(a, wp, self.w.quads, s, acc)
            }
            I8Tile::Portable => {
                let mut sums = [[0i32; NR]; MR];
                portable_tile(a, wp, self.w.quads, &mut sums);
                scaling.apply(&sums, acc);
            }
        }
    }
}

thread_local! {
    /// The quantized and packed activations of the last product on this thread, kept for the
    /// next.
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// One panel's quantized rows, on the thread that packs them.
    static ROWS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Packs rows `t·MR..` of the quantized `q` (`m × k` at strides `s`) into `panel`
/// (`[k / 4][MR][4]`); values past `k` are zero, rows past `m` keep what they held.
fn pack_panel(q: &[u8], m: usize, k: usize, s: Strides, t: usize, panel: &mut [u8]) {
    let rows = (m - t * MR).min(MR);
    let at = |kk: usize, r: usize| ((kk / 4) * MR + r) * 4 + kk % 4;
    if s.col == 1 {
        let quads = k.div_ceil(4);
        for r in 0..rows {
            let row = &q[(t * MR + r) * s.row..][..k];
            let whole = row.chunks_exact(4);
            let rest = whole.remainder();
            // Four bytes at a time, a panel's row of groups at `MR · 4` bytes apart.
            for (four, dst) in whole.zip(panel[r * 4..].chunks_mut(MR * 4)) {
                dst[..4].copy_from_slice(four);
            }
            if !rest.is_empty() {
                let dst = &mut panel[((quads - 1) * MR + r) * 4..][..4];
                dst.fill(0);
                dst[..rest.len()].copy_from_slice(rest);
            }
        }
    } else {
        for kk in 0..k {
            let base = t * MR * s.row + kk * s.col;
            for r in 0..rows {
                panel[at(kk, r)] = q[base + r * s.row];
            }
        }
        for kk in k..k.div_ceil(4) * 4 {
            for r in 0..rows {
                panel[at(kk, r)] = 0;
            }
        }
    }
}

/// `c = (quantized a) · w`, scaled per column, plus the bias, then GELU if `w.end.gelu`: `a` is
/// `m × w.k` laid out as `a_strides` says (a dynamic quantization takes the range of all of
/// `a`), `c` is `m × w.n` laid out as `c_strides` says. Every element of `c` is written. Fails
/// (instead of reading or writing out of bounds) when a slice is too short for its shape and
/// strides.
pub fn quant_product(
    a: &[f32],
    m: usize,
    a_strides: Strides,
    w: &PackedI8,
    c: &mut [f32],
    c_strides: Strides,
    tile: I8Tile,
) -> anyhow::Result<()> {
    let (k, n) = (w.k, w.n);
    let (a_at, c_at) = ((a.len(), a_strides), (c.len(), c_strides));
    let Some(start) = driver::start("int8 product", a_at, c_at, (m, k, n), w.end.gelu)? else {
        return Ok(());
    };
    let (pool, erf) = (start.pool.as_deref(), start.erf.as_deref());
    let quantizer = Quantizer::of(a, w.quant);
    let size = w.quads * MR * 4;
    let len = m.div_ceil(MR) * size;
    SCRATCH.with_borrow_mut(|(quantized, packed)| -> anyhow::Result<()> {
        if packed.len() < len {
            packed.resize(len, 0);
        }
        let packed = &mut packed[..len];
        if a_strides.col == 1 {
            // Rows contiguous: each panel quantizes its own rows, then packs them.
            let one = |(t, panel): (usize, &mut [u8])| {
                ROWS.with_borrow_mut(|rows| {
                    let count = (m - t * MR).min(MR);
                    if rows.len() < count * k {
                        rows.resize(count * k, 0);
                    }
                    for r in 0..count {
                        let x = &a[(t * MR + r) * a_strides.row..][..k];
                        quantizer.run(x, &mut rows[r * k..(r + 1) * k]);
                    }
                    let s = Strides { row: k, col: 1 };
                    pack_panel(&rows[..count * k], count, k, s, 0, panel);
                })
            };
            driver::for_each_panel(packed, size, pool, one);
        } else {
            if quantized.len() < a.len() {
                quantized.resize(a.len(), 0);
            }
            quantizer.run(a, &mut quantized[..a.len()]);
            let q = &quantized[..a.len()];
            let one = |(t, p): (usize, &mut [u8])| pack_panel(q, m, k, a_strides, t, p);
            driver::for_each_panel(packed, size, pool, one);
        }
        let tiles = Panels {
            w,
            tile,
            zero: quantizer.zero,
            factor: quantizer.factor,
        };
        driver::run_panels(&tiles, packed, (m, n), erf, c, c_strides, pool)
    })
}

/// [`quant_product`] as a new tensor of `shape`, which holds the product's `m × w.n` values at
/// `c_strides` and nothing else.
pub fn quant_product_tensor(
    a: &[f32],
    m: usize,
    a_strides: Strides,
    w: &PackedI8,
    shape: &[usize],
    c_strides: Strides,
    tile: I8Tile,
) -> anyhow::Result<tract_onnx::prelude::Tensor> {
    driver::output_tensor("int8 product", shape, m * w.n, |c| {
        quant_product(a, m, a_strides, w, c, c_strides, tile)
    })
}
