//! `mae-run dicom-send FILES... --to AE@HOST:PORT`: C-STORE of DICOM files (folders are read
//! recursively), each in its own transfer syntax, on one association.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::dicom::dimse::status;
use crate::dicom::scu::{self, check_ae_title, Client, Instance, Peer, Timeouts};

/// Arguments of `mae-run dicom-send`.
#[derive(Debug, clap::Args)]
pub struct DicomSendArgs {
    /// DICOM files, or folders of them.
    #[arg(required = true, value_name = "FILES")]
    pub files: Vec<PathBuf>,
    /// The node to send to: AE@HOST:PORT.
    #[arg(long, value_name = "AE@HOST:PORT")]
    pub to: Peer,
    /// The calling AE title.
    #[arg(long, default_value = "MAE")]
    pub ae_title: String,
    /// Time to connect and to wait for each answer, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
}

fn expand(path: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            expand(&e, out)?;
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Runs `mae-run dicom-send`: one line per file with its status; fails if any file was not
/// stored.
pub fn run(args: DicomSendArgs) -> anyhow::Result<ExitCode> {
    check_ae_title(&args.ae_title)?;
    let mut paths = Vec::new();
    for p in &args.files {
        expand(p, &mut paths)?;
    }
    let mut items = Vec::new();
    let mut failed = 0;
    for p in paths {
        let read = std::fs::read(&p)
            .map_err(anyhow::Error::from)
            .and_then(|b| Instance::from_file(&b));
        match read {
            Ok(i) => items.push((p, i)),
            Err(e) => {
                println!("{}: not sent: {e:#}", p.display());
                failed += 1;
            }
        }
    }
    if !items.is_empty() {
        let t = Duration::from_secs(args.timeout_s.max(1));
        let contexts = scu::contexts_for(items.iter().map(|(_, i)| i));
        let start = Instant::now();
        let mut stored = 0;
        let mut client = Client::open(
            &args.to,
            &args.ae_title,
            &contexts,
            Timeouts { connect: t, io: t },
        )?;
        for (p, inst) in &items {
            match client.store(inst) {
                Ok(rsp) if status::stored(rsp.status) => {
                    stored += 1;
                    println!("{}: stored ({:#06x})", p.display(), rsp.status)
                }
                Ok(rsp) => {
                    failed += 1;
                    println!(
                        "{}: status {:#06x}{}",
                        p.display(),
                        rsp.status,
                        rsp.comment.map(|c| format!(": {c}")).unwrap_or_default()
                    );
                }
                Err(e) => {
                    failed += 1;
                    println!("{}: not sent: {e:#}", p.display());
                }
            }
        }
        let _ = client.release();
        eprintln!(
            "mae-run: {stored} of {} file(s) stored on {} in {:.2} s",
            items.len(),
            args.to,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
