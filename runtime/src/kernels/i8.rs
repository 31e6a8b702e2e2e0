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
//! int8 weights of each of 16 columns and adds the four products to the column's sum, and one
//! AVX-VNNI instruction (`x86_64/avx_vnni.rs`) does the same for 8 columns. The AVX2 tile
//! (`x86_64/avx2.rs`) works on both widened to int16 in pairs of rows, `[n / NR][k / 2][NR][2]`
//! and `[m / MR][k / 2][MR][2]` ([`PackedI8::prepare`]). The portable tile gives the same sums
//! on any CPU.

use crate::kernels::driver::{self, Acc, Aligned, Ending, Strides, Tile, MR, NR};
use crate::kernels::quantize::{ActivationQuant, Quantizer};
use crate::kernels::vector::Vector;

/// A `k × n` int8 weight matrix in panels of [`NR`] columns and groups of four rows (the last
/// of each zero-padded), its column sums, each column's scale and bias (padded alike).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedI8 {
    pub k: usize,
    pub n: usize,
    /// Groups of four rows: `k / 4`, rounded up.
    quads: usize,
    /// The weights in groups of four rows; empty once widened for the AVX2 tile.
    panels: Aligned<i8>,
    /// The weights widened to int16 in pairs of rows, for the AVX2 tile.
    wide: Option<Aligned<i16>>,
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
            wide: None,
            col_sums,
            scales: padded,
            end: Ending::new(n),
            quant,
        })
    }

    /// Lays the weights out for `tile`: the AVX2 tile takes them widened to int16 in pairs of
    /// rows (and the int8 panels are dropped); every other tile, as they are.
    pub fn prepare(mut self, tile: I8Tile) -> Self {
        if tile.widens() && self.wide.is_none() {
            let size = self.quads * NR * 4;
            let mut wide = Aligned::<i16>::zeroed(self.panels.len());
            for (q, w) in self
                .panels
                .chunks_exact(size.max(1))
                .zip(wide.chunks_exact_mut(size.max(1)))
            {
                widen_quads(q, w, NR);
            }
            self.wide = Some(wide);
            self.panels = Aligned::zeroed(0);
        }
        self
    }

    /// Whether the weights are laid out for `tile`.
    fn fits(&self, tile: I8Tile) -> bool {
        tile.widens() == self.wide.is_some()
    }

    fn panel(&self, p: usize) -> &[i8] {
        let size = self.quads * NR * 4;
        &self.panels[p * size..(p + 1) * size]
    }

    fn wide_panel(&self, p: usize) -> &[i16] {
        let size = self.quads * NR * 4;
        self.wide
            .as_ref()
            .map_or(&[], |w| &w[p * size..(p + 1) * size])
    }

    /// How panel `p`'s sums become float32, for an input of zero point `zero` and scale
    /// `factor`.
    fn scaling(&self, p: usize, zero: u8, factor: f32) -> Scaling<'_> {
        let mut scale = [0f32; NR];
        let mut offset = [0i32; NR];
        for j in 0..NR {
            // As tract's graph: the weights' scale times the input's, then the sum times it.
            scale[j] = self.scales[p * NR + j] * factor;
            offset[j] = zero as i32 * self.col_sums[p * NR + j];
        }
        Scaling {
            offset,
            scale,
            bias: self.end.bias(p),
        }
    }
}

/// A panel in groups of four rows (`[quads][width][4]`) widened into pairs of rows
/// (`[2 · quads][width][2]`).
fn widen_quads<T: Copy + Into<i16>>(quads: &[T], pairs: &mut [i16], width: usize) {
    for (q, p) in quads
        .chunks_exact(width * 4)
        .zip(pairs.chunks_exact_mut(width * 4))
    {
        let (first, second) = p.split_at_mut(width * 2);
        for (j, four) in q.chunks_exact(4).enumerate() {
            first[j * 2] = four[0].into();
            first[j * 2 + 1] = four[1].into();
            second[j * 2] = four[2].into();
            second[j * 2 + 1] = four[3].into();
        }
    }
}

/// Which tile computes the integer sums.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum I8Tile {
    /// AVX-512 VNNI intrinsics: only made where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    Vnni(crate::kernels::x86_64::vnni::Vnni),
    /// AVX-VNNI (256-bit) intrinsics: only made where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    AvxVnni(crate::kernels::x86_64::avx_vnni::AvxVnni),
    /// AVX2 intrinsics on int16 pairs: only made where the CPU has AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2(crate::kernels::x86_64::avx2::Avx2),
    /// Plain Rust, on any CPU.
    Portable,
}

