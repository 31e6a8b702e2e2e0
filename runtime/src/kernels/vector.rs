//! Which vector registers the kernels other than the products use (the softmax of attention,
//! LayerNorm, the quantizers and GELU's scaling): their loops are written once, as plain Rust
//! ([`Body`]), and compiled for the path's instruction set by [`Vector::run`].

use crate::kernels::shape::Body;

/// The instruction set that [`Body`] loops are compiled for.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vector {
    /// AVX-512F: only made where the CPU has it.
    #[cfg(target_arch = "x86_64")]
    Avx512(crate::kernels::x86_64::avx512::Avx512),
    /// AVX2 and FMA: only made where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    Avx2(crate::kernels::x86_64::avx2::Avx2),
    /// The target's baseline (SSE2 on x86-64), on any CPU.
    Portable,
}

impl std::fmt::Debug for Vector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Vector {
    /// The path's name, as `MAE_KERNELS` spells it.
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512(_) => "avx512",
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(_) => "avx2",
            Self::Portable => "portable",
        }
    }

    /// Runs `body` compiled for this instruction set.
    #[inline]
    pub fn run<B: Body>(self, body: B) -> B::Out {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512(cpu) => cpu.run(body),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(cpu) => cpu.run(body),
            Self::Portable => body.run(),
        }
    }
}
