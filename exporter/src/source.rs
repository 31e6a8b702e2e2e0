//! What is being exported: the architecture, the weights and the labels, resolved from our
//! self-describing checkpoints or from official facebookresearch/mae `.pth` files plus `--model`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use mae_models::checkpoint::{self, Checkpoint, ProbeRecord, StateDict, Task};
use mae_models::preprocess::PreprocessSpec;
use mae_models::{LoadReport, ModelConfig, VitConfig};

/// What the user asked for, besides the checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub model: Option<String>,
    pub class_names: Option<Vec<String>>,
    pub features: bool,
}

/// A checkpoint resolved into an exportable classifier or encoder.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub cfg: VitConfig,
    pub arch: String,
    /// The tensors the graph uses, under upstream names.
    pub tensors: StateDict,
    /// `None` when exporting features.
    pub task: Option<Task>,
    pub class_names: Vec<String>,
    pub preprocess: PreprocessSpec,
    pub metrics: BTreeMap<String, f64>,
    pub epoch: Option<u64>,
    pub probe: Option<ProbeRecord>,
    /// The training data summary the checkpoint records (ours, from `mae-train`).
    pub data: Option<mae_models::checkpoint::DataSummary>,
    /// The program that wrote the checkpoint (ours: `mae-train X.Y.Z`).
    pub writer: Option<String>,
    pub report: LoadReport,
    /// Checkpoint keys the export does not use (an MAE decoder, ...).
    pub ignored: Vec<String>,
}

/// Resolves a loaded checkpoint for export.
pub fn resolve(mut ck: Checkpoint, req: &Request) -> anyhow::Result<Resolved> {
    let file = ck.path.display().to_string();
    // A linear-probe head (BatchNorm without affine, then Linear) is exported as the one
    // linear layer it equals in evaluation mode.
    if checkpoint::fold_bn_head(&mut ck.tensors, checkpoint::LINPROBE_BN_EPS)
        .map_err(|e| anyhow::anyhow!("{file}: linear-probe head: {e}"))?
    {
        println!("{file}: linear-probe head (BatchNorm + Linear) folded into one linear layer");
    }
    let (cfg, arch) = architecture(&ck, req)?;
    cfg.validate()
        .with_context(|| format!("{file}: cannot export this architecture"))?;
    if cfg.num_classes == 0 && !req.features {
        bail!(
            "{file} has no classification head ('head.weight'); pass --features to export the \
             pooled embedding"
        );
    }

    let expected = cfg.parameters();
    let report = LoadReport::compare(&expected, ck.shapes());
    if !report.missing.is_empty() || !report.mismatched.is_empty() {
        let hint = match (&req.model, &ck.meta) {
            (Some(m), None) => format!("; is --model {m} the right architecture?"),
            _ => String::new(),
        };
        bail!(
            "{file} does not hold a {arch} model{hint}\n{}",
            mismatch_summary(&report)
        );
    }

    let meta = ck.meta.as_ref();
    let (task, class_names) = if req.features {
        (None, Vec::new())
    } else {
        let task = meta.and_then(|m| m.task).unwrap_or(Task::MultiClass);
        (Some(task), class_names(&file, &cfg, req, meta)?)
    };
    let preprocess = meta
        .map(|m| m.preprocess.clone())
        .unwrap_or_else(|| PreprocessSpec::imagenet(cfg.img_size));
    if preprocess.input_size != cfg.img_size {
        bail!(
            "{file}: preprocessing input size {} differs from the model's image size {}",
            preprocess.input_size,
            cfg.img_size
        );
    }
    let probe = meta.and_then(|m| m.probe.clone());
    let metrics = meta.map(|m| m.metrics.clone()).unwrap_or_default();
    let epoch = meta.and_then(|m| m.epoch);
    let data = meta.and_then(|m| m.data.clone());
    let writer = meta.map(|m| m.writer.clone());

    let mut tensors = ck.tensors;
    let ignored: Vec<String> = report.unexpected.clone();
    for k in &ignored {
        tensors.remove(k);
    }
    Ok(Resolved {
        cfg,
        arch,
        tensors,
        task,
        class_names,
        preprocess,
        metrics,
        epoch,
        probe,
        data,
        writer,
        report,
        ignored,
    })
}

