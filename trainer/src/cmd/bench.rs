//! `mae-train bench`: times forward + backward + AdamW steps on synthetic data.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::bail;
use mae_models::{ModelConfig, Overrides};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

use crate::cli::BenchArgs;
use crate::engine::device;
use crate::model::mae::MaskedAutoencoderViT;
use crate::model::vit::VisionTransformer;
use crate::optim::{param_groups, AdamW};

/// Peak resident memory of this process, from `/proc/self/status` (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// `mae-train bench`.
pub fn bench(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    if a.steps == 0 || a.batch_size == 0 {
        bail!("--steps and --batch-size must be at least 1");
    }
    let device = device(a.device)?;
    let precision = crate::engine::precision::configure(a.amp.precision, device)?;
    let o = Overrides {
        img_size: a.input_size,
        depth: a.depth,
        ..Default::default()
    };
    let cfg = ModelConfig::preset(&a.model)?.with_overrides(&o)?;
    let vs = nn::VarStore::new(device);
    let b = a.batch_size as i64;
    let s = cfg.img_size() as i64;
    let xs = Tensor::randn([b, 3, s, s], (Kind::Float, device));
    let step: Box<dyn Fn() -> Tensor> = match &cfg {
        ModelConfig::Vit(c) => {
            let model = VisionTransformer::new(&vs.root(), c, 0.1);
            let ys = Tensor::randint(c.num_classes.max(1) as i64, [b], (Kind::Int64, device));
            Box::new(move || model.forward_t(&xs, true).cross_entropy_for_logits(&ys))
        }
        ModelConfig::Mae(c) => {
            let model = MaskedAutoencoderViT::new(&vs.root(), c);
            Box::new(move || model.forward(&xs, 0.75).loss)
        }
    };
    let mut names: Vec<(String, usize)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(k, t)| (k, t.dim()))
        .collect();
    names.sort();
    let depth = match &cfg {
        ModelConfig::Vit(c) => c.depth,
        ModelConfig::Mae(c) => c.depth,
    };
    let mut opt = AdamW::new(
        &vs,
        &param_groups(&names, depth, 0.05, 0.75, &["cls_token", "pos_embed"]),
        (0.9, 0.999),
    );
    let params = vs.trainable_variables();
    let scaler = crate::engine::precision::scaler_for(precision, &a.amp);
    let sync = || {
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    // Seconds of each step, the device synchronised after each.
    let mut run = |n: usize| -> Vec<f64> {
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            opt.zero_grad();
            let loss = crate::engine::precision::autocast(&step);
            match &scaler {
                Some(s) => {
                    (loss * s.borrow().scale).backward();
                    if s.borrow_mut().unscale(&params) {
                        opt.step(1e-4);
                    }
                }
                None => {
                    loss.backward();
                    opt.step(1e-4);
                }
            }
            sync();
            times.push(t.elapsed().as_secs_f64());
        }
        times
    };
    run(a.warmup);
    let times = run(a.steps);
    let per_step = times.iter().sum::<f64>() / a.steps as f64;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    if a.json {
        let v = serde_json::json!({
            "model": a.model,
            "input_size": s,
            "batch_size": a.batch_size,
            "device": format!("{device:?}"),
            "precision": crate::engine::precision::name(precision),
            "threads": tch::get_num_threads(),
            "steps": a.steps,
            "warmup": a.warmup,
            "mean_ms": per_step * 1e3,
            "median_ms": median * 1e3,
            "min_ms": sorted[0] * 1e3,
            "step_ms": times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
            "images_per_s": a.batch_size as f64 / per_step,
            "peak_rss_mib": peak_rss_mib(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} at {s}×{s}, batch {b}, {device:?}, {}: {:.1} ms/step, {:.1} img/s (forward + backward + AdamW, {} steps after {} warm-up)",
        a.model,
        crate::engine::precision::name(precision),
        per_step * 1e3,
        a.batch_size as f64 / per_step,
        a.steps,
        a.warmup
    );
    println!(
        "per step: median {:.1} ms, fastest {:.1} ms",
        median * 1e3,
        sorted[0] * 1e3
    );
    if let Some(m) = peak_rss_mib() {
        println!("peak host memory: {m:.0} MiB");
    }
    Ok(ExitCode::SUCCESS)
}
