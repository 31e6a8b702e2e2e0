//! `mae-run serve`: an HTTP JSON API with dynamic batching.
//!
//! - `POST /v1/predict`: one image (PNG, JPEG, BMP, TIFF or DICOM bytes) as the body, or several
//!   as `multipart/form-data`; `?top_k=N`. Answers the predictions with the model's SHA-256 and
//!   architecture. 413 when the body is over `--max-body-bytes`, 400 when an image does not
//!   decode, 503 when the queue is full, 504 past `--timeout-ms`.
//! - `GET /v1/model`: metadata and SHA-256. `GET /healthz`. `GET /metrics`: Prometheus text.
//! - The Open Inference Protocol (KServe v2, as Triton speaks it; see `oip`): `GET /v2`,
//!   `/v2/health/live`, `/v2/health/ready`, `/v2/models/{name}[/versions/{v}]`,
//!   `.../ready`, `POST .../infer`. Errors are `{"error": "..."}`.
//!
//! Access: the server listens on loopback unless told otherwise, and another address needs
//! `--api-keys FILE` (bearer tokens, see `auth`) or an explicit `--insecure-no-auth`. With keys,
//! every route but the health probes (`/healthz`, `/v2/health/*`) answers 401 to a request
//! without a valid token, before reading its body; the audit log names the key and the caller's
//! address.
//!
//! HTTP worker threads decode and preprocess. With tract on several threads (`--parallel auto`
//! or `images`), one model worker per thread takes queued requests one at a time: a request
//! that finds the others idle and nothing else queued runs over every thread (its latency is
//! bench's at batch 1); under load each worker runs its images on its own thread, with no pause
//! between batches. Otherwise one inference thread owns the model and batches what is queued (up
//! to `--max-batch` images, waiting at most `--max-wait-ms` for more). On SIGINT/SIGTERM the
//! server stops taking requests, answers every accepted one, and exits.

mod transport;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyper::{HeaderMap, Method};
use mae_models::imaging::preprocess_eval;
use serde_json::json;

use crate::audit::AuditLog;
use crate::auth::ApiKeys;
use crate::engine::{label, Engine, Scores};
use crate::inputs::{decode_bytes, sha256_hex};
use crate::model::ModelMeta;
use crate::oip;
use crate::ModelArgs;

/// Arguments of `mae-run serve`.
#[derive(Debug, clap::Args)]
#[command(mut_arg("model", |a| a
    .required(false)
    .required_unless_present("model_repository")
    .conflicts_with("model_repository")
    .default_value("model.onnx")
    .hide_default_value(true)))]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Serve every model of a repository laid out as Triton's: DIR/NAME/VERSION/model.onnx
    /// (each with its own batcher; requests without a version get the highest).
    #[arg(long, value_name = "DIR")]
    pub model_repository: Option<PathBuf>,
    /// Address to listen on (loopback by default). Another address needs --api-keys or
    /// --insecure-no-auth.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Bearer tokens to accept: a file of `SHA256HEX NAME` lines (the SHA-256 of each token and
    /// a name for the audit log).
    #[arg(long, value_name = "FILE")]
    pub api_keys: Option<PathBuf>,
    /// Serve a non-loopback address without authentication (only behind another gate).
    #[arg(long, conflicts_with = "api_keys")]
    pub insecure_no_auth: bool,
    /// Largest batch the model runs (where requests are batched: ONNX Runtime, or tract with
    /// one thread or --parallel ops; tract on several threads otherwise runs one worker per
    /// thread, each taking one request at a time).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// How long the first queued request waits for others to batch with, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Requests waiting for the model at most; more are answered 503.
    #[arg(long, default_value_t = 64)]
    pub queue_size: usize,
    /// Requests decoded and preprocessed at once (each on its own thread).
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers), in bytes (431 beyond).
    #[arg(long, default_value_t = 16 << 10)]
    pub max_header_bytes: usize,
    /// Time a client has to send a request head, in milliseconds; slower connections are
    /// closed.
    #[arg(long, default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Time a client has to send a request body, in milliseconds (408 beyond).
    #[arg(long, default_value_t = 30_000)]
    pub body_timeout_ms: u64,
    /// Open connections at most; more are answered 503 and closed.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Time a request may wait for its prediction, in milliseconds (504 beyond).
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Append one JSON line per prediction to FILE.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Test hook: sleep this long in every model run (to test saturation and shutdown).
    #[arg(long, hide = true, default_value_t = 0)]
    pub debug_delay_ms: u64,
}

