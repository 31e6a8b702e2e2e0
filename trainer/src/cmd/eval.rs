//! `mae-train eval`: a classifier checkpoint (ours, or a foreign `.pth` with `--model`) on a
//! split of a data set.

use crate::cli::EvalArgs;
use crate::data::{self};
use crate::engine::dist::Dist;
use crate::engine::*;
use crate::model::load::load_into;
use crate::model::vit::VisionTransformer;
use anyhow::{bail, Context};
use mae_models::checkpoint::{self};
use mae_models::{ModelConfig, Overrides, VitConfig};
use std::process::ExitCode;
use std::sync::Arc;
use tch::nn::{self};

/// The classifier an `eval` checkpoint holds: from its mae metadata, or, for a foreign file
/// such as an official fine-tuned `.pth`, from `--model` with the head's class count and the
/// pooling read off its tensors. Class names come from the metadata only.
fn eval_model(
    ck: &checkpoint::Checkpoint,
    a: &EvalArgs,
) -> anyhow::Result<(
    VitConfig,
    mae_models::preprocess::PreprocessSpec,
    Option<Vec<String>>,
)> {
    let path = a.resume.display();
    if let Some(meta) = &ck.meta {
        let ModelConfig::Vit(cfg) = &meta.config else {
            bail!("{path} is an MAE pretraining checkpoint, not a classifier; fine-tune or linear-probe it first");
        };
        return Ok((
            cfg.clone(),
            meta.preprocess.clone(),
            Some(meta.class_names.clone()),
        ));
    }
    let Some(model) = a.model.model.as_deref() else {
        bail!(
            "{path} records no architecture (not a mae checkpoint); name it with --model \
             (e.g. --model vit_base_patch16, see `mae-train models`)"
        );
    };
    let Some(head) = ck.tensors.get("head.weight") else {
        bail!(
            "{path} has no classification head (head.weight): it is a pretrained encoder, not a \
             classifier; fine-tune or linear-probe it first"
        );
    };
    let o = Overrides {
        img_size: a.model.input_size,
        patch_size: a.model.patch_size,
        num_classes: Some(head.shape.first().copied().unwrap_or(0)),
        depth: a.model.depth,
    };
    let ModelConfig::Vit(mut cfg) = ModelConfig::preset(model)?.with_overrides(&o)? else {
        bail!("--model {model} is an MAE model; evaluate a classifier with a vit_* model");
    };
    if let Some(n) = a.model.nb_classes {
        if n != cfg.num_classes {
            bail!(
                "--nb-classes {n}, but the head of {path} has {} classes",
                cfg.num_classes
            );
        }
    }
    cfg.global_pool = ck.tensors.contains_key("fc_norm.weight");
    let spec = mae_models::preprocess::PreprocessSpec::imagenet(cfg.img_size);
    Ok((cfg, spec, None))
}

/// `mae-train eval`.
pub fn eval(a: &EvalArgs) -> anyhow::Result<ExitCode> {
    let (dist, device) = Dist::init(&a.dist, device(a.device)?)?;
    let single = Dist::single();
    crate::engine::precision::configure(a.precision, device)?;
    let mut ck = checkpoint::load(&a.resume).context("cannot read checkpoint")?;
    // A linear-probe head is evaluated as the one linear layer it equals.
    checkpoint::fold_bn_head(&mut ck.tensors, checkpoint::LINPROBE_BN_EPS)
        .map_err(|e| anyhow::anyhow!("{}: linear-probe head: {e}", a.resume.display()))?;
    let (cfg, spec, class_names) = eval_model(&ck, a)?;
    let ds = data::open(&a.data_path, &a.split)?;
    if ds.num_outputs() != cfg.num_classes {
        bail!(
            "{}: the checkpoint's head has {} classes, but the data ({}) has {}{}; a head is only \
             meaningful on the classes it was trained for: fine-tune (`mae-train finetune \
             --finetune {}`) or linear-probe (`mae-train linprobe`) on this data first, then \
             evaluate that checkpoint",
            a.resume.display(),
            cfg.num_classes,
            ds.source,
            ds.num_outputs(),
            if ds.class_names.is_empty() {
                String::new()
            } else {
                format!(" ({})", ds.class_names.join(", "))
            },
            a.resume.display(),
        );
    }
    let cfg = &cfg;
    let vs = nn::VarStore::new(device);
    let model = VisionTransformer::new(&vs.root(), cfg, 0.0);
    let report = load_into(&vs, &ck.tensors);
    if !report.is_exact() {
        bail!(
            "{}: weights do not match the recorded architecture:\n{report}",
            a.resume.display()
        );
    }
    let mut ds = ds;
    if let Some(names) = class_names {
        ds.class_names = names;
    }
    let ds = Arc::new(ds);
    let plan = EvalPlan {
        spec: &spec,
        device,
        batch_size: a.batch_size,
        workers: a.num_workers,
        dist: if a.dist.dist_eval { &dist } else { &single },
    };
    let ev = evaluate(&model, &ds, &plan, &a.split)?;
    if !dist.is_main() {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} on {} ({} images, {:.1}s)",
        a.resume.display(),
        ds.source,
        ds.len(),
        ev.seconds
    );
    println!("{}", ev.metrics);
    if let Some(out) = &a.output {
        // The metrics, with the data they were measured on (`mae-export --test-metrics` reads
        // this file for the model card).
        let mut json = serde_json::to_value(&ev.metrics)?;
        if let Some(map) = json.as_object_mut() {
            let data = a.data_path.file_name().map_or_else(
                || a.data_path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            map.insert("data".into(), data.into());
            map.insert("split".into(), a.split.clone().into());
        }
        mae_models::io::atomic_write(out, serde_json::to_string_pretty(&json)?.as_bytes())?;
        println!("metrics written to {}", out.display());
    }
    if let Some(out) = &a.predictions {
        let csv = predictions_csv(&ev, ds.task, &ds.class_names);
        mae_models::io::atomic_write(out, csv.as_bytes())?;
        println!("predictions written to {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}
