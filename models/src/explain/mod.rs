//! Where the model looked: what the explanation methods are, one image's map, and the parts
//! that every tool computes the same way: occlusion sensitivity over any classifier
//! ([`occlusion`]) and a map made visible ([`heatmap`]).
//!
//! Rollout and Grad-CAM are computed by `mae-export` as graph outputs and by `mae-train
//! visualize` in libtorch; `mae-run` reads them from the graph.

pub mod heatmap;
pub mod occlusion;

use crate::{Error, Result};

/// Why a class-token model gets no Grad-CAM; each tool adds what to use instead.
pub const GRADCAM_NEEDS_GLOBAL_POOL: &str =
    "gradcam needs a global-pool head (mean of the patch tokens, fc_norm, linear): this model \
     classifies from its class token, and a class-token head's score has no gradient with \
     respect to the last block's patch tokens, so the map would be zero everywhere.";

/// An explanation method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Attention rollout: an output of models exported with `--explain rollout`.
    Rollout,
    /// Grad-CAM on the last block: an output of models exported with `--explain gradcam`.
    Gradcam,
    /// Occlusion sensitivity: any classifier, one pass per window position.
    Occlusion,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Rollout => "rollout",
            Method::Gradcam => "gradcam",
            Method::Occlusion => "occlusion",
        }
    }

    /// Parses `rollout`, `gradcam` or `occlusion`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "rollout" => Ok(Method::Rollout),
            "gradcam" => Ok(Method::Gradcam),
            "occlusion" => Ok(Method::Occlusion),
            other => Err(Error::Explain(format!(
                "unknown explanation '{other}' (expected rollout, gradcam, occlusion)"
            ))),
        }
    }

    /// The graph output that holds this method's map (none for occlusion).
    pub fn graph_output(self) -> Option<&'static str> {
        match self {
            Method::Rollout => Some("rollout"),
            Method::Gradcam => Some("gradcam"),
            Method::Occlusion => None,
        }
    }
}

/// One image's map: `[classes, h, w]` when `per_class`, else `[h, w]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    pub method: Method,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    pub per_class: bool,
}

impl Explanation {
    /// Height and width of the map.
    pub fn grid(&self) -> (usize, usize) {
        let n = self.shape.len();
        (self.shape[n - 2], self.shape[n - 1])
    }

    /// The map of class `c` (the one map when it is not per class).
    pub fn class_map(&self, c: usize) -> Result<&[f32]> {
        let (h, w) = self.grid();
        if !self.per_class {
            return Ok(&self.values);
        }
        let classes = self.shape[0];
        if c >= classes {
            return Err(Error::Explain(format!(
                "{} map has {classes} classes, no class {c}",
                self.method.as_str()
            )));
        }
        Ok(&self.values[c * h * w..(c + 1) * h * w])
    }
}