impl std::fmt::Debug for I8Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl I8Tile {
    /// The tile's instruction set, as `MAE_KERNELS` spells it.
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Vnni(_) => "avx512-vnni",
            #[cfg(target_arch = "x86_64")]
            Self::AvxVnni(_) => "avx-vnni",
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(_) => "avx2",
            Self::Portable => "portable",
        }
    }

    /// The vector code that goes with this tile (the quantizer of its input).
    pub fn vector(self) -> Vector {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Vnni(_) => crate::kernels::x86_64::avx512::Avx512::detect()
                .map_or(Vector::Portable, Vector::Avx512),
            #[cfg(target_arch = "x86_64")]
            Self::AvxVnni(_) | Self::Avx2(_) => {
                crate::kernels::x86_64::avx2::Avx2::detect().map_or(Vector::Portable, Vector::Avx2)
            }
            Self::Portable => Vector::Portable,
        }
    }

    /// Whether the tile takes its operands widened to int16 ([`PackedI8::prepare`]).
    fn widens(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Self::Avx2(_) = self {
            return true;
        }
        false
    }

    /// The AVX-VNNI tile, where this CPU runs it.
    pub fn avx_vnni() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            crate::kernels::x86_64::avx_vnni::AvxVnni::detect().map(Self::AvxVnni)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
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
        (self.w.panel(p), self.w.scaling(p, self.zero, self.factor))
    }

    fn tile<'a>(&'a self, (wp, scaling): &Self::Panel<'a>, a: &[u8], acc: &mut Acc) {
        match self.tile {
            #[cfg(target_arch = "x86_64")]
            I8Tile::Vnni(cpu) => {
                let s = (&scaling.offset, &scaling.scale, scaling.bias);
                cpu.tile(a, wp, self.w.quads, s, acc)
            }
            #[cfg(target_arch = "x86_64")]
            I8Tile::AvxVnni(cpu) => {
                let s = (&scaling.offset, &scaling.scale, scaling.bias);
                cpu.tile(a, wp, self.w.quads, s, acc)
            }
            // Widened panels run through `Wide` instead.
            #[cfg(target_arch = "x86_64")]
            I8Tile::Avx2(_) => unreachable!("int16 panels"),
            I8Tile::Portable => {
                let mut sums = [[0i32; NR]; MR];
                portable_tile(a, wp, self.w.quads, &mut sums);
                scaling.apply(&sums, acc);
            }
        }
    }

    fn vector(&self) -> Vector {
        self.tile.vector()
    }
}

/// The int8 product on int16 pairs (the AVX2 tile), as a [`Tile`] of the driver.
#[cfg(target_arch = "x86_64")]
struct Wide<'w> {
    w: &'w PackedI8,
    cpu: crate::kernels::x86_64::avx2::Avx2,
    zero: u8,
    factor: f32,
}

#[cfg(target_arch = "x86_64")]
impl<'w> Tile for Wide<'w> {
    type A = i16;
    type Panel<'a>
        = (&'a [i16], Scaling<'a>)
    where
        Self: 'a;

    fn a_panel_len(&self) -> usize {
        self.w.quads * MR * 4
    }

    fn panel(&self, p: usize) -> Self::Panel<'_> {
        (
            self.w.wide_panel(p),
            self.w.scaling(p, self.zero, self.factor),
        )
    }

    fn tile<'a>(&'a self, (wp, scaling): &Self::Panel<'a>, a: &[i16], acc: &mut Acc) {
        let s = (&scaling.offset, &scaling.scale, scaling.bias);
        self.cpu.i16_tile(a, wp, self.w.quads * 2, s, acc)
    }

    fn vector(&self) -> Vector {
        Vector::Avx2(self.cpu)
    }
}

thread_local! {
    /// The quantized and packed activations of the last product on this thread, kept for the
    /// next.
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// The packed activations widened to int16, for the AVX2 tile.
    static WIDE: std::cell::RefCell<Vec<i16>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One panel's quantized rows, on the thread that packs them.
    static ROWS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One packed panel before it is widened (the AVX2 tile), on the thread that packs it.
    static PANEL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
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
    quant_window(a, 0, m, a_strides, w, c, c_strides, tile)
}

