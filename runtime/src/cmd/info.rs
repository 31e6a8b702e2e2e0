//! `mae-run info`: what a model file declares, without running it.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::engine::model::{MetaOverrides, ModelFile, ModelMeta};
use crate::engine::settings::TractSettings;
use crate::kernels::select::{self, Choice};

/// Arguments of `mae-run info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// The ONNX model.
    #[arg(long, short = 'm', value_name = "FILE")]
    pub model: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = InfoFormat::Text)]
    pub format: InfoFormat,
    /// Refuse the model unless its SHA-256 is this (hex).
    #[arg(long, value_name = "HEX")]
    pub expect_sha256: Option<String>,
    /// Write the model card (Markdown) instead: to FILE, or to standard output without one.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub card: Option<PathBuf>,
}

/// `info --format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InfoFormat {
    Text,
    Json,
}

/// Runs `mae-run info`.
pub fn run(args: InfoArgs) -> anyhow::Result<ExitCode> {
    if !args.model.exists() {
        anyhow::bail!("model {} does not exist", args.model.display());
    }
    let file = ModelFile::read(&args.model)?;
    if let Some(want) = &args.expect_sha256 {
        if !want.trim().eq_ignore_ascii_case(&file.sha256) {
            anyhow::bail!(
                "{} has SHA-256 {}, not the expected {}",
                args.model.display(),
                file.sha256,
                want.trim()
            );
        }
    }
    if let Some(card) = &args.card {
        let facts = mae_models::card::CardFacts {
            props: file.props.clone(),
            file_name: file.path.file_name().map_or_else(
                || file.path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            sha256: file.sha256.clone(),
            bytes: file.size,
            inputs: file.inputs.iter().map(|i| i.describe()).collect(),
            outputs: file.outputs.iter().map(|o| o.describe()).collect(),
        };
        let text = mae_models::card::model_card(&facts);
        let to = (card.as_os_str() != "-").then_some(card.as_path());
        crate::output::emit(to, &text)?;
        return Ok(ExitCode::SUCCESS);
    }
    let meta = ModelMeta::from_file(&file, &MetaOverrides::default());
    // The kernels tract would run this model on here (MAE_KERNELS, checked against the CPU).
    let kernels = Choice::new(TractSettings::kernels_from_env()?)?;
    let text = match args.format {
        InfoFormat::Json => {
            let v = serde_json::json!({
                "path": file.path,
                "sha256": file.sha256,
                "size_bytes": file.size,
                "ir_version": file.ir_version,
                "opsets": file.opsets.iter().map(|(d, v)| serde_json::json!({"domain": d, "version": v})).collect::<Vec<_>>(),
                "producer": file.producer,
                "inputs": file.inputs,
                "outputs": file.outputs,
                "metadata": file.props,
                "mae": meta.as_ref().ok(),
                "mae_error": meta.as_ref().err().map(|e| format!("{e:#}")),
                "cpu": {
                    "model": select::cpu_model(),
                    "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
                    "features": select::cpu_features(),
                },
                "tract_kernels": kernels.to_json(),
            });
            serde_json::to_string_pretty(&v)? + "\n"
        }
        InfoFormat::Text => {
            let mut s = String::new();
            s += &format!("model      {}\n", file.path.display());
            s += &format!("sha256     {}\n", file.sha256);
            s += &format!("size       {:.1} MB\n", file.size as f64 / 1e6);
            let opsets: Vec<String> = file
                .opsets
                .iter()
                .map(|(d, v)| format!("{d} {v}"))
                .collect();
            s += &format!(
                "ir         {}  opsets: {}\n",
                file.ir_version,
                opsets.join(", ")
            );
            if !file.producer.is_empty() {
                s += &format!("producer   {}\n", file.producer);
            }
            for i in &file.inputs {
                s += &format!("input      {}\n", i.describe());
            }
            for o in &file.outputs {
                s += &format!("output     {}\n", o.describe());
            }
            match &meta {
                Ok(m) => {
                    let p = &m.preprocess;
                    s += &format!(
                        "task       {} · {} classes{}\n",
                        m.task.as_str(),
                        m.class_names.len(),
                        if m.class_names.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", m.class_names.join(", "))
                        }
                    );
                    s += &format!(
                        "preprocess resize {} ({}), crop {}, mean {:?}, std {:?}\n",
                        p.resize_size(),
                        p.interpolation.as_str(),
                        p.input_size,
                        p.mean,
                        p.std
                    );
                    if let Some(a) = &m.arch {
                        s += &format!("arch       {a}\n");
                    }
                    if m.temperature.is_some() || m.threshold.is_some() {
                        s += &format!(
                            "calibrated temperature {}, threshold {}\n",
                            m.temperature.map_or("-".into(), |t| format!("{t:.4}")),
                            m.threshold.map_or("-".into(), |t| format!("{t:.4}"))
                        );
                    }
                }
                Err(e) => s += &format!("mae        not usable as is: {e:#}\n"),
            }
            s += &format!("cpu        {}\n", select::describe_cpu());
            s += &format!("kernels    tract: {}\n", kernels.describe());
            if !file.props.is_empty() {
                s += "metadata\n";
                for (k, v) in &file.props {
                    let v = if v.chars().count() > 200 {
                        format!("{}…", v.chars().take(200).collect::<String>())
                    } else {
                        v.clone()
                    };
                    s += &format!("  {k} = {v}\n");
                }
            }
            s
        }
    };
    crate::output::emit(None, &text)?;
    Ok(ExitCode::SUCCESS)
}