/// One queued inference: a request's images.
struct Job {
    pixels: Vec<f32>,
    images: usize,
    reply: mpsc::Sender<Result<Scores, String>>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Metrics {
    requests: BTreeMap<(String, u16), u64>,
    latency_buckets: Vec<u64>,
    latency_sum: f64,
    latency_count: u64,
    batch_buckets: Vec<u64>,
    batch_sum: u64,
    batch_count: u64,
    images: u64,
}

const LATENCY_BOUNDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BOUNDS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

impl Metrics {
    fn new() -> Self {
        Self {
            latency_buckets: vec![0; LATENCY_BOUNDS.len()],
            batch_buckets: vec![0; BATCH_BOUNDS.len()],
            ..Default::default()
        }
    }

    fn request(&mut self, route: &str, code: u16, seconds: f64) {
        *self.requests.entry((route.to_string(), code)).or_default() += 1;
        for (b, &le) in self.latency_buckets.iter_mut().zip(&LATENCY_BOUNDS) {
            if seconds <= le {
                *b += 1;
            }
        }
        self.latency_sum += seconds;
        self.latency_count += 1;
    }

    fn batch(&mut self, size: usize) {
        for (b, &le) in self.batch_buckets.iter_mut().zip(&BATCH_BOUNDS) {
            if size as f64 <= le {
                *b += 1;
            }
        }
        self.batch_sum += size as u64;
        self.batch_count += 1;
        self.images += size as u64;
    }

    fn render(&self, models: &[Slot]) -> String {
        let queued: u64 = models.iter().map(|m| m.queued.load(Ordering::SeqCst)).sum();
        let mut s = String::new();
        s += "# HELP mae_requests_total HTTP requests answered, by route and status code.\n";
        s += "# TYPE mae_requests_total counter\n";
        for ((route, code), n) in &self.requests {
            let _ = writeln!(
                s,
                "mae_requests_total{{route=\"{route}\",code=\"{code}\"}} {n}"
            );
        }
        let errors: u64 = self
            .requests
            .iter()
            .filter(|((_, c), _)| *c >= 400)
            .map(|(_, n)| n)
            .sum();
        s += "# HELP mae_request_errors_total HTTP requests answered with a 4xx or 5xx code.\n";
        s += "# TYPE mae_request_errors_total counter\n";
        let _ = writeln!(s, "mae_request_errors_total {errors}");
        s += "# HELP mae_request_duration_seconds Time from receiving a request to answering it.\n";
        s += "# TYPE mae_request_duration_seconds histogram\n";
        for (b, le) in self.latency_buckets.iter().zip(LATENCY_BOUNDS) {
            let _ = writeln!(s, "mae_request_duration_seconds_bucket{{le=\"{le}\"}} {b}");
        }
        let _ = writeln!(
            s,
            "mae_request_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            self.latency_count
        );
        let _ = writeln!(s, "mae_request_duration_seconds_sum {}", self.latency_sum);
        let _ = writeln!(
            s,
            "mae_request_duration_seconds_count {}",
            self.latency_count
        );
        s += "# HELP mae_batch_size Images per model run.\n";
        s += "# TYPE mae_batch_size histogram\n";
        for (b, le) in self.batch_buckets.iter().zip(BATCH_BOUNDS) {
            let _ = writeln!(s, "mae_batch_size_bucket{{le=\"{le}\"}} {b}");
        }
        let _ = writeln!(
            s,
            "mae_batch_size_bucket{{le=\"+Inf\"}} {}",
            self.batch_count
        );
        let _ = writeln!(s, "mae_batch_size_sum {}", self.batch_sum);
        let _ = writeln!(s, "mae_batch_size_count {}", self.batch_count);
        s += "# HELP mae_images_total Images run through the model.\n";
        s += "# TYPE mae_images_total counter\n";
        let _ = writeln!(s, "mae_images_total {}", self.images);
        s += "# HELP mae_queue_depth Requests waiting for the model.\n";
        s += "# TYPE mae_queue_depth gauge\n";
        let _ = writeln!(s, "mae_queue_depth {queued}");
        s += "# HELP mae_model_images_total Images run through each model.\n";
        s += "# TYPE mae_model_images_total counter\n";
        for m in models {
            let _ = writeln!(
                s,
                "mae_model_images_total{{{}}} {}",
                m.labels(),
                m.images.load(Ordering::SeqCst)
            );
        }
        s += "# HELP mae_model_batches_total Model runs of each model.\n";
        s += "# TYPE mae_model_batches_total counter\n";
        for m in models {
            let _ = writeln!(
                s,
                "mae_model_batches_total{{{}}} {}",
                m.labels(),
                m.batches.load(Ordering::SeqCst)
            );
        }
        s += "# HELP mae_model_queue_depth Requests waiting for each model.\n";
        s += "# TYPE mae_model_queue_depth gauge\n";
        for m in models {
            let _ = writeln!(
                s,
                "mae_model_queue_depth{{{}}} {}",
                m.labels(),
                m.queued.load(Ordering::SeqCst)
            );
        }
        s += "# HELP mae_model_requests_total Inference requests of each model, by status code.\n";
        s += "# TYPE mae_model_requests_total counter\n";
        for m in models {
            if let Ok(a) = m.answers.lock() {
                for (code, n) in a.iter() {
                    let _ = writeln!(
                        s,
                        "mae_model_requests_total{{{},code=\"{code}\"}} {n}",
                        m.labels()
                    );
                }
            }
        }
        s += "# HELP mae_model_info The models being served.\n";
        s += "# TYPE mae_model_info gauge\n";
        for m in models {
            let _ = writeln!(
                s,
                "mae_model_info{{model=\"{}\",version=\"{}\",sha256=\"{}\",arch=\"{}\"}} 1",
                label_value(&m.name),
                label_value(&m.version),
                m.meta.sha256,
                label_value(m.meta.arch.as_deref().unwrap_or(""))
            );
        }
        s
    }
}

/// A Prometheus label value with the characters that would break the line replaced.
fn label_value(v: &str) -> String {
    v.replace(['"', '\\', '\n'], "_")
}

/// One served model: its queue to its inference thread, and what its answers say about it.
struct Slot {
    name: String,
    version: String,
    version_number: u64,
    meta: ModelMeta,
    model_doc: serde_json::Value,
    v2_doc: serde_json::Value,
    jobs: Mutex<Option<SyncSender<Job>>>,
    queued: AtomicU64,
    images: AtomicU64,
    batches: AtomicU64,
    /// Inference requests answered, by status code.
    answers: Mutex<BTreeMap<u16, u64>>,
}

impl Slot {
    /// `model="...",version="..."`.
    fn labels(&self) -> String {
        format!(
            "model=\"{}\",version=\"{}\"",
            label_value(&self.name),
            label_value(&self.version)
        )
    }

