//! `mae-run serve`: an HTTP JSON API with dynamic batching.
//!
//! - `POST /v1/predict`: one image (PNG, JPEG, BMP, TIFF or DICOM bytes) as the body, or several
//!   as `multipart/form-data`; `?top_k=N`. Answers the predictions with the model's SHA-256 and
//!   architecture. 413 when the body is over `--max-body-bytes`, 400 when an image does not
//!   decode, 503 when the queue is full, 504 past `--timeout-ms` (`v1.rs`).
//! - `GET /v1/model`: metadata and SHA-256. `GET /healthz`. `GET /metrics`: Prometheus text
//!   (`metrics.rs`).
//! - The Open Inference Protocol (KServe v2, as Triton speaks it; `v2.rs` on the codec of
//!   `oip.rs`): `GET /v2`, `/v2/health/live`, `/v2/health/ready`,
//!   `/v2/models/{name}[/versions/{v}]`, `.../ready`, `POST .../infer`. Errors are
//!   `{"error": "..."}`.
//!
//! Access: the server listens on loopback unless told otherwise, and another address needs
//! `--api-keys FILE` (bearer tokens, `auth.rs`) or an explicit `--insecure-no-auth`. With keys,
//! every route but the health probes (`/healthz`, `/v2/health/*`) answers 401 to a request
//! without a valid token, before reading its body (`routes.rs`); the audit log (`audit.rs`)
//! names the key and the caller's address.
//!
//! HTTP worker threads (`transport.rs`: hyper, rustls, limits) decode and preprocess. With tract
//! on several threads (`--parallel auto` or `images`), one model worker per thread takes queued
//! requests one at a time: a request that finds the others idle and nothing else queued runs
//! over every thread (its latency is bench's at batch 1); under load each worker runs its
//! images on its own thread, with no pause between batches. Otherwise one inference thread owns
//! the model and batches what is queued (up to `--max-batch` images, waiting at most
//! `--max-wait-ms` for more) (`workers.rs`). On SIGINT/SIGTERM the server stops taking
//! requests, answers every accepted one, and exits.

pub mod attach;
pub mod audit;
pub mod auth;
pub mod metrics;
pub mod oip;
pub mod repository;
mod routes;
mod state;
pub mod transport;
pub mod v1;
mod v2;
mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use self::audit::AuditLog;
use self::auth::ApiKeys;
use self::metrics::{Metrics, ModelLabels};
use self::state::{Job, Shared, Slot};
use self::workers::Lanes;
use crate::engine::settings::ModelArgs;
use crate::engine::Engine;

/// How the models are queued and batched.
#[derive(Debug, Clone)]
pub struct Batching {
    /// Largest batch a batcher runs.
    pub max_batch: usize,
    /// How long the first queued request waits for others to batch with.
    pub max_wait: Duration,
    /// Requests waiting for a model at most.
    pub queue_size: usize,
    /// Time a request may wait for its prediction.
    pub timeout: Duration,
    /// A test hook: a sleep in every model run.
    pub delay: Duration,
}

/// Everything the server runs with, checked and loaded from its flags.
#[derive(Debug)]
pub struct Config {
    /// The model flags: the one model, or those every repository model loads with.
    pub model: ModelArgs,
    pub model_repository: Option<PathBuf>,
    pub listen: SocketAddr,
    pub keys: Option<ApiKeys>,
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    pub audit: Option<AuditLog>,
    pub batching: Batching,
    pub limits: transport::Limits,
    /// A service to start beside HTTP once the models serve (the DICOM node).
    pub attach: Option<attach::Attach>,
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(config: Config) -> anyhow::Result<ExitCode> {
    let models = load_models(&config)?;
    let backend = models[0].2.describe_backend();
    let what = match &models[..] {
        [(_, _, e)] => format!("{} ({})", e.file.path.display(), &e.file.sha256[..12]),
        many => format!("{} models", many.len()),
    };
    let b = config.batching.clone();
    let repository = config.model_repository.is_some();
    let running = match models[0].2.lanes() {
        0 | 1 => format!("max batch {}", b.max_batch),
        n => format!("{n} model workers"),
    };
    let Config {
        listen,
        keys,
        tls,
        audit,
        limits,
        attach,
        ..
    } = config;
    let metrics = match &attach {
        Some(_) => Metrics::new().with_dicom(),
        None => Metrics::new(),
    };
    let (shared, batchers) = start_models(models, &b, audit, keys, repository, metrics)?;
    if let Some(attach) = attach {
        (attach.0)(attach::Served::new(shared.clone(), 0))?;
    }
    let secured = shared.keys.is_some();
    let scheme = if tls.is_some() { "https" } else { "http" };
    transport::serve(listen, tls, limits, shared.clone(), |addr| {
        eprintln!(
            "mae-run: serving {what} on {scheme}://{addr} with {backend} · {running}, queue {}{}",
            b.queue_size,
            if secured {
                " · bearer tokens required"
            } else {
                ""
            }
        );
    })?;
    // Every connection is closed: close the queues; the model threads answer what is left and
    // end.
    for slot in &shared.models {
        if let Ok(mut jobs) = slot.jobs.lock() {
            jobs.take();
        }
    }
    for b in batchers {
        let _ = b.join();
    }
    eprintln!("mae-run: stopped");
    Ok(ExitCode::SUCCESS)
}

/// The models to serve, as (name, version, engine): the `--model` file (named after its file
/// stem, version 1) or every model of `--model-repository`.
fn load_models(config: &Config) -> anyhow::Result<Vec<(String, u64, Engine)>> {
    let Some(dir) = &config.model_repository else {
        let engine = config.model.load()?;
        engine.note_calibration();
        let name = engine
            .file
            .path
            .file_stem()
            .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned());
        return Ok(vec![(name, 1, engine)]);
    };
    let mut out = Vec::new();
    for entry in repository::scan(dir)? {
        let mut one = config.model.clone();
        one.model = entry.path.clone();
        let engine = one
            .load()
            .with_context(|| format!("model {} version {}", entry.name, entry.version))?;
        engine.note_calibration();
        eprintln!(
            "mae-run: model {} version {}: {} ({})",
            entry.name,
            entry.version,
            entry.path.display(),
            &engine.file.sha256[..12]
        );
        out.push((entry.name, entry.version, engine));
    }
    Ok(out)
}

