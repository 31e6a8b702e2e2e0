//! Services started beside HTTP on the same models and workers (the DICOM node): an
//! [`Attach`] is given a [`Served`] model once the workers run.

use std::sync::Arc;

use crate::engine::model::ModelMeta;
use crate::engine::Scores;
use crate::serve::audit::AuditLog;
use crate::serve::metrics::Metrics;
use crate::serve::state::Shared;
use crate::serve::workers;

/// One served model, as a service beside HTTP sees it: its metadata, its queue to the
/// workers, and the audit log.
#[derive(Debug, Clone)]
pub struct Served {
    shared: Arc<Shared>,
    slot: usize,
}

impl Served {
    pub(crate) fn new(shared: Arc<Shared>, slot: usize) -> Self {
        Self { shared, slot }
    }

    /// The name the model is served under.
    pub fn name(&self) -> &str {
        &self.shared.models[self.slot].name
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.shared.models[self.slot].meta
    }

    /// Queues `images` preprocessed images for the model's workers (with the HTTP requests)
    /// and waits for their outputs.
    pub fn infer(&self, pixels: Vec<f32>, images: usize) -> Result<Scores, String> {
        workers::infer(&self.shared, &self.shared.models[self.slot], pixels, images)
            .map_err(|(code, msg)| format!("{msg} ({code})"))
    }

    /// The server's series (`/metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Gives `POST /dicomweb/studies` (STOW-RS) to `ingest`; until then the route answers 404.
    pub fn set_ingest(&self, ingest: Arc<dyn Ingest>) {
        let _ = self.shared.ingest.set(ingest);
    }

    /// The server's `--audit-log`, if any.
    pub fn audit(&self) -> Option<&AuditLog> {
        self.shared.audit.as_ref()
    }
}

/// What takes DICOM instances posted to `POST /dicomweb/studies[/{study}]` (DICOMweb STOW-RS).
pub trait Ingest: Send + Sync + std::fmt::Debug {
    /// Answers one request with Content-Type `content_type` and body `body`, from `client`, to
    /// the study `study` when the URL names one: (HTTP status, content type, body).
    fn stow(
        &self,
        content_type: &str,
        body: &[u8],
        study: Option<&str>,
        client: &str,
    ) -> (u16, &'static str, Vec<u8>);
}

/// A service to start once the models serve.
pub struct Attach(pub Box<dyn FnOnce(Served) -> anyhow::Result<()> + Send>);

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Attach")
    }
}
