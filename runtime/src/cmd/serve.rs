//! `mae-run serve`: its flags, checked and turned into the server's configuration
//! (`crate::serve`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use anyhow::bail;

use crate::dicom::args::DicomArgs;
use crate::dicom::{queue, NodeConfig};
use crate::engine::model::ModelMeta;
use crate::engine::settings::ModelArgs;
use crate::engine::Scores;
use crate::serve::attach::{Attach, Served};
use crate::serve::audit::AuditLog;
use crate::serve::auth::ApiKeys;
use crate::serve::metrics::{DestinationLabels, DicomMetrics};
use crate::serve::transport::{self, Limits};
use crate::serve::{Batching, Config};

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
    /// Open connections of one client address at most (an IPv6 client counted by its /64);
    /// more from it are answered 503 and closed, so that one address holding connections open
    /// (slow or half-sent requests) cannot take every slot. Raise it behind a reverse proxy,
    /// whose connections all come from one address.
    #[arg(long, default_value_t = 32)]
    pub max_connections_per_client: usize,
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
    #[command(flatten)]
    pub dicom: Box<DicomArgs>,
}

/// Runs `mae-run serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    crate::serve::run(config(args)?)
}

/// The server's configuration from its flags: checked, with the keys, the TLS configuration and
/// the audit log loaded.
fn config(args: ServeArgs) -> anyhow::Result<Config> {
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
    if args.max_connections == 0 || args.max_connections_per_client == 0 {
        bail!("--max-connections and --max-connections-per-client must be at least 1");
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(transport::tls_config(cert, key)?),
        _ => None,
    };
    let audit = args.audit_log.as_deref().map(AuditLog::open).transpose()?;
    if args.model_repository.is_some() && args.model.expect_sha256.is_some() {
        bail!("--expect-sha256 names one model file; it does not apply to --model-repository");
    }
    let attach = match args.dicom.node_config()? {
        Some(node) if args.model_repository.is_some() => {
            let _ = node;
            bail!("--dicom-listen serves one model: give --model, not --model-repository")
        }
        Some(node) => Some(Attach(Box::new(move |served: Served| {
            watch_queues(&served, &node);
            let served = Arc::new(served);
            let listen = node.listen;
            let heat = crate::dicom::heatmap_method(node.heatmap, served.name(), served.meta())?;
            let started = crate::dicom::start(
                node,
                Arc::new(Node(served.clone())),
                Arc::new(Node(served.clone())),
            )?;
            served.set_ingest(Arc::new(Stow(started.intake)));
            let addr = started.addr;
            let heat = heat.map_or("no heatmap".to_string(), |m| {
                format!("Secondary Captures with the model's {} map", m.as_str())
            });
            eprintln!("mae-run: DICOM node listening on {addr} (asked for {listen}); {heat}");
            Ok(())
        }))),
        None => None,
    };
    Ok(Config {
        attach,
        model: args.model,
        model_repository: args.model_repository,
        listen: args.listen,
        keys,
        tls,
        audit,
        batching: Batching {
            max_batch: args.max_batch,
            max_wait: Duration::from_millis(args.max_wait_ms),
            queue_size: args.queue_size,
            timeout: Duration::from_millis(args.timeout_ms),
            delay: Duration::from_millis(args.debug_delay_ms),
        },
        limits: Limits {
            max_body: args.max_body_bytes,
            max_header: args.max_header_bytes,
            header_timeout: Duration::from_millis(args.header_timeout_ms),
            body_timeout: Duration::from_millis(args.body_timeout_ms),
            max_connections: args.max_connections,
            max_connections_per_client: args.max_connections_per_client,
            workers: args.workers,
        },
    })
}

/// Sets the DICOM node's queue gauges before each scrape of `/metrics`: what waits in the
/// spool to be classified, and in each `--forward` outbox (how many, and the oldest's age).
fn watch_queues(served: &Served, node: &NodeConfig) {
    let outboxes: Vec<(DestinationLabels, PathBuf)> = node
        .forward
        .iter()
        .map(|p| {
            (
                DestinationLabels::new(&p.to_string()),
                queue::outbox_dir(&node.spool, p),
            )
        })
        .collect();
    let incoming = node.spool.join("incoming");
    served
        .metrics()
        .before_render(Box::new(move |d: &DicomMetrics| {
            d.spool_pending.set(queue::backlog(&incoming).0 as i64);
            for (labels, dir) in &outboxes {
                let (n, oldest) = queue::backlog(dir);
                d.queue_length.get_or_create(labels).set(n as i64);
                d.queue_oldest_seconds
                    .get_or_create(labels)
                    .set(oldest.as_secs() as i64);
            }
        }));
}

/// The served model as the DICOM node sees it: classification through the model's workers,
/// audit records into `--audit-log`, and the node's counters in `/metrics`.
#[derive(Debug)]
struct Node(Arc<Served>);

impl crate::dicom::Classify for Node {
    fn meta(&self) -> &ModelMeta {
        self.0.meta()
    }

    fn name(&self) -> &str {
        self.0.name()
    }

    fn classify(&self, pixels: Vec<f32>) -> Result<Scores, String> {
        let scores = self.0.infer(pixels, 1)?;
        if scores.probabilities.len() != 1 {
            return Err("the model returned no probabilities".to_string());
        }
        Ok(scores)
    }
}

/// STOW-RS bodies of the HTTP server, to the DICOM node's intake.
#[derive(Debug)]
struct Stow(Arc<crate::dicom::stow::Intake>);

impl crate::serve::attach::Ingest for Stow {
    fn stow(
        &self,
        content_type: &str,
        body: &[u8],
        study: Option<&str>,
        client: &str,
    ) -> (u16, &'static str, Vec<u8>) {
        self.0.stow(content_type, body, study, client)
    }
}

impl crate::dicom::Events for Node {
    fn association(&self, open: bool) {
        if let Some(d) = self.0.metrics().dicom() {
            if open {
                d.association(true);
                d.associations_open.inc();
            } else {
                d.associations_open.dec();
            }
        }
    }

    fn record(&self, record: serde_json::Value) {
        if let Some(d) = self.0.metrics().dicom() {
            let destination =
                || DestinationLabels::new(record["destination"].as_str().unwrap_or(""));
            match record["event"].as_str() {
                Some("dicom-received") => {
                    d.received.inc();
                }
                Some("dicom-classified") => {
                    d.classified.inc();
                }
                Some("dicom-failed") => {
                    d.not_classified.inc();
                }
                Some("dicom-rejected") => d.association(false),
                Some("dicom-sent") => {
                    d.sent.get_or_create(&destination()).inc();
                }
                Some("dicom-given-up") => {
                    d.given_up.get_or_create(&destination()).inc();
                }
                _ => {}
            }
        }
        tracing::info!("audit: {record}");
        if let Some(log) = self.0.audit() {
            if let Err(e) = log.append(&record) {
                tracing::error!("{e:#}");
            }
        }
    }
}