    fn answered(&self, code: u16) {
        if let Ok(mut a) = self.answers.lock() {
            *a.entry(code).or_default() += 1;
        }
    }
}

/// What the HTTP workers share.
struct Shared {
    models: Vec<Slot>,
    metrics: Mutex<Metrics>,
    audit: Option<AuditLog>,
    keys: Option<ApiKeys>,
    next_id: AtomicU64,
    args: ServeLimits,
}

#[derive(Debug, Clone)]
struct ServeLimits {
    timeout: Duration,
}

/// Who sent a request: the name of its API key (with --api-keys) and its address.
#[derive(Debug, Clone)]
struct Caller {
    key: Option<String>,
    address: Option<String>,
}

/// A request as the handlers see it: its head, who sent it, and its body.
struct Req {
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
    body: Vec<u8>,
    caller: Caller,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An answer: status, extra headers and body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn new(status: u16, content_type: &str, body: Vec<u8>) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", content_type.to_string())],
            body,
        }
    }
}

fn with_header(mut r: Reply, name: &'static str, value: &str) -> Reply {
    r.headers.push((name, value.to_string()));
    r
}

fn json_response(code: u16, v: &serde_json::Value) -> Reply {
    Reply::new(code, "application/json", v.to_string().into_bytes())
}

fn error_response(code: u16, msg: &str) -> Reply {
    json_response(code, &json!({"error": msg, "status": code}))
}

/// An error in the form of the route's API: the Open Inference Protocol's under `/v2`.
fn route_error(path: &str, code: u16, msg: &str) -> Reply {
    if path == "/v2" || path.starts_with("/v2/") {
        v2_error(code, msg)
    } else {
        error_response(code, msg)
    }
}

/// An error in the Open Inference Protocol's form.
fn v2_error(code: u16, msg: &str) -> Reply {
    json_response(code, &json!({ "error": msg }))
}