/// The encoder config and preset name, from the checkpoint's metadata or from `--model` and the
/// tensors (official files: class count from `head.weight`, head type from `fc_norm`).
fn architecture(ck: &Checkpoint, req: &Request) -> anyhow::Result<(VitConfig, String)> {
    let file = ck.path.display();
    if let Some(meta) = &ck.meta {
        if let Some(m) = &req.model {
            if *m != meta.arch {
                bail!(
                    "{file} describes itself as {}; --model {m} is only for checkpoints without \
                     metadata (official .pth files)",
                    meta.arch
                );
            }
        }
        let cfg = match &meta.config {
            ModelConfig::Vit(c) => c.clone(),
            ModelConfig::Mae(m) => pretrain_encoder(&file, m, &meta.arch, req)?,
        };
        return Ok((cfg, meta.arch.clone()));
    }
    let Some(name) = &req.model else {
        bail!(
            "{file} does not describe its architecture (it carries no mae metadata); pass --model, \
             e.g. --model vit_base_patch16"
        );
    };
    let preset = ModelConfig::preset(name).with_context(|| format!("cannot export {file}"))?;
    let cfg = match preset {
        ModelConfig::Mae(m) => pretrain_encoder(&file, &m, name, req)?,
        ModelConfig::Vit(mut c) => {
            c.num_classes = match ck.tensors.get("head.weight") {
                Some(t) if t.shape.len() == 2 => t.shape[0],
                Some(t) => bail!(
                    "{file}: 'head.weight' has shape {:?}, expected [classes, {}]",
                    t.shape,
                    c.embed_dim
                ),
                None => 0,
            };
            c.global_pool = ck.tensors.contains_key("fc_norm.weight");
            c
        }
    };
    Ok((cfg, name.clone()))
}

/// The encoder of an MAE pretraining model, which only `--features` can export: its class token
/// after `norm`, as upstream's linear probing reads it.
fn pretrain_encoder(
    file: &impl std::fmt::Display,
    m: &mae_models::MaeConfig,
    arch: &str,
    req: &Request,
) -> anyhow::Result<VitConfig> {
    if !req.features {
        bail!(
            "{file} is an MAE pretraining checkpoint ({arch}) with no classifier head; pass \
             --features to export the encoder's embedding, or fine-tune it first"
        );
    }
    Ok(m.encoder(0, false))
}

fn class_names(
    file: &str,
    cfg: &VitConfig,
    req: &Request,
    meta: Option<&mae_models::checkpoint::CheckpointMeta>,
) -> anyhow::Result<Vec<String>> {
    let c = cfg.num_classes;
    if let Some(names) = &req.class_names {
        if names.len() != c {
            bail!(
                "--class-names gives {} names but {file} has {c} classes (head.weight is [{c}, {}])",
                names.len(),
                cfg.embed_dim
            );
        }
        return Ok(names.clone());
    }
    match meta.map(|m| &m.class_names) {
        Some(names) if !names.is_empty() => {
            if names.len() != c {
                bail!(
                    "{file}: its metadata lists {} class names but the head has {c} classes",
                    names.len()
                );
            }
            Ok(names.clone())
        }
        _ => Ok((0..c).map(|i| format!("class_{i}")).collect()),
    }
}

/// The first few missing and mismatched keys of a failed match (a wrong `--model` would
/// otherwise list every tensor).
fn mismatch_summary(report: &LoadReport) -> String {
    const SHOW: usize = 4;
    let mut lines = Vec::new();
    if !report.missing.is_empty() {
        let keys: Vec<String> = report
            .missing
            .iter()
            .take(SHOW)
            .map(|k| format!("'{k}'"))
            .collect();
        let more = report.missing.len().saturating_sub(SHOW);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        lines.push(format!(
            "missing {} tensors: {}{more}",
            report.missing.len(),
            keys.join(", ")
        ));
    }
    for m in report.mismatched.iter().take(SHOW) {
        lines.push(format!(
            "size mismatch for {}: {:?} in the checkpoint, {:?} in the model",
            m.name, m.found, m.expected
        ));
    }
    if report.mismatched.len() > SHOW {
        lines.push(format!(
            "... and {} more size mismatches",
            report.mismatched.len() - SHOW
        ));
    }
    lines.join("\n")
}

/// The file name of a path, for messages and metadata.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
