//! What the product driver, the tiles of every instruction set and the vector bodies share,
//! below all of them: the tile's shape, its accumulators, and the [`Body`] of plain loops.

/// Columns of one weight panel (two 16-lane vectors).
pub const NR: usize = 32;
/// Rows of one activation panel.
pub const MR: usize = 12;

/// One tile's outputs, row by row.
pub type Acc = [[f32; NR]; MR];

/// Plain loops that the compiler vectorises, run by `crate::kernels::vector::Vector::run`
/// compiled for the chosen instruction set (its `run` is inlined there): the same operations,
/// so the same values, on every path.
pub trait Body {
    type Out;
    fn run(self) -> Self::Out;
}
