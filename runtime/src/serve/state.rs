//! What the server's threads share: the served models and their queues, the metrics, the audit
//! log and the keys; a request as the handlers see it, and their answers.

use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, SyncSender};
use std::sync::Mutex;
use std::time::Duration;

use hyper::{HeaderMap, Method};
use serde_json::json;

use crate::engine::model::ModelMeta;
use crate::engine::Scores;
use crate::serve::audit::{AuditLog, AuditRecord};
use crate::serve::auth::ApiKeys;
use crate::serve::metrics::{Metrics, ModelLabels};

/// One queued inference: a request's images.
#[derive(Debug)]
pub struct Job {
    pub pixels: Vec<f32>,
    pub images: usize,
    pub reply: mpsc::Sender<Result<Scores, String>>,
}

/// One served model: its queue to its inference threads, and what its answers say about it.
#[derive(Debug)]
pub struct Slot {
    pub name: String,
    pub version: String,
    pub version_number: u64,
    pub labels: ModelLabels,
    /// The backend that runs it, as it describes itself.
    pub backend: String,
    pub meta: ModelMeta,
    pub model_doc: serde_json::Value,
    pub v2_doc: serde_json::Value,
    pub jobs: Mutex<Option<SyncSender<Job>>>,
    pub queued: AtomicU64,
}

impl Slot {
    /// The audit record of a prediction by this model for `caller`'s request `request_id`
    /// (`record`, from `AuditRecord::prediction`), asked for through `api`.
    pub fn audit(
        &self,
        api: &'static str,
        request_id: &str,
        caller: &Caller,
        record: AuditRecord,
    ) -> AuditRecord {
        AuditRecord {
            api: Some(api),
            request_id: Some(request_id.to_string()),
            model: Some(self.name.clone()),
            model_version: Some(self.version.clone()),
            backend: Some(self.backend.clone()),
            key: caller.key.clone(),
            client: caller.address.clone(),
            ..record
        }
    }
}

/// What the HTTP workers share.
#[derive(Debug)]
pub struct Shared {
    pub models: Vec<Slot>,
    pub metrics: Metrics,
    pub audit: Option<AuditLog>,
    pub keys: Option<ApiKeys>,
    pub next_id: AtomicU64,
    /// Time a request may wait for its prediction.
    pub timeout: Duration,
    /// Serving a `--model-repository` (which adds Triton's repository index).
    pub repository: bool,
    /// Where `POST /dicomweb/studies` goes, once a DICOM node is attached.
    pub ingest: std::sync::OnceLock<std::sync::Arc<dyn crate::serve::attach::Ingest>>,
}

impl Shared {
    /// Counts an inference request of `slot` answered with `code`.
    pub fn answered(&self, slot: &Slot, code: u16) {
        self.metrics.answered(&slot.labels, code);
    }

    /// A new request id, `r1`, `r2`, ...
    pub fn request_id(&self) -> String {
        let n = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        format!("r{n}")
    }
}

/// Who sent a request: the name of its API key (with --api-keys) and its address.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key: Option<String>,
    pub address: Option<String>,
}

/// A request as the handlers see it: its head, who sent it, and its body.
#[derive(Debug)]
pub struct Req {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub caller: Caller,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An answer: status, extra headers and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(status: u16, content_type: &str, body: Vec<u8>) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", content_type.to_string())],
            body,
        }
    }

    /// This answer with one more header.
    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }
}

pub fn json_response(code: u16, v: &serde_json::Value) -> Reply {
    Reply::new(code, "application/json", v.to_string().into_bytes())
}

pub fn error_response(code: u16, msg: &str) -> Reply {
    json_response(code, &json!({"error": msg, "status": code}))
}

/// An error in the form of the route's API: the Open Inference Protocol's under `/v2`.
pub fn route_error(path: &str, code: u16, msg: &str) -> Reply {
    if path == "/v2" || path.starts_with("/v2/") {
        v2_error(code, msg)
    } else {
        error_response(code, msg)
    }
}

/// An error in the Open Inference Protocol's form.
pub fn v2_error(code: u16, msg: &str) -> Reply {
    json_response(code, &json!({ "error": msg }))
}
