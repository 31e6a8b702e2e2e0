//! The training engine every command runs on: the device, one epoch loop, evaluation with
//! gathered predictions, the end of a classifier's epoch, the run folder with its checkpoints and
//! resume, mixed precision and data-parallel collectives. Commands (`crate::cmd`) describe a run;
//! the engine runs it.

pub mod classifier;
pub mod device;
pub mod dist;
pub mod epoch;
pub mod evaluate;
pub mod precision;
pub mod run_dir;
pub mod setup;

pub(crate) use classifier::ClassifierEpoch;
pub use classifier::{probe, PROBE_BATCH, PROBE_SEED};
pub use device::{device, progress};
pub use epoch::{epochs_to_run, train_epoch, training_order, EpochStats, Schedule, TrainBatches};
pub use evaluate::{evaluate, predictions_csv, to_input, EvalPlan, Evaluation};
pub(crate) use evaluate::{loss_fn, per_sample_loss, targets};
pub use run_dir::{
    load_optim, load_scaler, optim_path, read_resume, resume, save_checkpoint, RunDir,
};