/// Runs `mae-run serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.max_batch == 0 || args.queue_size == 0 || args.workers == 0 {
        bail!("--max-batch, --queue-size and --workers must be at least 1");
    }
    let keys = args.api_keys.as_deref().map(ApiKeys::load).transpose()?;
    if !args.listen.ip().is_loopback() && keys.is_none() && !args.insecure_no_auth {
        bail!(
            "--listen {} is not a loopback address: give --api-keys FILE to require bearer \
             tokens, or --insecure-no-auth to serve it without authentication",
            args.listen
        );
    }
    if args.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(transport::tls_config(cert, key)?),
        _ => None,
    };
    let audit = args.audit_log.as_deref().map(AuditLog::open).transpose()?;
    let models = load_models(&args)?;
    let backend = models[0].2.describe_backend();
    let what = match &models[..] {
        [(_, _, e)] => format!("{} ({})", e.file.path.display(), &e.file.sha256[..12]),
        many => format!("{} models", many.len()),
    };
    let running = match models[0].2.lanes() {
        0 | 1 => format!("max batch {}", args.max_batch),
        n => format!("{n} model workers"),
    };
    let (shared, batchers) = start_models(models, &args, audit, keys)?;
    let secured = shared.keys.is_some();
    let limits = transport::Limits {
        max_body: args.max_body_bytes,
        max_header: args.max_header_bytes,
        header_timeout: Duration::from_millis(args.header_timeout_ms),
        body_timeout: Duration::from_millis(args.body_timeout_ms),
        max_connections: args.max_connections,
        workers: args.workers,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    transport::serve(args.listen, tls, limits, shared.clone(), |addr| {
        eprintln!(
            "mae-run: serving {what} on {scheme}://{addr} with {backend} · {running}, queue {}{}",
            args.queue_size,
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
fn load_models(args: &ServeArgs) -> anyhow::Result<Vec<(String, u64, Engine)>> {
    let Some(dir) = &args.model_repository else {
        let engine = args.model.load()?;
        crate::note_calibration(&engine);
        let name = engine
            .file
            .path
            .file_stem()
            .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned());
        return Ok(vec![(name, 1, engine)]);
    };
    if args.model.expect_sha256.is_some() {
        bail!("--expect-sha256 names one model file; it does not apply to --model-repository");
    }
    let mut out = Vec::new();
    for entry in crate::repository::scan(dir)? {
        let mut one = args.model.clone();
        one.model = entry.path.clone();
        let engine = one
            .load()
            .with_context(|| format!("model {} version {}", entry.name, entry.version))?;
        crate::note_calibration(&engine);
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

fn model_doc(engine: &Engine, args: &ServeArgs) -> serde_json::Value {
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
        "max_batch": args.max_batch,
    })
}

/// Starts one inference thread per model (name, version, engine); returns what the request
/// handlers share and the threads.
#[allow(clippy::type_complexity)]
fn start_models(
    models: Vec<(String, u64, Engine)>,
    args: &ServeArgs,
    audit: Option<AuditLog>,
    keys: Option<ApiKeys>,
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
        let (tx, rx) = mpsc::sync_channel::<Job>(args.queue_size);
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
        slots.push(Slot {
            name,
            version,
            version_number,
            meta: engine.meta.clone(),
            model_doc: model_doc(&engine, args),
            v2_doc,
            jobs: Mutex::new(Some(tx)),
            queued: AtomicU64::new(0),
            images: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            answers: Mutex::new(BTreeMap::new()),
        });
        engines.push((engine, rx));
    }
    let shared = Arc::new(Shared {
        models: slots,
        metrics: Mutex::new(Metrics::new()),
        audit,
        keys,
        next_id: AtomicU64::new(1),
        args: ServeLimits {
            timeout: Duration::from_millis(args.timeout_ms),
        },
    });
    let delay = Duration::from_millis(args.debug_delay_ms);
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
                    lane_loop(&engine, &queue, &shared, i, delay)
                }));
            }
        } else {
            let shared = shared.clone();
            let (max_batch, wait) = (args.max_batch, Duration::from_millis(args.max_wait_ms));
            threads.push(std::thread::spawn(move || {
                batch_loop(engine, rx, &shared, i, max_batch, wait, delay)
            }));
        }
    }
    Ok((shared, threads))
}

/// What the workers of one model with lanes share: its queue, how many are running, and a
/// gate that a run over every thread holds alone and one-thread runs hold together.
struct Lanes {
    rx: Mutex<Receiver<Job>>,
    busy: AtomicUsize,
    gate: RwLock<()>,
}

