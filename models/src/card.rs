//! The model card of an exported model, in Markdown: written by `mae-export --card` and by
//! `mae-run info --card` from the model's `metadata_props` (see [`crate::onnx_keys`]).
//!
//! Its sections follow model-card practice (model details, intended use, training data,
//! evaluation, caveats) and carry the fields a MONAI bundle's `metadata.json` gives
//! reviewers (task, data source and type, classes, evaluation metrics, intended use, the
//! network's input and output format).

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::checkpoint::DataSummary;
use crate::onnx_keys as keys;

/// What the card is made from: the model's metadata and facts about its file.
#[derive(Debug, Clone, Default)]
pub struct CardFacts {
    /// The model's `metadata_props`.
    pub props: BTreeMap<String, String>,
    /// The model file's name, SHA-256 (hex) and size in bytes.
    pub file_name: String,
    pub sha256: String,
    pub bytes: u64,
    /// The graph's inputs and outputs, one line each (`pixel_values float32 [N, 3, 28, 28]`).
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// The card's section headings, in order; every card has each of them.
pub const SECTIONS: [&str; 8] = [
    "## Model details",
    "## Intended use",
    "## Training data",
    "## Evaluation",
    "## Calibration and operating threshold",
    "## Inputs and outputs",
    "## Provenance",
    "## Known limits",
];

/// Renders the card.
pub fn model_card(f: &CardFacts) -> String {
    let get = |k: &str| f.props.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let json = |k: &str| get(k).and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok());
    let names: Vec<String> = get(keys::CLASS_NAMES)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    let task = get(keys::TASK).unwrap_or("unknown");
    let arch = get(keys::ARCH).unwrap_or("unknown architecture");
    let size = get(keys::INPUT_SIZE).unwrap_or("?");
    let data: Option<DataSummary> = get(keys::DATA).and_then(|v| serde_json::from_str(v).ok());
    let modality = get(keys::MODALITY);

    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# Model card: {}\n", f.file_name);
    let what = if task == "features" {
        format!("a {arch} image encoder (features, no classifier head)")
    } else {
        format!(
            "a {arch} image classifier ({task}, {} classes)",
            names.len()
        )
    };
    let _ = writeln!(
        w,
        "This is {what}, exported to ONNX by {}.\n",
        get(keys::EXPORTER_VERSION).unwrap_or("an unknown exporter")
    );

    let _ = writeln!(w, "{}\n", SECTIONS[0]);
    let _ = writeln!(w, "| field | value |\n|---|---|");
    row(w, "architecture", arch);
    if let Some(c) = json(keys::MODEL_CONFIG) {
        let num = |k: &str| c.get(k).map_or("?".to_string(), |v| v.to_string());
        row(
            w,
            "configuration",
            &format!(
                "{} blocks, width {}, {} heads, patch {}, {} px input",
                num("depth"),
                num("embed_dim"),
                num("num_heads"),
                num("patch_size"),
                num("img_size")
            ),
        );
    }
    row(w, "task", task);
    if !names.is_empty() {
        row(w, "classes", &names.join(", "));
    }
    row(w, "precision", get(keys::PRECISION).unwrap_or("unknown"));
    if let Some(q) = get(keys::QUANTIZATION) {
        if let Ok(j) = serde_json::from_str::<serde_json::Value>(q) {
            let method = j
                .get("method")
                .and_then(|m| m.as_str())
                .unwrap_or("unknown");
            let cal = j.get("calibration").map(|c| {
                let data = c.get("data").and_then(|d| d.as_str()).unwrap_or("?");
                let n = c.get("images").and_then(|n| n.as_u64()).unwrap_or(0);
                format!(", calibrated on {n} images of `{data}`")
            });
            row(
                w,
                "quantisation",
                &format!("{method}{}", cal.unwrap_or_default()),
            );
        }
    }
    if let Some(e) = get(keys::EPOCH) {
        row(w, "checkpoint epoch", e);
    }
    row(
        w,
        "format",
        "ONNX (`metadata_props` carry preprocessing and labels)",
    );

    let _ = writeln!(w, "\n{}\n", SECTIONS[1]);
    match get(keys::INTENDED_USE) {
        Some(u) => {
            let _ = writeln!(w, "{u}\n");
        }
        None => {
            let _ = writeln!(
                w,
                "_Not stated. Export with `mae-export --intended-use TEXT` to record it._\n"
            );
        }
    }
    let _ = writeln!(
        w,
        "Out of scope: use on images unlike the training data below (other modalities, \
         sites, devices or populations) without validation there; use as the only basis of a \
         clinical decision.\n"
    );

