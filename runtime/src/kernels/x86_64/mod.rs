//! The x86-64 kernels, one file per instruction set. Each file's token type (made only by its
//! `detect`, after the CPU was seen to have the instructions) is what makes its `unsafe`
//! intrinsics sound: every safe method takes one.

pub mod avx2;
pub mod avx512;
pub mod avx_vnni;
pub mod vnni;
