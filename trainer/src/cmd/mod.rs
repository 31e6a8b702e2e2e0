//! One file per subcommand. Each turns its arguments into a run description and hands it to
//! the engine (`crate::engine`); the training commands differ only where the recipe does.

pub mod bench;
pub mod eval;
pub mod export_npz;
pub mod finetune;
pub mod info;
pub mod inspect;
pub mod launch;
pub mod linprobe;
pub mod models;
pub mod pretrain;
pub mod sweep;
pub mod synth;
pub mod visualize;
