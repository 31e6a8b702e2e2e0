//! `mae-run dicom-echo --to AE@HOST:PORT`: a C-ECHO, to check that a DICOM node answers.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::dicom::scu::{self, check_ae_title, Peer, Timeouts};

/// Arguments of `mae-run dicom-echo`.
#[derive(Debug, clap::Args)]
pub struct DicomEchoArgs {
    /// The node to echo: AE@HOST:PORT.
    #[arg(long, value_name = "AE@HOST:PORT")]
    pub to: Peer,
    /// The calling AE title.
    #[arg(long, default_value = "MAE")]
    pub ae_title: String,
    /// Time to connect and to wait for each answer, in seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_s: u64,
}

/// Runs `mae-run dicom-echo`: prints the status; fails unless it is Success.
pub fn run(args: DicomEchoArgs) -> anyhow::Result<ExitCode> {
    check_ae_title(&args.ae_title)?;
    let t = Duration::from_secs(args.timeout_s.max(1));
    let start = Instant::now();
    let status = scu::echo(&args.to, &args.ae_title, Timeouts { connect: t, io: t })?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if status == 0 {
        println!("{}: C-ECHO success ({ms:.1} ms)", args.to);
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{}: C-ECHO status {status:#06x} ({ms:.1} ms)", args.to);
        Ok(ExitCode::FAILURE)
    }
}
