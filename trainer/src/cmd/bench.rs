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
    let mut run = |n: usize| -> f64 {
        let t = Instant::now();
        for _ in 0..n {
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
        }
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        t.elapsed().as_secs_f64()
    };
    run(a.warmup);
    let secs = run(a.steps);
    let per_step = secs / a.steps as f64;
    println!(
        "{} at {s}×{s}, batch {b}, {device:?}, {}: {:.1} ms/step, {:.1} img/s (forward + backward + AdamW, {} steps after {} warm-up)",
        a.model,
        crate::engine::precision::name(precision),
        per_step * 1e3,
        a.batch_size as f64 / per_step,
        a.steps,
        a.warmup
    );
    if let Some(m) = peak_rss_mib() {
        println!("peak host memory: {m:.0} MiB");
    }
    Ok(ExitCode::SUCCESS)
}
