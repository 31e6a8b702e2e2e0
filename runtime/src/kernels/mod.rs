//! The CPU kernels behind mae-run's fused tract operators (`crate::accel`): products of
//! activations and weights packed once at load, in float32 ([`f32`]) and int8 ([`i8`]), one
//! image's self-attention ([`attention`]), the exact GELU folded into the products ([`gelu`])
//! and the uint8 quantizer of int8 layers ([`quantize`]).
//!
//! [`driver`] holds what every product shares: the panel layout, the aligned buffers and the
//! loop over weight panels (written once, over the [`driver::Tile`] trait). Each instruction
//! set's code sits in its own file under `x86_64/`, the only files that may use `unsafe`; the
//! portable tiles beside the drivers give the same sums on any CPU.

pub mod attention;
pub mod driver;
pub mod f32;
pub mod gelu;
pub mod i8;
pub mod layer_norm;
pub mod quantize;
pub mod select;
pub mod shape;
pub mod vector;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(test)]
mod tests;

pub use driver::{Strides, MR, NR};
