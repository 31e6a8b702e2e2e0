//! Where the model looked: explanation maps for one image, by three methods.
//!
//! - `rollout` and `gradcam` are outputs of graphs exported with `mae-export --explain` (their
//!   math lives in the exporter's `onnx/explain.rs`); here they are only split per image;
//! - `occlusion` ([`occlusion`]) runs any ONNX classifier once per window position.
//!
//! [`heatmap`] turns a map into a PNG over the image and a `.npy`. The methods, the maps, the
//! occlusion windows and the drawing are `mae_models::explain`'s, shared with `mae-train
//! visualize`. This layer sits beside `cmd/` and `serve/`, over `engine/`, which never imports
//! it.

pub mod heatmap;
pub mod occlusion;

use anyhow::{bail, Context};

pub use mae_models::explain::{Explanation, Method};

use crate::engine::backend::OutputTensor;
use crate::engine::Engine;

/// Fails with what to do when the model does not offer `method`'s output.
pub fn require(engine: &Engine, method: Method) -> anyhow::Result<()> {
    require_output(
        &engine.file.path.display().to_string(),
        &engine.meta.output_names,
        method,
    )
}

/// [`require`] for the model `model` with the outputs `names`.
pub fn require_output(model: &str, names: &[String], method: Method) -> anyhow::Result<()> {
    let Some(name) = method.graph_output() else {
        return Ok(());
    };
    if names.iter().any(|n| n == name) {
        return Ok(());
    }
    let offered: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| *n == "rollout" || *n == "gradcam")
        .collect();
    bail!(
        "{} has no '{name}' output (its outputs: {}); export the model with `mae-export --onnx \
         --explain {name}`{}, or use --explain occlusion, which works with any classifier",
        model,
        names.join(", "),
        if offered.is_empty() {
            String::new()
        } else {
            format!(", or ask for what it offers ({})", offered.join(", "))
        }
    )
}

/// Splits the graph's `method` output of a batch of `batch` images into one map per image.
pub fn split_maps(
    maps: &[OutputTensor],
    method: Method,
    batch: usize,
) -> anyhow::Result<Vec<Explanation>> {
    let name = method
        .graph_output()
        .context("occlusion maps are not graph outputs")?;
    let t = maps
        .iter()
        .find(|m| m.name == name)
        .with_context(|| format!("the model returned no '{name}' output"))?;
    let (per_class, rank) = match method {
        Method::Gradcam => (true, 4),
        _ => (false, 3),
    };
    if t.shape.len() != rank
        || t.shape[0] != batch
        || t.values.len() != t.shape.iter().product::<usize>()
    {
        bail!(
            "output '{name}' has shape {:?} ({} values), expected {rank} dimensions with batch \
             {batch} first",
            t.shape,
            t.values.len()
        );
    }
    let per = t.values.len() / batch.max(1);
    Ok(t.values
        .chunks(per.max(1))
        .take(batch)
        .map(|v| Explanation {
            method,
            shape: t.shape[1..].to_vec(),
            values: v.to_vec(),
            per_class,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn graph_maps_split_per_image() {
        let maps = vec![
            OutputTensor {
                name: "gradcam".into(),
                shape: vec![2, 3, 2, 2],
                values: (0..24).map(|v| v as f32).collect(),
            },
            OutputTensor {
                name: "rollout".into(),
                shape: vec![2, 2, 2],
                values: (0..8).map(|v| v as f32).collect(),
            },
        ];
        let g = split_maps(&maps, Method::Gradcam, 2).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].shape, vec![3, 2, 2]);
        assert_eq!(g[1].class_map(2).unwrap(), &[20.0, 21.0, 22.0, 23.0]);
        assert!(g[1].class_map(3).is_err());
        let r = split_maps(&maps, Method::Rollout, 2).unwrap();
        assert_eq!(r[1].values, vec![4.0, 5.0, 6.0, 7.0]);
        assert_eq!(r[0].class_map(5).unwrap(), &[0.0, 1.0, 2.0, 3.0]);
        let err = split_maps(&maps, Method::Rollout, 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch 3"), "{err}");
        let err = split_maps(&maps[..1], Method::Rollout, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no 'rollout'"), "{err}");
        assert!(Method::parse("saliency").is_err());
        assert_eq!(Method::parse("gradcam").unwrap(), Method::Gradcam);
    }
}
