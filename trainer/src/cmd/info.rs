//! `mae-train info`: what libtorch sees on this machine.

use std::process::ExitCode;

pub fn info() -> anyhow::Result<ExitCode> {
    println!("mae-train {}", env!("CARGO_PKG_VERSION"));
    println!("cuda available: {}", tch::Cuda::is_available());
    println!("cuda devices:   {}", tch::Cuda::device_count());
    println!("cudnn:          {}", tch::Cuda::cudnn_is_available());
    println!("cpu threads:    {}", tch::get_num_threads());
    let device = tch::Device::cuda_if_available();
    println!("default device: {device:?}");
    Ok(ExitCode::SUCCESS)
}
