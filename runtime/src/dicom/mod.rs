//! mae-run as a clinic's DICOM node: studies in from a PACS or a modality (C-STORE), results
//! back into the same study as DICOM (a Comprehensive SR and a Secondary Capture per image),
//! with nothing lost on the way.
//!
//! ```text
//!  caller ──C-STORE──► listener.rs ──► spool.rs (SPOOL/incoming, fsynced) ──► Success
//!                                          │
//!                      process.rs ◄────────┘  decode (models::input), preprocess, classify
//!                          │                  (the served model's workers), sr.rs, capture.rs
//!                          ├──► --results-dir (atomic files)
//!                          └──► queue.rs (SPOOL/outbox/DEST, retried) ──scu.rs──► PACS
//!                                                                     └─stow.rs──► DICOMweb
//!  POST /dicomweb/studies ──► stow.rs (Intake: checked, spooled as a C-STORE is)
//! ```
//!
//! - `listener.rs`: associations through dicom-ul, C-ECHO and C-STORE SCP, the callers
//!   (`callers.rs`), DICOM TLS (`tls.rs`), the limits; `dimse.rs`: command sets, statuses, the SOP classes and
//!   transfer syntaxes taken.
//! - `sr.rs`, `capture.rs`: the results, UIDs from `uids.rs`, class codes from `codes.rs`, the
//!   source's Patient and Study from `source.rs`.
//! - `stow.rs`: DICOMweb STOW-RS, in (the HTTP server's `POST /dicomweb/studies`, through
//!   [`Started::intake`]) and out (`--forward-stow`).
//! - `queue.rs`: the outboxes of `--forward` and `--forward-stow`; `scu.rs`: the SCU they and `mae-run dicom-echo`
//!   and `dicom-send` use.
//!
//! Every state change (received, classified, failed, sent, given up) is a record given to
//! [`Events`], which `mae-run serve` appends to its `--audit-log`. This layer knows nothing of
//! HTTP: the model comes in as a [`Classify`].

pub mod args;
pub mod callers;
pub mod capture;
pub mod codes;
pub mod dimse;
pub mod listener;
pub mod process;
pub mod queue;
pub mod scu;
pub mod source;
pub mod spool;
pub mod sr;
pub mod stow;
pub mod tls;
pub mod uids;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::info;

use self::callers::Callers;
use self::codes::Codes;
use self::queue::{Destination, Outbox, Retry};
use crate::engine::model::ModelMeta;
use crate::engine::Scores;
use crate::explain::Method;

/// The model the node classifies with: the served one, through its workers.
pub trait Classify: Send + Sync {
    fn meta(&self) -> &ModelMeta;
    /// The name the model is served under.
    fn name(&self) -> &str;
    /// The outputs of one preprocessed image (its probabilities, and its explanation maps
    /// when the model has them); an error is worth retrying later (the model was busy or
    /// stopping).
    fn classify(&self, pixels: Vec<f32>) -> Result<Scores, String>;
}

/// Where the node's audit records go (one JSON object per state change), and the changes the
/// metrics count but the audit log does not.
pub trait Events: Send + Sync + std::fmt::Debug {
    fn record(&self, record: serde_json::Value);
    /// An association accepted (`true`) or, later, ended (`false`).
    fn association(&self, _open: bool) {}
}

/// Audit records to the log only (no `--audit-log`).
#[derive(Debug)]
pub struct LogEvents;

impl Events for LogEvents {
    fn record(&self, record: serde_json::Value) {
        tracing::debug!("audit: {record}");
    }
}

/// The node's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_associations: usize,
    pub max_pdu: u32,
    pub max_instance_bytes: usize,
    pub idle: Duration,
}

/// Everything the node runs with, checked.
#[derive(Debug)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub ae_title: String,
    pub callers: Option<Arc<Callers>>,
    /// DICOM TLS (`tls.rs`): every association starts with a handshake.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub limits: Limits,
    pub spool: PathBuf,
    pub results_dir: Option<PathBuf>,
    /// `--forward` and `--forward-stow`, in that order.
    pub forward: Vec<Destination>,
    pub retry: Retry,
    pub uid_root: String,
    pub codes: Codes,
    pub workers: usize,
    /// The heatmap of the Secondary Captures, as asked for (resolved against the model's
    /// outputs by [`start`]).
    pub heatmap: args::Heatmap,
}

