//! The operators mae-run puts in tract's plans, one file each with its matcher and the rule
//! that puts it in place.

pub mod attention;
pub mod layer_norm;
pub mod patch;
pub mod product;
pub mod quantize;
