//! The one truth of what a model is, shared by `mae-train`, `mae-export` and `mae-run`:
//! architecture configs and presets, the parameter-name and shape table, the preprocessing
//! spec and the checkpoint formats (self-describing safetensors; PyTorch `.pth` reading).

pub mod card;
pub mod checkpoint;
pub mod config;
pub mod digest;
pub mod error;
pub mod explain;
pub mod imaging;
pub mod input;
pub mod io;
pub mod metrics;
pub mod npz;
pub mod onnx_keys;
pub mod predictions;
pub mod preprocess;
pub mod probe;
pub mod report;
pub mod tensor;

pub use config::{MaeConfig, ModelConfig, Overrides, ParamSpec, VitConfig};
pub use error::{Error, Result};
pub use report::LoadReport;
pub use tensor::{DType, TensorData};
