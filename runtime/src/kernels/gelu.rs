//! The exact (erf) GELU that ends a ViT's MLP, folded into the stores of the products before
//! it, on tract's vectorised `erf`.

use crate::kernels::shape::Body;
use crate::kernels::vector::Vector;

/// tract's `erf` kernel, for layers that end in GELU (`gelu`), else none.
pub fn erf_if(
    gelu: bool,
) -> anyhow::Result<Option<Box<dyn tract_linalg::element_wise::ElementWise<f32>>>> {
    Ok(if gelu {
        Some(tract_linalg::routines::Func::Erf.ew_f32()?)
    } else {
        None
    })
}

/// `x · ½ · (1 + erf(x / √2))` in place, with tract's vectorised `erf` (the same kernel on every
/// path, so the same values as tract's plan) and the scaling around it on `vector`.
pub fn apply(
    xs: &mut [f32],
    erf: &dyn tract_linalg::element_wise::ElementWise<f32>,
    vector: Vector,
) -> anyhow::Result<()> {
    vector.run(Gelu { xs, erf })
}

/// [`apply`]'s loops, as a [`Body`].
struct Gelu<'a> {
    xs: &'a mut [f32],
    erf: &'a dyn tract_linalg::element_wise::ElementWise<f32>,
}

impl Body for Gelu<'_> {
    type Out = anyhow::Result<()>;
    #[inline(always)]
    fn run(self) -> anyhow::Result<()> {
        // One tile's outputs at a time.
        const CHUNK: usize = 12 * 32;
        let mut e = [0f32; CHUNK];
        for chunk in self.xs.chunks_mut(CHUNK) {
            let e = &mut e[..chunk.len()];
            for (e, x) in e.iter_mut().zip(chunk.iter()) {
                *e = *x * std::f32::consts::FRAC_1_SQRT_2;
            }
            self.erf.run(e)?;
            for (x, e) in chunk.iter_mut().zip(e.iter()) {
                *x = (*x * 0.5) * (*e + 1.0);
            }
        }
        Ok(())
    }
}