/// One worker of a model with lanes: takes queued requests one at a time until the queue
/// closes. A one-image request that finds nothing else queued and the other workers idle runs
/// over every thread, for its latency; otherwise each worker runs its image on its own thread,
/// beside the others. A request of several images runs over every thread, as a batch.
fn lane_loop(engine: &Engine, lanes: &Lanes, shared: &Shared, slot: usize, delay: Duration) {
    let slot = &shared.models[slot];
    loop {
        let job = {
            let Ok(rx) = lanes.rx.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let waiting = slot.queued.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        let others = lanes.busy.fetch_add(1, Ordering::SeqCst);
        let alone = job.images == 1 && (waiting > 0 || others > 0);
        let result = {
            // A poisoned gate only means another worker panicked while holding it.
            let _held = if alone {
                (
                    Some(lanes.gate.read().unwrap_or_else(|e| e.into_inner())),
                    None,
                )
            } else {
                (
                    None,
                    Some(lanes.gate.write().unwrap_or_else(|e| e.into_inner())),
                )
            };
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            engine.scores_shared(&job.pixels, job.images, alone)
        };
        lanes.busy.fetch_sub(1, Ordering::SeqCst);
        if let Ok(mut m) = shared.metrics.lock() {
            m.batch(job.images);
        }
        slot.images.fetch_add(job.images as u64, Ordering::SeqCst);
        slot.batches.fetch_add(1, Ordering::SeqCst);
        let _ = job
            .reply
            .send(result.map_err(|e| format!("inference failed: {e:#}")));
    }
}

fn batch_loop(
    mut engine: Engine,
    rx: Receiver<Job>,
    shared: &Shared,
    slot: usize,
    max_batch: usize,
    wait: Duration,
    delay: Duration,
) {
    let slot = &shared.models[slot];
    let queued = &slot.queued;
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + wait;
        let mut jobs = vec![first];
        let mut images = jobs[0].images;
        while images < max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => {
                    images += j.images;
                    jobs.push(j);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        queued.fetch_sub(jobs.len() as u64, Ordering::SeqCst);
        let mut pixels = Vec::with_capacity(jobs.iter().map(|j| j.pixels.len()).sum());
        for j in &jobs {
            pixels.extend_from_slice(&j.pixels);
        }
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        // A request larger than max_batch runs alone, in one go.
        let result = engine.scores(&pixels, images);
        if let Ok(mut m) = shared.metrics.lock() {
            m.batch(images);
        }
        slot.images.fetch_add(images as u64, Ordering::SeqCst);
        slot.batches.fetch_add(1, Ordering::SeqCst);
        match result {
            Ok(scores) => {
                let mut probs = scores.probabilities.into_iter();
                let mut logits = scores.logits.map(Vec::into_iter);
                for j in jobs {
                    let mine = Scores {
                        probabilities: probs.by_ref().take(j.images).collect(),
                        logits: logits.as_mut().map(|l| l.by_ref().take(j.images).collect()),
                    };
                    let _ = j.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(format!("inference failed: {e:#}")));
                }
            }
        }
    }
}

/// Queues `images` preprocessed images for `slot`'s model and waits for their outputs; an
/// error is (HTTP status, message).
fn infer(
    shared: &Shared,
    slot: &Slot,
    pixels: Vec<f32>,
    images: usize,
) -> Result<Scores, (u16, String)> {
    let (reply, answer) = mpsc::channel();
    let job = Job {
        pixels,
        images,
        reply,
    };
    let sent = match slot.jobs.lock() {
        Ok(jobs) => match jobs.as_ref() {
            Some(tx) => {
                slot.queued.fetch_add(1, Ordering::SeqCst);
                let r = tx.try_send(job);
                if r.is_err() {
                    slot.queued.fetch_sub(1, Ordering::SeqCst);
                }
                r
            }
            None => return Err((503, "shutting down".into())),
        },
        Err(_) => return Err((500, "internal error".into())),
    };
    match sent {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return Err((
                503,
                "the server is saturated (queue full); retry later".into(),
            ))
        }
        Err(TrySendError::Disconnected(_)) => return Err((503, "shutting down".into())),
    }
    match answer.recv_timeout(shared.args.timeout) {
        Ok(Ok(scores)) => Ok(scores),
        Ok(Err(e)) => Err((500, e)),
        Err(_) => Err((504, "timed out waiting for the model".into())),
    }
}

/// Routes that need no token: health probes.
fn is_public(path: &str) -> bool {
    matches!(path, "/healthz" | "/v2/health/live" | "/v2/health/ready")
}

