//! `mae-run serve`: an HTTP JSON API with dynamic batching.
//!
//! - `POST /v1/predict`: one image (PNG, JPEG, BMP, TIFF or DICOM bytes) as the body, or several
//!   as `multipart/form-data`; `?top_k=N`. Answers the predictions with the model's SHA-256 and
//!   architecture. 413 when the body is over `--max-body-bytes`, 400 when an image does not
//!   decode, 503 when the queue is full, 504 past `--timeout-ms`.
//! - `GET /v1/model`: metadata and SHA-256. `GET /healthz`. `GET /metrics`: Prometheus text.
//!
//! HTTP worker threads decode and preprocess; one inference thread owns the model and batches
//! what is queued (up to `--max-batch` images, waiting at most `--max-wait-ms` for more). On
//! SIGINT/SIGTERM the server stops taking requests, answers every accepted one, and exits.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use mae_models::imaging::preprocess_eval;
use serde_json::json;
use tiny_http::{Header, Method, Request, Response, Server};

use crate::audit::AuditLog;
use crate::engine::{label, Engine};
use crate::inputs::{decode_bytes, sha256_hex};
use crate::model::ModelMeta;
use crate::ModelArgs;

/// Arguments of `mae-run serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (loopback by default; 0.0.0.0:PORT to serve the network).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Largest batch the model runs.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// How long the first queued request waits for others to batch with, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Requests waiting for the model at most; more are answered 503.
    #[arg(long, default_value_t = 64)]
    pub queue_size: usize,
    /// HTTP worker threads (decoding and preprocessing happen there).
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
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
    reply: mpsc::Sender<Result<Vec<Vec<f32>>, String>>,
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

    fn render(&self, meta: &ModelMeta, queued: u64) -> String {
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
        s += "# HELP mae_model_info The model being served.\n";
        s += "# TYPE mae_model_info gauge\n";
        let _ = writeln!(
            s,
            "mae_model_info{{sha256=\"{}\",arch=\"{}\"}} 1",
            meta.sha256,
            meta.arch
                .as_deref()
                .unwrap_or("")
                .replace(['"', '\\', '\n'], "_")
        );
        s
    }
}

/// What the HTTP workers share.
struct Shared {
    meta: ModelMeta,
    model_doc: serde_json::Value,
    jobs: Mutex<Option<SyncSender<Job>>>,
    queued: AtomicU64,
    metrics: Mutex<Metrics>,
    audit: Option<AuditLog>,
    next_id: AtomicU64,
    args: ServeLimits,
}

#[derive(Debug, Clone)]
struct ServeLimits {
    max_body: usize,
    timeout: Duration,
}

fn json_response(code: u16, v: &serde_json::Value) -> Response<std::io::Cursor<Vec<u8>>> {
    let mut r = Response::from_string(v.to_string()).with_status_code(code);
    if let Ok(h) = Header::from_bytes("Content-Type", "application/json") {
        r.add_header(h);
    }
    r
}

fn error_response(code: u16, msg: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    json_response(code, &json!({"error": msg, "status": code}))
}

/// Runs `mae-run serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.max_batch == 0 || args.queue_size == 0 || args.workers == 0 {
        anyhow::bail!("--max-batch, --queue-size and --workers must be at least 1");
    }
    let audit = args.audit_log.as_deref().map(AuditLog::open).transpose()?;
    let engine = args.model.load()?;
    crate::note_calibration(&engine);
    let server =
        Server::http(args.listen).map_err(|e| anyhow!("cannot listen on {}: {e}", args.listen))?;
    let server = Arc::new(server);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (stop, server) = (stop.clone(), server.clone());
        ctrlc::set_handler(move || {
            stop.store(true, Ordering::SeqCst);
            server.unblock();
        })
        .context("cannot install the SIGINT/SIGTERM handler")?;
    }
    let addr = server.server_addr().to_ip().unwrap_or(args.listen);
    eprintln!(
        "mae-run: serving {} ({}) on http://{addr} with {} · max batch {}, queue {}",
        engine.file.path.display(),
        &engine.file.sha256[..12],
        engine.describe_backend(),
        args.max_batch,
        args.queue_size
    );
    serve(server, stop, engine, &args, audit)?;
    eprintln!("mae-run: stopped");
    Ok(ExitCode::SUCCESS)
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