/// `GET /v1/model`'s document.
fn model_doc(engine: &Engine, max_batch: usize) -> serde_json::Value {
    let m = &engine.meta;
    json!({
        "file": engine.file.path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "sha256": m.sha256,
        "arch": m.arch,
        "task": m.task.as_str(),
        "class_names": m.class_names,
        "preprocess": m.preprocess,
        "temperature": m.temperature,
        "threshold": m.decision_threshold(),
        "checkpoint_sha256": m.checkpoint_sha256,
        "exporter_version": m.exporter_version,
        "metrics": m.metrics,
        "metadata": engine.file.props,
        "backend": engine.describe_backend(),
        "max_batch": max_batch,
    })
}

/// Starts one inference thread per model (name, version, engine), or one per thread for a
/// backend with lanes; returns what the request handlers share and the threads.
#[allow(clippy::type_complexity)]
fn start_models(
    models: Vec<(String, u64, Engine)>,
    b: &Batching,
    audit: Option<AuditLog>,
    keys: Option<ApiKeys>,
    repository: bool,
    metrics: Metrics,
) -> anyhow::Result<(Arc<Shared>, Vec<std::thread::JoinHandle<()>>)> {
    let mut slots = Vec::new();
    let mut engines = Vec::new();
    let all_versions = |name: &str| -> Vec<String> {
        models
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, v, _)| v.to_string())
            .collect()
    };
    let versions_of: Vec<Vec<String>> = models.iter().map(|(n, _, _)| all_versions(n)).collect();
    for ((name, version_number, engine), versions) in models.into_iter().zip(versions_of) {
        let version = version_number.to_string();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(b.queue_size);
        let mut v2_doc =
            oip::model_metadata(&name, &versions, &engine.file.inputs, &engine.file.outputs);
        v2_doc["parameters"] = json!({
            "sha256": engine.meta.sha256,
            "arch": engine.meta.arch,
            "task": engine.meta.task.as_str(),
            "class_names": engine.meta.class_names,
            "input_size": engine.meta.preprocess.input_size,
            "mean": engine.meta.preprocess.mean,
            "std": engine.meta.preprocess.std,
        });
        let labels = ModelLabels::new(&name, &version);
        metrics.add_model(&labels, &engine.meta.sha256, engine.meta.arch.as_deref());
        slots.push(Slot {
            name,
            version,
            version_number,
            labels,
            backend: engine.describe_backend(),
            meta: engine.meta.clone(),
            model_doc: model_doc(&engine, b.max_batch),
            v2_doc,
            jobs: Mutex::new(Some(tx)),
            queued: AtomicU64::new(0),
        });
        engines.push((engine, rx));
    }
    let shared = Arc::new(Shared {
        models: slots,
        metrics,
        audit,
        keys,
        next_id: AtomicU64::new(1),
        timeout: b.timeout,
        repository,
        ingest: std::sync::OnceLock::new(),
    });
    let delay = b.delay;
    let mut threads = Vec::new();
    for (i, (engine, rx)) in engines.into_iter().enumerate() {
        let lanes = engine.lanes();
        if lanes >= 2 {
            let engine = Arc::new(engine);
            let queue = Arc::new(Lanes {
                rx: Mutex::new(rx),
                busy: AtomicUsize::new(0),
                gate: RwLock::new(()),
            });
            for _ in 0..lanes {
                let (engine, queue, shared) = (engine.clone(), queue.clone(), shared.clone());
                threads.push(std::thread::spawn(move || {
                    workers::lane_loop(&engine, &queue, &shared, i, delay)
                }));
            }
        } else {
            let shared = shared.clone();
            let batch = (b.max_batch, b.max_wait);
            threads.push(std::thread::spawn(move || {
                workers::batch_loop(engine, rx, &shared, i, batch, delay)
            }));
        }
    }
    Ok((shared, threads))
}