/// [`quant_product`] of the rows of `whole` from value `first` on (`m × w.k` at `a_strides`),
/// quantized as all of `whole` is: a dynamic quantization takes the range of `whole`, as a
/// graph that quantizes a tensor and then multiplies only some of its rows does.
#[allow(clippy::too_many_arguments)]
pub fn quant_window(
    whole: &[f32],
    first: usize,
    m: usize,
    a_strides: Strides,
    w: &PackedI8,
    c: &mut [f32],
    c_strides: Strides,
    tile: I8Tile,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        first <= whole.len(),
        "int8 product: rows from value {first} of an input of {}",
        whole.len()
    );
    let a = &whole[first..];
    let (k, n) = (w.k, w.n);
    let (a_at, c_at) = ((a.len(), a_strides), (c.len(), c_strides));
    let Some(start) = driver::start("int8 product", a_at, c_at, (m, k, n), w.end.gelu)? else {
        return Ok(());
    };
    let (pool, erf) = (start.pool.as_deref(), start.erf.as_deref());
    anyhow::ensure!(
        w.fits(tile),
        "int8 product: weights not laid out for the {} tile",
        tile.name()
    );
    let quantizer = Quantizer::of(whole, w.quant, tile.vector());
    let size = w.quads * MR * 4;
    let len = m.div_ceil(MR) * size;
    SCRATCH.with_borrow_mut(|(quantized, packed)| -> anyhow::Result<()> {
        // Rows contiguous: each panel quantizes its own rows, then packs them.
        let contiguous = a_strides.col == 1;
        let fill = |t: usize, panel: &mut [u8]| {
            ROWS.with_borrow_mut(|rows| {
                let count = (m - t * MR).min(MR);
                let rows = driver::grown(rows, count * k);
                for (r, row) in rows.chunks_exact_mut(k.max(1)).enumerate() {
                    quantizer.run(&a[(t * MR + r) * a_strides.row..][..k], row);
                }
                let s = Strides { row: k, col: 1 };
                pack_panel(rows, count, k, s, 0, panel);
            })
        };
        // The uint8 panels of the whole input, quantized and packed.
        let mut pack_all = |packed: &mut Vec<u8>| {
            let packed = driver::grown(packed, len);
            if contiguous {
                driver::for_each_panel(packed, size, pool, |(t, panel)| fill(t, panel));
            } else {
                let q = driver::grown(quantized, a.len());
                quantizer.run(a, q);
                let q = &*q;
                let one = |(t, p): (usize, &mut [u8])| pack_panel(q, m, k, a_strides, t, p);
                driver::for_each_panel(packed, size, pool, one);
            }
        };
        let (zero, factor) = (quantizer.zero, quantizer.factor);
        #[cfg(target_arch = "x86_64")]
        if let I8Tile::Avx2(cpu) = tile {
            return WIDE.with_borrow_mut(|wide| {
                let wide = driver::grown(wide, len);
                if contiguous {
                    // Each panel quantized, packed and widened on the thread that fills it.
                    driver::for_each_panel(wide, size, pool, |(t, p)| {
                        PANEL.with_borrow_mut(|panel| {
                            let panel = driver::grown(panel, size);
                            fill(t, panel);
                            widen_quads(panel, p, MR)
                        })
                    });
                } else {
                    pack_all(packed);
                    let packed = &packed[..len];
                    driver::for_each_panel(wide, size, pool, |(t, p)| {
                        widen_quads(&packed[t * size..(t + 1) * size], p, MR)
                    });
                }
                let tiles = Wide {
                    w,
                    cpu,
                    zero,
                    factor,
                };
                driver::run_panels(&tiles, wide, (m, n), erf, c, c_strides, pool)
            });
        }
        pack_all(packed);
        let tiles = Panels {
            w,
            tile,
            zero,
            factor,
        };
        driver::run_panels(&tiles, &packed[..len], (m, n), erf, c, c_strides, pool)
    })
}

/// [`quant_window`] as a new tensor of `shape`, which holds the product's `m × w.n` values at
/// `c_strides` and nothing else.
#[allow(clippy::too_many_arguments)]
pub fn quant_product_tensor(
    whole: &[f32],
    first: usize,
    m: usize,
    a_strides: Strides,
    w: &PackedI8,
    shape: &[usize],
    c_strides: Strides,
    tile: I8Tile,
) -> anyhow::Result<tract_onnx::prelude::Tensor> {
    driver::output_tensor("int8 product", shape, m * w.n, |c| {
        quant_window(whole, first, m, a_strides, w, c, c_strides, tile)
    })
}