/// Serves until `stop` is set, then drains.
fn serve(
    server: Arc<Server>,
    stop: Arc<AtomicBool>,
    engine: Engine,
    args: &ServeArgs,
    audit: Option<AuditLog>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::sync_channel::<Job>(args.queue_size);
    let shared = Arc::new(Shared {
        meta: engine.meta.clone(),
        model_doc: model_doc(&engine, args),
        jobs: Mutex::new(Some(tx)),
        queued: AtomicU64::new(0),
        metrics: Mutex::new(Metrics::new()),
        audit,
        next_id: AtomicU64::new(1),
        args: ServeLimits {
            max_body: args.max_body_bytes,
            timeout: Duration::from_millis(args.timeout_ms),
        },
    });
    let batcher = {
        let shared = shared.clone();
        let (max_batch, wait, delay) = (
            args.max_batch,
            Duration::from_millis(args.max_wait_ms),
            Duration::from_millis(args.debug_delay_ms),
        );
        std::thread::spawn(move || batch_loop(engine, rx, &shared, max_batch, wait, delay))
    };
    let workers: Vec<_> = (0..args.workers)
        .map(|_| {
            let (server, stop, shared) = (server.clone(), stop.clone(), shared.clone());
            std::thread::spawn(move || loop {
                match server.recv_timeout(Duration::from_millis(100)) {
                    Ok(Some(req)) => handle(req, &shared),
                    // After a stop, keep answering what was accepted until nothing is left.
                    Ok(None) if stop.load(Ordering::SeqCst) => return,
                    Ok(None) => {}
                    Err(_) if stop.load(Ordering::SeqCst) => return,
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    // Every worker is gone: close the queue; the batcher answers what is left and ends.
    if let Ok(mut jobs) = shared.jobs.lock() {
        jobs.take();
    }
    let _ = batcher.join();
    Ok(())
}

fn batch_loop(
    mut engine: Engine,
    rx: Receiver<Job>,
    shared: &Shared,
    max_batch: usize,
    wait: Duration,
    delay: Duration,
) {
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
        shared.queued.fetch_sub(jobs.len() as u64, Ordering::SeqCst);
        let mut pixels = Vec::with_capacity(jobs.iter().map(|j| j.pixels.len()).sum());
        for j in &jobs {
            pixels.extend_from_slice(&j.pixels);
        }
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        // A request larger than max_batch runs alone, in one go.
        let result = engine.probabilities(&pixels, images);
        if let Ok(mut m) = shared.metrics.lock() {
            m.batch(images);
        }
        match result {
            Ok(rows) => {
                let mut rows = rows.into_iter();
                for j in jobs {
                    let mine: Vec<Vec<f32>> = rows.by_ref().take(j.images).collect();
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

fn handle(mut req: Request, shared: &Shared) {
    let start = Instant::now();
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let route = match path {
        "/v1/predict" | "/v1/model" | "/healthz" | "/metrics" => path,
        _ => "other",
    };
    let response = match (req.method(), path) {
        (Method::Post, "/v1/predict") => predict(&mut req, query, shared),
        (Method::Get, "/v1/model") => json_response(200, &shared.model_doc),
        (Method::Get, "/healthz") => json_response(200, &json!({"status": "ok"})),
        (Method::Get, "/metrics") => {
            let text = shared.metrics.lock().map_or_else(
                |_| String::new(),
                |m| m.render(&shared.meta, shared.queued.load(Ordering::SeqCst)),
            );
            let mut r = Response::from_string(text);
            if let Ok(h) = Header::from_bytes("Content-Type", "text/plain; version=0.0.4") {
                r.add_header(h);
            }
            r
        }
        (_, "/v1/predict" | "/v1/model" | "/healthz" | "/metrics") => {
            error_response(405, "method not allowed")
        }
        _ => error_response(
            404,
            "not found: POST /v1/predict, GET /v1/model, /healthz, /metrics",
        ),
    };
    let code = response.status_code().0;
    if let Ok(mut m) = shared.metrics.lock() {
        m.request(route, code, start.elapsed().as_secs_f64());
    }
    let _ = req.respond(response);
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

fn predict(req: &mut Request, query: &str, shared: &Shared) -> Response<std::io::Cursor<Vec<u8>>> {
    let max = shared.args.max_body;
    if req.body_length().is_some_and(|n| n > max) {
        return error_response(413, &format!("request body over {max} bytes"));
    }
    let mut body = Vec::new();
    if let Err(e) = req.as_reader().take(max as u64 + 1).read_to_end(&mut body) {
        return error_response(400, &format!("cannot read the request body: {e}"));
    }
    if body.len() > max {
        return error_response(413, &format!("request body over {max} bytes"));
    }
    let top_k = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("top_k="))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    let request_id = header(req, "X-Request-Id")
        .map(|s| s.chars().take(128).collect::<String>())
        .unwrap_or_else(|| format!("r{}", shared.next_id.fetch_add(1, Ordering::SeqCst)));
    let parts = match header(req, "Content-Type").and_then(multipart_boundary) {
        Some(boundary) => match multipart(&body, &boundary) {
            Ok(p) if !p.is_empty() => p,
            Ok(_) => return error_response(400, "the multipart body has no parts"),
            Err(e) => return error_response(400, &format!("bad multipart body: {e}")),
        },
        None => vec![("image".to_string(), body)],
    };
    // Decode and preprocess here, on the worker thread.
    let mut pixels = Vec::new();
    let mut shas = Vec::new();
    for (name, bytes) in &parts {
        if bytes.is_empty() {
            return error_response(400, &format!("{name}: empty image"));
        }
        match decode_bytes(bytes, Path::new(name)) {
            Ok(img) => pixels.extend(preprocess_eval(&img, &shared.meta.preprocess)),
            Err(e) => return error_response(400, &format!("{e:#}")),
        }
        shas.push(sha256_hex(bytes));
    }
    let (reply, answer) = mpsc::channel();
    let job = Job {
        pixels,
        images: parts.len(),
        reply,
    };
    let sent = match shared.jobs.lock() {
        Ok(jobs) => match jobs.as_ref() {
            Some(tx) => {
                shared.queued.fetch_add(1, Ordering::SeqCst);
                let r = tx.try_send(job);
                if r.is_err() {
                    shared.queued.fetch_sub(1, Ordering::SeqCst);
                }
                r
            }
            None => return error_response(503, "shutting down"),
        },
        Err(_) => return error_response(500, "internal error"),
    };
    match sent {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return error_response(503, "the server is saturated (queue full); retry later")
        }
        Err(TrySendError::Disconnected(_)) => return error_response(503, "shutting down"),
    }
    let rows = match answer.recv_timeout(shared.args.timeout) {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => return error_response(500, &e),
        Err(_) => return error_response(504, "timed out waiting for the model"),
    };
    let meta = &shared.meta;
    let mut predictions = Vec::new();
    for (((name, _), sha), probs) in parts.iter().zip(&shas).zip(&rows) {
        let p = label(meta, probs, top_k);
        if let Some(log) = &shared.audit {
            let _ = log.append(json!({
                "request_id": request_id,
                "input": name,
                "input_sha256": sha,
                "model_sha256": meta.sha256,
                "arch": meta.arch,
                "class": p.class,
                "labels": p.labels,
                "probabilities": p.probabilities,
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

/// The boundary of a `multipart/form-data` content type.
fn multipart_boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    if !parts
        .next()?
        .trim()
        .eq_ignore_ascii_case("multipart/form-data")
    {
        return None;
    }
    parts.find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.eq_ignore_ascii_case("boundary")
            .then(|| v.trim_matches('"').to_string())
    })
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

/// The parts of a `multipart/form-data` body: (file name or field name, bytes).
fn multipart(body: &[u8], boundary: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let delim = format!("--{boundary}");
    let mut pos = find(body, delim.as_bytes(), 0).ok_or("no boundary in the body")?;
    let mut parts = Vec::new();
    loop {
        pos += delim.len();
        if body[pos..].starts_with(b"--") {
            return Ok(parts);
        }
        let head_start = pos + 2; // CRLF after the boundary
        let head_end = find(body, b"\r\n\r\n", head_start).ok_or("part without headers")?;
        let head = String::from_utf8_lossy(&body[head_start.min(head_end)..head_end]);
        let data_start = head_end + 4;
        let next =
            find(body, format!("\r\n{delim}").as_bytes(), data_start).ok_or("unterminated part")?;
        let (mut field, mut file) = (None, None);
        for line in head.lines() {
            if !line
                .to_ascii_lowercase()
                .starts_with("content-disposition:")
            {
                continue;
            }
            for attr in line.split(';').skip(1) {
                if let Some((k, v)) = attr.trim().split_once('=') {
                    let v = v.trim_matches('"').to_string();
                    if k.eq_ignore_ascii_case("filename") && !v.is_empty() {
                        file = Some(v);
                    } else if k.eq_ignore_ascii_case("name") {
                        field = Some(v);
                    }
                }
            }
        }
        let name = file
            .or(field)
            .unwrap_or_else(|| format!("part{}", parts.len()));
        parts.push((name, body[data_start..next].to_vec()));
        pos = next + 2;
    }
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