    let _ = writeln!(w, "{}\n", SECTIONS[2]);
    match &data {
        Some(d) => {
            let _ = writeln!(w, "| field | value |\n|---|---|");
            row(w, "source", &format!("`{}`", d.source));
            if let Some(m) = modality {
                row(w, "modality", m);
            }
            let used = match d.train_samples {
                Some(n) => format!(
                    "{} (a class-stratified subset, `--train-samples {n}`, of {} in the train split)",
                    d.train.images, d.train_split_images
                ),
                None => format!("{} (the whole train split)", d.train.images),
            };
            row(w, "training images", &used);
            row(
                w,
                "class balance (training)",
                &balance(&d.train.per_class, &d.class_names),
            );
            row(w, "validation images", &d.val.images.to_string());
            row(
                w,
                "class balance (validation)",
                &balance(&d.val.per_class, &d.class_names),
            );
        }
        None => {
            let _ = writeln!(
                w,
                "_Not recorded: the source checkpoint does not describe its data (a checkpoint \
                 from another tool, or an older mae-train)._"
            );
        }
    }

    let _ = writeln!(w, "\n{}\n", SECTIONS[3]);
    let _ = writeln!(
        w,
        "| data | images | ACC | AUC | loss |\n|---|---|---|---|---|"
    );
    let metrics = json(keys::METRICS).unwrap_or_default();
    // Metrics as mae-train records them: ACC and AUC as fractions.
    let fmt = |v: Option<&serde_json::Value>| {
        v.and_then(|v| v.as_f64())
            .map_or("–".to_string(), |x| format!("{x:.4}"))
    };
    if metrics.as_object().is_some_and(|m| !m.is_empty()) {
        let images = data
            .as_ref()
            .map_or("–".to_string(), |d| d.val.images.to_string());
        let source = data
            .as_ref()
            .map_or("validation".to_string(), |d| format!("`{}` val", d.source));
        let _ = writeln!(
            w,
            "| {source} (model selection) | {images} | {} | {} | {} |",
            fmt(metrics.get("acc1")),
            fmt(metrics.get("auc")),
            fmt(metrics.get("loss"))
        );
    }
    let test = json(keys::TEST_METRICS);
    if let Some(t) = &test {
        let source = t.get("data").and_then(|v| v.as_str()).unwrap_or("test");
        let split = t.get("split").and_then(|v| v.as_str()).unwrap_or("test");
        let _ = writeln!(
            w,
            "| `{source}` {split} | {} | {} | {} | {} |",
            t.get("samples").map_or("–".to_string(), |v| v.to_string()),
            fmt(t.get("acc1")),
            fmt(t.get("auc")),
            fmt(t.get("loss"))
        );
    }
    let _ = writeln!(
        w,
        "\nACC is top-1 accuracy (at the operating threshold for binary tasks); AUC is the ROC \
         AUC (binary), macro one-vs-rest (multi-class) or macro over labels (multi-label), as \
         MedMNIST reports them. The validation row chose the checkpoint, so it is optimistic."
    );
    if test.is_none() {
        let _ = writeln!(
            w,
            "\n_No held-out test metrics recorded. Export with `mae-export --test-metrics \
             FILE` (the JSON of `mae-train eval --output FILE`) to add them._"
        );
    }

    let _ = writeln!(w, "\n{}\n", SECTIONS[4]);
    let temperature = get(keys::TEMPERATURE);
    let threshold = get(keys::THRESHOLD);
    if temperature.is_none() && threshold.is_none() {
        let _ = writeln!(
            w,
            "Not calibrated: probabilities are the raw softmax (sigmoid, multi-label) outputs, \
             and binary decisions use a threshold of 0.5. `mae-run calibrate` fits a \
             temperature and an operating threshold on validation data."
        );
    } else {
        let _ = writeln!(w, "| field | value |\n|---|---|");
        row(w, "temperature", temperature.unwrap_or("1 (none)"));
        row(
            w,
            "operating threshold",
            threshold.unwrap_or("0.5 (default)"),
        );
    }

    let _ = writeln!(w, "\n{}\n", SECTIONS[5]);
    let _ = writeln!(w, "| field | value |\n|---|---|");
    for i in &f.inputs {
        row(w, "input", &format!("`{i}`"));
    }
    for o in &f.outputs {
        row(w, "output", &format!("`{o}`"));
    }
    if let Some(m) = modality {
        row(w, "modality", m);
    }
    let interp = get(keys::INTERPOLATION).unwrap_or("bicubic");
    let crop = get(keys::CROP_PCT).unwrap_or("?");
    row(
        w,
        "preprocessing",
        &format!(
            "RGB (grey replicated), shorter side resized ({interp}) to {size} / {crop}, \
             centre crop {size}×{size}, scaled to [0, 1], normalised with mean {} and std {}",
            get(keys::MEAN).unwrap_or("?"),
            get(keys::STD).unwrap_or("?")
        ),
    );

    let _ = writeln!(w, "\n{}\n", SECTIONS[6]);
    let _ = writeln!(w, "| field | value |\n|---|---|");
    row(w, "model file", &format!("`{}`", f.file_name));
    row(w, "model SHA-256", &format!("`{}`", f.sha256));
    row(w, "model size", &format!("{:.1} MB", f.bytes as f64 / 1e6));
    row(
        w,
        "source checkpoint",
        &format!("`{}`", get(keys::CHECKPOINT_FILE).unwrap_or("unknown")),
    );
    row(
        w,
        "checkpoint SHA-256",
        &format!("`{}`", get(keys::CHECKPOINT_SHA256).unwrap_or("unknown")),
    );
    row(
        w,
        "trained with",
        get(keys::TRAINER_VERSION).unwrap_or("not recorded"),
    );
    row(
        w,
        "exported with",
        get(keys::EXPORTER_VERSION).unwrap_or("not recorded"),
    );

