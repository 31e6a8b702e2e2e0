//! What the commands write: a document to a file (atomically) or standard output, and the
//! progress bar of long runs.

/// Writes `text` to `path` atomically, or to standard output when `path` is `None`.
pub fn emit(path: Option<&std::path::Path>, text: &str) -> anyhow::Result<()> {
    match path {
        Some(p) => {
            mae_models::io::atomic_write(p, text.as_bytes())?;
            eprintln!("mae-run: wrote {}", p.display());
        }
        None => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(())
}

/// A progress bar on standard error (hidden when it is not a terminal).
pub fn progress(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {pos}/{len} images [{elapsed_precise}, {per_sec}] {wide_bar}",
    ) {
        bar.set_style(style);
    }
    bar
}
