//! The device a run computes on, and the progress bars of its long loops.

use crate::cli::DeviceArg;
use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use tch::Device;

/// The device a run uses.
pub fn device(arg: DeviceArg) -> anyhow::Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Auto => Ok(Device::cuda_if_available()),
        DeviceArg::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceArg::Cuda => bail!("--device cuda: libtorch sees no CUDA device on this machine"),
    }
}

/// A progress bar with images/s and ETA (hidden on ranks other than 0).
pub fn progress(len: u64, label: &str) -> ProgressBar {
    if !crate::engine::dist::is_main_process() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_string());
    bar
}