/// The route of `path` as `/metrics` labels it (model names folded into `{name}`).
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/predict" => "/v1/predict",
        "/v1/model" => "/v1/model",
        "/healthz" => "/healthz",
        "/metrics" => "/metrics",
        "/v2" => "/v2",
        "/v2/health/live" => "/v2/health/live",
        "/v2/health/ready" => "/v2/health/ready",
        p if p.starts_with("/v2/models/") => {
            if p.ends_with("/infer") {
                "/v2/models/{name}/infer"
            } else if p.ends_with("/ready") {
                "/v2/models/{name}/ready"
            } else {
                "/v2/models/{name}"
            }
        }
        _ => "other",
    }
}

/// Checks the bearer token of a request, from its head alone (before its body is read):
/// the name of its key, or the 401 answer.
fn gate(
    shared: &Shared,
    path: &str,
    headers: &HeaderMap,
    address: Option<&str>,
) -> Result<Option<String>, Reply> {
    let Some(keys) = &shared.keys else {
        return Ok(None);
    };
    if is_public(path) {
        return Ok(None);
    }
    let value = headers.get("Authorization").and_then(|v| v.to_str().ok());
    if let Some(name) = keys.check_header(value) {
        return Ok(Some(name.to_string()));
    }
    if let Some(log) = &shared.audit {
        let _ = log.append(json!({
            "event": "unauthorized",
            "route": route_label(path),
            "client": address,
        }));
    }
    let msg = "a valid bearer token is required (Authorization: Bearer TOKEN)";
    Err(with_header(
        route_error(path, 401, msg),
        "WWW-Authenticate",
        "Bearer",
    ))
}

/// Whether a request's body is read: only the prediction routes take one.
fn takes_body(method: &Method, path: &str) -> bool {
    *method == Method::POST && (path == "/v1/predict" || path.ends_with("/infer"))
}

/// Answers a request whose token (if needed) has been checked and whose body has been read.
fn handle(mut req: Req, shared: &Shared) -> Reply {
    if req.path == "/v2" || req.path.starts_with("/v2/") {
        return v2(&mut req, shared);
    }
    let query = req.query.clone();
    match (&req.method, req.path.as_str()) {
        (&Method::POST, "/v1/predict") => match v1_slot(shared, &query) {
            Ok(slot) => {
                let r = predict(&req, &query, shared, slot);
                slot.answered(r.status);
                r
            }
            Err(r) => r,
        },
        (&Method::GET, "/v1/model") => match v1_slot(shared, &query) {
            Ok(slot) => json_response(200, &slot.model_doc),
            Err(r) => r,
        },
        (&Method::GET, "/healthz") => json_response(200, &json!({"status": "ok"})),
        (&Method::GET, "/metrics") => {
            let text = shared
                .metrics
                .lock()
                .map_or_else(|_| String::new(), |m| m.render(&shared.models));
            Reply::new(200, "text/plain; version=0.0.4", text.into_bytes())
        }
        (_, "/v1/predict" | "/v1/model" | "/healthz" | "/metrics") => {
            error_response(405, "method not allowed")
        }
        _ => error_response(
            404,
            "not found: POST /v1/predict, GET /v1/model, /healthz, /metrics, /v2/...",
        ),
    }
}

/// The model a `/v1` request addresses: `?model=NAME`, else the first one.
fn v1_slot<'a>(shared: &'a Shared, query: &str) -> Result<&'a Slot, Reply> {
    match query.split('&').find_map(|kv| kv.strip_prefix("model=")) {
        None => shared
            .models
            .first()
            .ok_or_else(|| error_response(503, "no model is loaded")),
        Some(name) => find_slot(shared, name, None).map_err(|msg| error_response(404, &msg)),
    }
}

