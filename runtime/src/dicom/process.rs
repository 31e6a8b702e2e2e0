//! From the spool to the results: each received instance is decoded by the input layer (its
//! first frame), preprocessed as `mae-run predict` does, classified by the served model's
//! workers, and written as a Comprehensive SR and a Secondary Capture into `--results-dir`
//! and every `--forward` outbox; only then does it leave the spool. An instance that cannot be
//! decoded moves to `SPOOL/failed/`; one that meets a busy or stopping model stays and is
//! tried again.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dicom_dictionary_std::tags;
use mae_models::imaging::preprocess_eval;
use serde_json::json;
use tracing::{info, warn};

use super::queue::Outbox;
use super::source::Source;
use super::spool::{write_atomic, Spool};
use super::{capture, sr, Classified, Classify, Events, Model, NodeConfig};
use crate::engine;
use crate::explain::{self, heatmap, Method};

/// Why an instance was not classified.
enum Failure {
    /// It never will be (does not decode): move it to `failed/`.
    Bad(String),
    /// It may be later (the model was busy, a disk was full): try again.
    Later(String),
}

/// What the processing threads share.
pub struct Processor {
    pub cfg: Arc<NodeConfig>,
    pub classifier: Arc<dyn Classify>,
    pub spool: Arc<Spool>,
    pub outboxes: Vec<Arc<Outbox>>,
    pub events: Arc<dyn Events>,
    pub model: Model,
    /// The map the Secondary Captures show, if any.
    pub heatmap: Option<Method>,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("model", &self.model)
            .finish()
    }
}

impl Processor {
    /// Starts `threads` processing threads taking spooled paths from `rx`; `retry` puts a
    /// path back after a failure that may pass.
    pub fn start(
        self: Arc<Self>,
        rx: Receiver<PathBuf>,
        retry: Sender<PathBuf>,
        threads: usize,
    ) -> anyhow::Result<()> {
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..threads.max(1) {
            let (me, rx, retry) = (self.clone(), rx.clone(), retry.clone());
            std::thread::Builder::new()
                .name("dicom-process".into())
                .spawn(move || loop {
                    let next = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(path) = next else { return };
                    me.handle(&path, &retry);
                })?;
        }
        Ok(())
    }