    let _ = writeln!(w, "\n{}\n", SECTIONS[7]);
    let _ = writeln!(
        w,
        "- Input size: the model sees {size}×{size} pixels; finer detail in larger images is \
         lost to the resize."
    );
    let _ = writeln!(
        w,
        "- Modality: {}.",
        modality.map_or_else(
            || "not stated; only images like the training data are in scope".to_string(),
            |m| format!("trained on {m} images only")
        )
    );
    if let Some(d) = &data {
        let _ = writeln!(
            w,
            "- Data: {} training images from one source (`{}`); behaviour on other sites, \
             devices or populations has not been measured.",
            d.train.images, d.source
        );
    }
    if get(keys::PRECISION) == Some("int8") {
        let _ = writeln!(
            w,
            "- int8: weights are quantised; the metrics above are those of the source \
             checkpoint, check agreement on your data."
        );
    }
    s
}

fn row(w: &mut String, k: &str, v: &str) {
    let _ = writeln!(w, "| {k} | {} |", v.replace('|', "\\|").replace('\n', " "));
}

/// `name: n (p%)` per class.
fn balance(per_class: &[usize], names: &[String]) -> String {
    let total: usize = per_class.iter().sum();
    per_class
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let name = names.get(i).cloned().unwrap_or_else(|| i.to_string());
            format!(
                "{name}: {n} ({:.1}%)",
                100.0 * n as f64 / total.max(1) as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::checkpoint::SplitSummary;

    fn facts() -> CardFacts {
        let data = DataSummary {
            source: "pneumoniamnist.npz".into(),
            class_names: vec!["normal".into(), "pneumonia".into()],
            train: SplitSummary {
                images: 600,
                per_class: vec![155, 445],
            },
            train_split_images: 4708,
            train_samples: Some(600),
            val: SplitSummary {
                images: 524,
                per_class: vec![135, 389],
            },
        };
        let props = [
            (keys::TASK, "binary".to_string()),
            (keys::CLASS_NAMES, r#"["normal","pneumonia"]"#.to_string()),
            (keys::ARCH, "vit_tiny_patch4_28".to_string()),
            (keys::INPUT_SIZE, "28".to_string()),
            (keys::PRECISION, "int8".to_string()),
            (keys::METRICS, r#"{"acc1": 0.915, "auc": 0.97}"#.to_string()),
            (keys::DATA, serde_json::to_string(&data).unwrap()),
            (keys::INTENDED_USE, "Triage | research".to_string()),
            (keys::THRESHOLD, "0.42".to_string()),
            (
                keys::TEST_METRICS,
                r#"{"data":"pneumoniamnist.npz","split":"test","samples":624,"acc1":0.867,"auc":0.95}"#
                    .to_string(),
            ),
        ];
        CardFacts {
            props: props.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            file_name: "m.onnx".into(),
            sha256: "ab".repeat(32),
            bytes: 2_000_000,
            inputs: vec!["pixel_values float32 [N, 3, 28, 28]".into()],
            outputs: vec!["logits float32 [N, 2]".into()],
        }
    }

    #[test]
    fn a_full_card_has_every_field() {
        let card = model_card(&facts());
        for s in SECTIONS {
            assert!(card.contains(s), "{s}");
        }
        for needle in [
            "| classes | normal, pneumonia |",
            "Triage | research",
            "600 (a class-stratified subset, `--train-samples 600`, of 4708",
            "normal: 155 (25.8%), pneumonia: 445 (74.2%)",
            "| `pneumoniamnist.npz` val (model selection) | 524 | 0.9150 | 0.9700 |",
            "| `pneumoniamnist.npz` test | 624 | 0.8670 | 0.9500 |",
            "| operating threshold | 0.42 |",
            &format!("| model SHA-256 | `{}` |", "ab".repeat(32)),
            "`pixel_values float32 [N, 3, 28, 28]`",
            "- int8:",
        ] {
            assert!(card.contains(needle), "{needle} not in\n{card}");
        }
    }

    #[test]
    fn missing_facts_are_named_not_invented() {
        let mut f = facts();
        for k in [
            keys::DATA,
            keys::INTENDED_USE,
            keys::TEST_METRICS,
            keys::THRESHOLD,
        ] {
            f.props.remove(k);
        }
        let card = model_card(&f);
        for s in SECTIONS {
            assert!(card.contains(s), "{s}");
        }
        assert!(card.contains("_Not stated. Export with `mae-export --intended-use TEXT`"));
        assert!(card.contains("_Not recorded: the source checkpoint does not describe its data"));
        assert!(card.contains("_No held-out test metrics recorded."));
        assert!(card.contains("Not calibrated"));
        assert!(
            !card.contains("524"),
            "no validation size without the data summary"
        );
    }
}