/// The model `name` at `version`, or at its highest version.
fn find_slot<'a>(
    shared: &'a Shared,
    name: &str,
    version: Option<&str>,
) -> Result<&'a Slot, String> {
    let mut of_name = shared.models.iter().filter(|s| s.name == name).peekable();
    if of_name.peek().is_none() {
        let names: std::collections::BTreeSet<&str> =
            shared.models.iter().map(|s| s.name.as_str()).collect();
        return Err(format!(
            "no model named '{name}' (served: {})",
            names.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    match version {
        None => Ok(of_name
            .max_by_key(|s| s.version_number)
            .ok_or_else(|| format!("no model named '{name}'"))?),
        Some(v) => {
            let all: Vec<&Slot> = of_name.collect();
            all.iter().find(|s| s.version == v).copied().ok_or_else(|| {
                let have: Vec<&str> = all.iter().map(|s| s.version.as_str()).collect();
                format!(
                    "model '{name}' has no version '{v}' (it has {})",
                    have.join(", ")
                )
            })
        }
    }
}

/// The Open Inference Protocol's routes.
fn v2(req: &mut Req, shared: &Shared) -> Reply {
    let path = req.path.clone();
    let segments: Vec<&str> = path
        .trim_start_matches("/v2")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let method = req.method.clone();
    let get = method == Method::GET || method == Method::HEAD;
    match segments.as_slice() {
        [] if get => json_response(200, &oip::server_metadata()),
        ["health", "live"] if get => json_response(200, &json!({"live": true})),
        ["health", "ready"] if get => json_response(200, &json!({"ready": true})),
        ["models", name, rest @ ..] => {
            let (version, rest) = match rest {
                ["versions", v, rest @ ..] => (Some(*v), rest),
                _ => (None, rest),
            };
            let slot = match find_slot(shared, name, version) {
                Ok(s) => s,
                Err(msg) => return v2_error(404, &msg),
            };
            match rest {
                [] if get => json_response(200, &slot.v2_doc),
                ["ready"] if get => json_response(
                    200,
                    &json!({"name": slot.name, "version": slot.version, "ready": true}),
                ),
                ["infer"] if method == Method::POST => {
                    let r = v2_infer(req, shared, slot);
                    slot.answered(r.status);
                    r
                }
                [] | ["ready"] | ["infer"] => v2_error(405, "method not allowed"),
                _ => v2_error(404, &format!("not found: {path}")),
            }
        }
        [] | ["health", "live"] | ["health", "ready"] => v2_error(405, "method not allowed"),
        _ => v2_error(404, &format!("not found: {path}")),
    }
}

fn v2_infer(req: &mut Req, shared: &Shared, slot: &Slot) -> Reply {
    let body = std::mem::take(&mut req.body);
    let caller = &req.caller;
    let header_len = match req.header("Inference-Header-Content-Length") {
        None => None,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => {
                return v2_error(
                    400,
                    &format!("Inference-Header-Content-Length '{v}' is not a number"),
                )
            }
        },
    };
    let parsed = oip::parse_request(&body, header_len)
        .and_then(|r| oip::to_pixels(&r.input, &slot.meta).map(|p| (r, p)));
    let (request, (pixels, images, shas)) = match parsed {
        Ok(x) => x,
        Err(e) => return v2_error(e.status, &e.message),
    };
    let scores = match infer(shared, slot, pixels, images) {
        Ok(s) => s,
        Err((code, msg)) => return v2_error(code, &msg),
    };
    let body = match oip::infer_response(&slot.name, &slot.version, &request, &scores, &slot.meta) {
        Ok(b) => b,
        Err(e) => return v2_error(e.status, &e.message),
    };
    if let Some(log) = &shared.audit {
        let request_id = request
            .id
            .clone()
            .unwrap_or_else(|| format!("r{}", shared.next_id.fetch_add(1, Ordering::SeqCst)));
        for (i, (sha, probs)) in shas.iter().zip(&scores.probabilities).enumerate() {
            let p = label(&slot.meta, probs, 1);
            let _ = log.append(json!({
                "request_id": request_id,
                "api": "v2",
                "model": slot.name,
                "model_version": slot.version,
                "input": format!("{}[{i}]", request.input.name),
                "input_sha256": sha,
                "model_sha256": slot.meta.sha256,
                "arch": slot.meta.arch,
                "class": p.class,
                "labels": p.labels,
                "probabilities": p.probabilities,
                "key": caller.key,
                "client": caller.address,
            }));
        }
    }
    match body.header_len {
        Some(n) => with_header(
            Reply::new(200, "application/octet-stream", body.bytes),
            "Inference-Header-Content-Length",
            &n.to_string(),
        ),
        None => Reply::new(200, "application/json", body.bytes),
    }
}

fn predict(req: &Req, query: &str, shared: &Shared, slot: &Slot) -> Reply {
    let caller = &req.caller;
    let body = &req.body;
    let top_k = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("top_k="))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    let request_id = req
        .header("X-Request-Id")
        .map(|s| s.chars().take(128).collect::<String>())
        .unwrap_or_else(|| format!("r{}", shared.next_id.fetch_add(1, Ordering::SeqCst)));
    let parts = match uploads(req.header("Content-Type"), body) {
        Ok(p) => p,
        Err(e) => return error_response(400, &e),
    };
    // Decode and preprocess here, on the worker thread.
    let mut pixels = Vec::new();
    let mut shas = Vec::new();
    for (name, bytes) in &parts {
        if bytes.is_empty() {
            return error_response(400, &format!("{name}: empty image"));
        }
        match decode_bytes(bytes, Path::new(name)) {
            Ok(img) => pixels.extend(preprocess_eval(&img, &slot.meta.preprocess)),
            Err(e) => return error_response(400, &format!("{e:#}")),
        }
        shas.push(sha256_hex(bytes));
    }
    let rows = match infer(shared, slot, pixels, parts.len()) {
        Ok(s) => s.probabilities,
        Err((code, msg)) => return error_response(code, &msg),
    };
    let meta = &slot.meta;
    let mut predictions = Vec::new();
    for (((name, _), sha), probs) in parts.iter().zip(&shas).zip(&rows) {
        let p = label(meta, probs, top_k);
        if let Some(log) = &shared.audit {
            let _ = log.append(json!({
                "request_id": request_id,
                "api": "v1",
                "model": slot.name,
                "input": name,
                "input_sha256": sha,
                "model_sha256": meta.sha256,
                "arch": meta.arch,
                "class": p.class,
                "labels": p.labels,
                "probabilities": p.probabilities,
                "key": caller.key,
                "client": caller.address,
            }));
        }
        predictions.push(json!({
            "name": name,
            "input_sha256": sha,
            "class": p.class,
            "probability": p.probability,
            "labels": p.labels,
            "top": p.top,
            "probabilities": p.probabilities,
        }));
    }
    json_response(
        200,
        &json!({
            "request_id": request_id,
            "model": {"sha256": meta.sha256, "arch": meta.arch},
            "class_names": (0..rows.first().map_or(0, Vec::len)).map(|i| meta.class_name(i)).collect::<Vec<_>>(),
            "predictions": predictions,
        }),
    )
}