    fn handle(&self, path: &Path, retry: &Sender<PathBuf>) {
        if !path.exists() {
            // Already done (the same instance was queued twice).
            return;
        }
        match self.process(path) {
            Ok(()) => {
                if let Err(e) = self.spool.done(path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        warn!("spool: cannot remove {}: {e}", path.display());
                    }
                }
            }
            Err(Failure::Bad(why)) => {
                warn!("DICOM {}: not classified: {why}", path.display());
                let moved = self.spool.fail(path, &why);
                self.events.record(json!({
                    "event": "dicom-failed",
                    "file": moved.as_ref().map_or_else(|_| path.display().to_string(), |p| p.display().to_string()),
                    "reason": why,
                }));
            }
            Err(Failure::Later(why)) => {
                warn!(
                    "DICOM {}: not classified yet: {why}; trying again",
                    path.display()
                );
                let (retry, path) = (retry.clone(), path.to_path_buf());
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(2));
                    let _ = retry.send(path);
                });
            }
        }
    }

    fn process(&self, path: &Path) -> Result<(), Failure> {
        let bytes = std::fs::read(path).map_err(|e| Failure::Later(format!("cannot read: {e}")))?;
        let img =
            mae_models::input::decode(&bytes, path).map_err(|e| Failure::Bad(e.to_string()))?;
        let source = Source::parse(&bytes).map_err(|e| Failure::Bad(format!("{e:#}")))?;
        if source
            .text(tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER_MODEL_NAME)
            .as_deref()
            == Some("mae-run")
        {
            // A result of mae-run sent back (a PACS routing the whole study): classifying it
            // would add results of results.
            info!(
                "DICOM {}: a mae-run result; not classified",
                source.sop_instance
            );
            self.events.record(json!({
                "event": "dicom-skipped",
                "sop_instance_uid": source.sop_instance,
                "reason": "a mae-run result",
            }));
            return Ok(());
        }
        let meta = self.classifier.meta();
        let pixels = preprocess_eval(&img, &meta.preprocess);
        let seen = self.heatmap.map(|_| pixels.clone());
        let scores = self.classifier.classify(pixels).map_err(Failure::Later)?;
        let probabilities = scores.probabilities.into_iter().next().unwrap_or_default();
        if probabilities.is_empty() {
            return Err(Failure::Later("the model returned no probabilities".into()));
        }
        let p = engine::label(meta, &probabilities, 1);
        let class_index = p
            .class
            .as_ref()
            .and_then(|c| meta.class_names.iter().position(|n| n == c))
            .or_else(|| p.top.first().map(|t| t.index))
            .unwrap_or(0);
        let result = Classified {
            class_index,
            probabilities,
        };
        let cfg = &self.cfg;
        let bad = |e: anyhow::Error| Failure::Bad(format!("{e:#}"));
        let (sr_uid, sr) = sr::build(
            &source,
            &result,
            meta,
            &self.model,
            &cfg.codes,
            &cfg.uid_root,
        )
        .map_err(bad)?;
        let heat = match (self.heatmap, seen) {
            (Some(method), Some(seen)) => Some(
                self.heat(method, &scores.maps, &seen, class_index)
                    .map_err(bad)?,
            ),
            _ => None,
        };
        let (sc_uid, sc) = capture::build(
            &source,
            &img,
            heat.as_ref(),
            &result,
            meta,
            &self.model,
            &cfg.uid_root,
        )
        .map_err(bad)?;
        let outputs = [(&sr_uid, &sr), (&sc_uid, &sc)];
        if let Some(dir) = &cfg.results_dir {
            for (uid, bytes) in outputs {
                write_atomic(dir, &format!("{uid}.dcm"), bytes).map_err(|e| {
                    Failure::Later(format!("cannot write into {}: {e}", dir.display()))
                })?;
            }
        }
        for outbox in &self.outboxes {
            for (uid, bytes) in outputs {
                outbox.put(&format!("{uid}.dcm"), bytes).map_err(|e| {
                    Failure::Later(format!("cannot queue for {}: {e}", outbox.peer))
                })?;
            }
        }
        let class = meta.class_name(class_index);
        info!(
            "DICOM {}: {class} ({:.4}); SR {sr_uid}, SC {sc_uid}",
            source.sop_instance,
            result
                .probabilities
                .get(class_index)
                .copied()
                .unwrap_or(f32::NAN)
        );
        self.events.record(json!({
            "event": "dicom-classified",
            "sop_instance_uid": source.sop_instance,
            "study_instance_uid": source.study,
            "model": self.model.name,
            "model_sha256": self.model.sha256,
            "class": class,
            "labels": meta.class_names,
            "probabilities": result.probabilities,
            "threshold": meta.decision_threshold(),
            "sr_sop_instance_uid": sr_uid,
            "sc_sop_instance_uid": sc_uid,
            "heatmap": self.heatmap.map(Method::as_str),
        }));
        Ok(())
    }

    /// The model's `method` map for class `class`, drawn over `seen` (the image as the model
    /// saw it), as `mae-run predict --heatmaps` draws it.
    fn heat(
        &self,
        method: Method,
        maps: &[engine::backend::OutputTensor],
        seen: &[f32],
        class: usize,
    ) -> anyhow::Result<capture::Heat> {
        let meta = self.classifier.meta();
        let e = explain::split_maps(maps, method, 1)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("the model returned no {} map", method.as_str()))?;
        let p = &meta.preprocess;
        let image = heatmap::overlay(
            seen,
            p.input_size,
            (p.mean, p.std),
            e.class_map(class)?,
            e.grid(),
            &heatmap::Style {
                colormap: heatmap::Colormap::Jet,
                opacity: 0.5,
                min_side: 224,
            },
        )?;
        let label = match method {
            Method::Gradcam => format!("Grad-CAM for {}", meta.class_name(class)),
            _ => "attention rollout".to_string(),
        };
        Ok(capture::Heat { image, label })
    }
}