/// The model as the results name it.
#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    pub sha256: String,
    pub software_version: String,
}

/// One image's classification: the predicted class and every class's probability.
#[derive(Debug, Clone)]
pub struct Classified {
    pub class_index: usize,
    pub probabilities: Vec<f32>,
}

/// A started node: the address it listens on, and where STOW-RS bodies go.
#[derive(Debug)]
pub struct Started {
    pub addr: SocketAddr,
    pub intake: Arc<stow::Intake>,
}

/// Starts the node: the spool, the outboxes, the processing threads (taking up what a
/// previous run left in the spool) and the listener.
pub fn start(
    cfg: NodeConfig,
    classifier: Arc<dyn Classify>,
    events: Arc<dyn Events>,
) -> anyhow::Result<Started> {
    cfg.codes.check_classes(&classifier.meta().class_names)?;
    let heatmap = heatmap_method(cfg.heatmap, classifier.name(), classifier.meta())?;
    let cfg = Arc::new(cfg);
    let spool = Arc::new(spool::Spool::open(&cfg.spool)?);
    if let Some(dir) = &cfg.results_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create --results-dir {}: {e}", dir.display()))?;
        spool::clear_partial(dir)?;
    }
    let mut outboxes = Vec::new();
    for peer in &cfg.forward {
        outboxes.push(Outbox::start(
            &cfg.spool,
            peer.clone(),
            cfg.ae_title.clone(),
            cfg.retry,
            events.clone(),
        )?);
    }
    let model = Model {
        name: classifier.name().to_string(),
        sha256: classifier.meta().sha256.clone(),
        software_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let (tx, rx) = mpsc::channel();
    let pending = spool.pending()?;
    if !pending.is_empty() {
        info!(
            "DICOM spool {}: {} instance(s) received before the last stop, classifying them",
            cfg.spool.display(),
            pending.len()
        );
    }
    for p in pending {
        let _ = tx.send(p);
    }
    let processor = Arc::new(process::Processor {
        cfg: cfg.clone(),
        classifier,
        spool: spool.clone(),
        outboxes,
        events: events.clone(),
        model,
        heatmap,
    });
    processor.start(rx, tx.clone(), cfg.workers)?;
    let intake = Arc::new(stow::Intake {
        cfg: cfg.clone(),
        spool: spool.clone(),
        received: std::sync::Mutex::new(tx.clone()),
        events: events.clone(),
    });
    let addr = listener::start(cfg, spool, tx, events)?;
    Ok(Started { addr, intake })
}

/// The map `choice` gives with a model whose outputs are `meta.output_names`: `auto` takes
/// Grad-CAM, else rollout, else none; a method asked for by name must be there.
pub fn heatmap_method(
    choice: args::Heatmap,
    name: &str,
    meta: &ModelMeta,
) -> anyhow::Result<Option<Method>> {
    let has = |m: Method| {
        m.graph_output()
            .is_some_and(|o| meta.output_names.iter().any(|n| n == o))
    };
    let wanted = match choice {
        args::Heatmap::None => return Ok(None),
        args::Heatmap::Auto => {
            return Ok([Method::Gradcam, Method::Rollout]
                .into_iter()
                .find(|&m| has(m)))
        }
        args::Heatmap::Rollout => Method::Rollout,
        args::Heatmap::Gradcam => Method::Gradcam,
    };
    crate::explain::require_output(name, &meta.output_names, wanted)
        .map_err(|e| anyhow::anyhow!("--dicom-heatmap: {e:#}"))?;
    Ok(Some(wanted))
}

/// The current UTC time as (year, month, day, hour, minute, second).
pub fn now_utc() -> (i64, u32, u32, u32, u32, u32) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32);
    // Days since 1970-01-01 to a civil date, Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}
