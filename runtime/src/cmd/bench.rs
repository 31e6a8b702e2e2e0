//! `mae-run bench`: model load time, latency percentiles and throughput per batch size, and
//! peak memory, on seeded random inputs (preprocessing excluded).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::bail;
use serde::Serialize;

use crate::accel::Rewrites;
use crate::engine::settings::{BackendKind, ModelArgs, TractSettings};
use crate::kernels::select::{self, Choice};

/// The kernel paths a tract model runs on (as the backend chose them from the same settings);
/// none for ONNX Runtime and for tract's own graph.
fn kernel_paths(model: &ModelArgs) -> anyhow::Result<Option<Choice>> {
    let settings = TractSettings::from_env()?;
    if model.backend != BackendKind::Tract || settings.rewrites == Rewrites::None {
        return Ok(None);
    }
    Choice::new(settings.kernels).map(Some)
}

/// Arguments of `mae-run bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch_size: Vec<usize>,
    /// Timed runs per batch size.
    #[arg(long, default_value_t = 20)]
    pub iterations: usize,
    /// Untimed runs first, per batch size.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    pub format: BenchFormat,
    /// Write the results to FILE (atomically) instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// `bench --format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchFormat {
    Table,
    Json,
}

/// Figures for one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct BatchFigures {
    pub batch_size: usize,
    pub iterations: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// `p50_ms / batch_size`.
    pub ms_per_image: f64,
    pub images_per_s: f64,
}

/// The `q` quantile (0..1) of sorted values, linear between ranks as numpy's default.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), when known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs `mae-run bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.iterations == 0 || args.batch_size.contains(&0) {
        bail!("--iterations and every --batch-size must be at least 1");
    }
    let mut engine = args.model.load()?;
    let len = engine.image_len();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut figures = Vec::new();
    for &b in &args.batch_size {
        let pixels: Vec<f32> = (0..b * len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        for _ in 0..args.warmup {
            engine.run_raw(&pixels, b)?;
        }
        let mut ms = Vec::with_capacity(args.iterations);
        let bar = crate::output::progress(args.iterations as u64);
        for _ in 0..args.iterations {
            let t = Instant::now();
            engine.run_raw(&pixels, b)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let mean = ms.iter().sum::<f64>() / ms.len() as f64;
        ms.sort_by(f64::total_cmp);
        let p50 = quantile(&ms, 0.5);
        figures.push(BatchFigures {
            batch_size: b,
            iterations: args.iterations,
            mean_ms: mean,
            p50_ms: p50,
            p95_ms: quantile(&ms, 0.95),
            p99_ms: quantile(&ms, 0.99),
            ms_per_image: p50 / b as f64,
            images_per_s: b as f64 * 1e3 / mean,
        });
    }
    let peak = peak_rss_bytes();
    let kernels = kernel_paths(&args.model)?;
    let text = match args.format {
        BenchFormat::Json => {
            serde_json::to_string_pretty(&serde_json::json!({
                "model": engine.file.path,
                "sha256": engine.file.sha256,
                "arch": engine.meta.arch,
                "backend": engine.describe_backend(),
                "cpu": {
                    "model": select::cpu_model(),
                    "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
                    "features": select::cpu_features(),
                },
                "kernels": kernels.as_ref().map(|k| k.to_json()),
                "input_size": engine.meta.preprocess.input_size,
                "load_ms": engine.load_time.as_secs_f64() * 1e3,
                "peak_rss_bytes": peak,
                "batches": figures,
            }))? + "\n"
        }
        BenchFormat::Table => {
            let mut s = format!(
                "model {} ({}) · {}\ncpu {}\nload {:.0} ms · peak RSS {}\n",
                engine.file.path.display(),
                engine.meta.arch.as_deref().unwrap_or("?"),
                engine.describe_backend(),
                select::describe_cpu(),
                engine.load_time.as_secs_f64() * 1e3,
                peak.map_or("?".into(), |b| format!("{:.0} MB", b as f64 / 1e6))
            );
            s += "batch   mean ms    p50 ms    p95 ms    p99 ms  ms/image  images/s\n";
            for f in &figures {
                s += &format!(
                    "{:>5}  {:>8.1}  {:>8.1}  {:>8.1}  {:>8.1}  {:>8.1}  {:>8.2}\n",
                    f.batch_size,
                    f.mean_ms,
                    f.p50_ms,
                    f.p95_ms,
                    f.p99_ms,
                    f.ms_per_image,
                    f.images_per_s
                );
            }
            s
        }
    };
    crate::output::emit(args.output.as_deref(), &text)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), 2.5);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert!((quantile(&v, 0.95) - 3.85).abs() < 1e-12);
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
    }
}