/// The images of a `/v1/predict` body: the parts of a `multipart/form-data` body (named by
/// file, else field), or the whole body as one image.
pub fn uploads(content_type: Option<&str>, body: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    match content_type.and_then(multipart_boundary) {
        Some(boundary) => match multipart(body, &boundary) {
            Ok(p) if !p.is_empty() => Ok(p),
            Ok(_) => Err("the multipart body has no parts".into()),
            Err(e) => Err(format!("bad multipart body: {e}")),
        },
        None => Ok(vec![("image".to_string(), body.to_vec())]),
    }
}

/// The boundary of a `multipart/form-data` content type.
fn multipart_boundary(content_type: &str) -> Option<String> {
    multer::parse_boundary(content_type).ok()
}

/// The parts of a `multipart/form-data` body, read by `multer`: (file name, else field name,
/// bytes).
fn multipart(body: &[u8], boundary: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    use futures_util::FutureExt;
    let data = bytes::Bytes::copy_from_slice(body);
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(data) });
    let mut form = multer::Multipart::new(stream, boundary);
    let read = async {
        let mut parts = Vec::new();
        while let Some(field) = form.next_field().await.map_err(|e| e.to_string())? {
            let name = field
                .file_name()
                .filter(|s| !s.is_empty())
                .or(field.name())
                .map_or_else(|| format!("part{}", parts.len()), str::to_string);
            let bytes = field.bytes().await.map_err(|e| e.to_string())?;
            parts.push((name, bytes.to_vec()));
        }
        Ok(parts)
    };
    // The whole body is in memory, so reading it never waits.
    read.now_or_never()
        .unwrap_or_else(|| Err("the multipart body could not be read in one pass".into()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn multipart_parts() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"; filename=\"x.png\"\r\n\
                     Content-Type: image/png\r\n\r\nPNGDATA\r\n--XyZ\r\nContent-Disposition: \
                     form-data; name=\"b\"\r\n\r\n\r\nmore\r\n--XyZ--\r\n";
        let parts = multipart(body, "XyZ").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], ("x.png".to_string(), b"PNGDATA".to_vec()));
        assert_eq!(parts[1], ("b".to_string(), b"\r\nmore".to_vec()));
        assert!(multipart(b"--XyZ\r\nno end", "XyZ").is_err());
        assert_eq!(
            multipart_boundary("multipart/form-data; boundary=\"ab c\"").as_deref(),
            Some("ab c")
        );
        assert_eq!(multipart_boundary("image/png"), None);
    }
}
