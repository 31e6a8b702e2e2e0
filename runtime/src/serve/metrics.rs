//! `GET /metrics`: the server's Prometheus series, kept and written out (text format 0.0.4) by
//! `prometheus-client`; with `--dicom-listen`, the DICOM node's too ([`DicomMetrics`]).

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of the text it writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

const LATENCY_BOUNDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BOUNDS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    code: String,
}

/// The labels of one served model's series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    model: String,
    version: String,
}

impl ModelLabels {
    pub fn new(model: &str, version: &str) -> Self {
        Self {
            model: model.to_string(),
            version: version.to_string(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelCodeLabels {
    model: String,
    version: String,
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    model: String,
    version: String,
    sha256: String,
    arch: String,
}

/// `result` of an association: `accepted` or `rejected`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// `destination` of a result: a `--forward` peer, `AE@HOST:PORT`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: String,
}

impl DestinationLabels {
    pub fn new(destination: &str) -> Self {
        Self {
            destination: destination.to_string(),
        }
    }
}

/// The DICOM node's series: what it was sent and what it sent on; the gauges of the queues are
/// set just before each scrape by the hook given to [`Metrics::before_render`].
#[derive(Debug, Clone, Default)]
pub struct DicomMetrics {
    pub associations: Family<ResultLabels, Counter>,
    pub associations_open: Gauge,
    pub received: Counter,
    pub classified: Counter,
    pub not_classified: Counter,
    pub spool_pending: Gauge,
    pub sent: Family<DestinationLabels, Counter>,
    pub given_up: Family<DestinationLabels, Counter>,
    pub queue_length: Family<DestinationLabels, Gauge>,
    pub queue_oldest_seconds: Family<DestinationLabels, Gauge>,
}

impl DicomMetrics {
    /// An association `accepted` or rejected.
    pub fn association(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "rejected" };
        self.associations
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "mae_dicom_associations",
            "DICOM associations, by result (accepted, or rejected: caller, limit or TLS)",
            self.associations.clone(),
        );
        r.register(
            "mae_dicom_associations_open",
            "DICOM associations open now",
            self.associations_open.clone(),
        );
        r.register(
            "mae_dicom_instances_received",
            "Instances received by C-STORE and kept in the spool (answered Success)",
            self.received.clone(),
        );
        r.register(
            "mae_dicom_instances_classified",
            "Received instances classified, their results written and queued",
            self.classified.clone(),
        );
        r.register(
            "mae_dicom_instances_not_classified",
            "Received instances that could not be decoded (moved to the spool's failed/)",
            self.not_classified.clone(),
        );
        r.register(
            "mae_dicom_spool_pending",
            "Received instances waiting to be classified",
            self.spool_pending.clone(),
        );
        r.register(
            "mae_dicom_results_sent",
            "Results (SR and Secondary Capture) stored by each --forward destination",
            self.sent.clone(),
        );
        r.register(
            "mae_dicom_results_given_up",
            "Results given up after --forward-give-up-s, by destination",
            self.given_up.clone(),
        );
        r.register(
            "mae_dicom_queue_length",
            "Results waiting in each --forward outbox",
            self.queue_length.clone(),
        );
        r.register(
            "mae_dicom_queue_oldest_seconds",
            "Age of the oldest result waiting in each --forward outbox (0 when empty)",
            self.queue_oldest_seconds.clone(),
        );
    }
}

/// A hook run before each scrape, to set gauges read from elsewhere (the DICOM queues).
type BeforeRender = Box<dyn Fn(&DicomMetrics) + Send + Sync>;

/// Every series the server keeps.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteLabels, Counter>,
    errors: Counter,
    latency: Histogram,
    batch_size: Histogram,
    images: Counter,
    queue_depth: Gauge,
    model_images: Family<ModelLabels, Counter>,
    model_batches: Family<ModelLabels, Counter>,
    model_queue_depth: Family<ModelLabels, Gauge>,
    model_requests: Family<ModelCodeLabels, Counter>,
    model_info: Family<InfoLabels, Gauge>,
    dicom: Option<DicomMetrics>,
    before_render: OnceLock<BeforeRender>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("dicom", &self.dicom.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            requests: Family::default(),
            errors: Counter::default(),
            latency: Histogram::new(LATENCY_BOUNDS),
            batch_size: Histogram::new(BATCH_BOUNDS),
            images: Counter::default(),
            queue_depth: Gauge::default(),
            model_images: Family::default(),
            model_batches: Family::default(),
            model_queue_depth: Family::default(),
            model_requests: Family::default(),
            model_info: Family::default(),
            dicom: None,
            before_render: OnceLock::new(),
        };
        let r = &mut m.registry;
        // prometheus-client adds `_total` to counters and a full stop to the help.
        r.register(
            "mae_requests",
            "HTTP requests answered, by route and status code",
            m.requests.clone(),
        );
        r.register(
            "mae_request_errors",
            "HTTP requests answered with a 4xx or 5xx code",
            m.errors.clone(),
        );
        r.register(
            "mae_request_duration_seconds",
            "Time from receiving a request to answering it",
            m.latency.clone(),
        );
        r.register(
            "mae_batch_size",
            "Images per model run",
            m.batch_size.clone(),
        );
        r.register(
            "mae_images",
            "Images run through the model",
            m.images.clone(),
        );
        r.register(
            "mae_queue_depth",
            "Requests waiting for the model",
            m.queue_depth.clone(),
        );
        r.register(
            "mae_model_images",
            "Images run through each model",
            m.model_images.clone(),
        );
        r.register(
            "mae_model_batches",
            "Model runs of each model",
            m.model_batches.clone(),
        );
        r.register(
            "mae_model_queue_depth",
            "Requests waiting for each model",
            m.model_queue_depth.clone(),
        );
        r.register(
            "mae_model_requests",
            "Inference requests of each model, by status code",
            m.model_requests.clone(),
        );
        r.register(
            "mae_model_info",
            "The models being served",
            m.model_info.clone(),
        );
        m
    }

    /// The same series and the DICOM node's.
    pub fn with_dicom(mut self) -> Self {
        let dicom = DicomMetrics::default();
        dicom.register(&mut self.registry);
        self.dicom = Some(dicom);
        self
    }

    /// The DICOM node's series, when registered.
    pub fn dicom(&self) -> Option<&DicomMetrics> {
        self.dicom.as_ref()
    }

    /// Runs `hook` before each scrape (one hook; a second is ignored).
    pub fn before_render(&self, hook: BeforeRender) {
        let _ = self.before_render.set(hook);
    }

    /// A model being served: its info series, and its counters at zero.
    pub fn add_model(&self, labels: &ModelLabels, sha256: &str, arch: Option<&str>) {
        let info = InfoLabels {
            model: labels.model.clone(),
            version: labels.version.clone(),
            sha256: sha256.to_string(),
            arch: arch.unwrap_or("").to_string(),
        };
        self.model_info.get_or_create(&info).set(1);
        // Each model's series from the start, at zero.
        let _ = self.model_images.get_or_create(labels);
        let _ = self.model_batches.get_or_create(labels);
        let _ = self.model_queue_depth.get_or_create(labels);
    }

    /// A request answered on `route` with `code` after `seconds`.
    pub fn request(&self, route: &str, code: u16, seconds: f64) {
        let labels = RouteLabels {
            route: route.to_string(),
            code: code.to_string(),
        };
        self.requests.get_or_create(&labels).inc();
        if code >= 400 {
            self.errors.inc();
        }
        self.latency.observe(seconds);
    }

    /// A model run of `size` images by the model of `labels`.
    pub fn batch(&self, labels: &ModelLabels, size: usize) {
        self.batch_size.observe(size as f64);
        self.images.inc_by(size as u64);
        self.model_images.get_or_create(labels).inc_by(size as u64);
        self.model_batches.get_or_create(labels).inc();
    }

    /// An inference request of the model of `labels` answered with `code`.
    pub fn answered(&self, labels: &ModelLabels, code: u16) {
        let labels = ModelCodeLabels {
            model: labels.model.clone(),
            version: labels.version.clone(),
            code: code.to_string(),
        };
        self.model_requests.get_or_create(&labels).inc();
    }

    /// The series as Prometheus text, with each model's queue (`queued`) as it is now.
    pub fn render(&self, queued: &[(&ModelLabels, u64)]) -> String {
        let mut total = 0;
        for (labels, n) in queued {
            self.model_queue_depth.get_or_create(labels).set(*n as i64);
            total += n;
        }
        self.queue_depth.set(total as i64);
        if let (Some(dicom), Some(hook)) = (&self.dicom, self.before_render.get()) {
            hook(dicom);
        }
        let mut text = String::new();
        match prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry) {
            Ok(()) => text,
            Err(_) => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn series_as_prometheus_text() {
        let m = Metrics::new();
        let a = ModelLabels::new("a", "1");
        m.add_model(&a, "ab12", Some("vit_tiny"));
        m.request("/v1/predict", 200, 0.02);
        m.request("/v1/predict", 400, 3.0);
        m.batch(&a, 3);
        m.answered(&a, 200);
        let text = m.render(&[(&a, 2)]);
        for line in [
            "mae_requests_total{route=\"/v1/predict\",code=\"200\"} 1",
            "mae_requests_total{route=\"/v1/predict\",code=\"400\"} 1",
            "mae_request_errors_total 1",
            "mae_request_duration_seconds_bucket{le=\"0.01\"} 0",
            "mae_request_duration_seconds_bucket{le=\"0.025\"} 1",
            "mae_request_duration_seconds_bucket{le=\"5\"} 2",
            "mae_request_duration_seconds_bucket{le=\"+Inf\"} 2",
            "mae_request_duration_seconds_count 2",
            "mae_batch_size_bucket{le=\"2\"} 0",
            "mae_batch_size_bucket{le=\"4\"} 1",
            "mae_images_total 3",
            "mae_queue_depth 2",
            "mae_model_images_total{model=\"a\",version=\"1\"} 3",
            "mae_model_batches_total{model=\"a\",version=\"1\"} 1",
            "mae_model_queue_depth{model=\"a\",version=\"1\"} 2",
            "mae_model_requests_total{model=\"a\",version=\"1\",code=\"200\"} 1",
            "mae_model_info{model=\"a\",version=\"1\",sha256=\"ab12\",arch=\"vit_tiny\"} 1",
            "# TYPE mae_request_duration_seconds histogram",
            "# HELP mae_images_total Images run through the model.",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("mae_dicom"), "{text}");
    }

    #[test]
    fn dicom_series_with_the_node() {
        let m = Metrics::new().with_dicom();
        let d = m.dicom().unwrap();
        d.association(true);
        d.association(false);
        d.received.inc();
        d.sent
            .get_or_create(&DestinationLabels::new("PACS@h:104"))
            .inc_by(2);
        m.before_render(Box::new(|d: &DicomMetrics| {
            let dest = DestinationLabels::new("PACS@h:104");
            d.queue_length.get_or_create(&dest).set(3);
            d.queue_oldest_seconds.get_or_create(&dest).set(42);
        }));
        let text = m.render(&[]);
        for line in [
            "mae_dicom_associations_total{result=\"accepted\"} 1",
            "mae_dicom_associations_total{result=\"rejected\"} 1",
            "mae_dicom_instances_received_total 1",
            "mae_dicom_results_sent_total{destination=\"PACS@h:104\"} 2",
            "mae_dicom_queue_length{destination=\"PACS@h:104\"} 3",
            "mae_dicom_queue_oldest_seconds{destination=\"PACS@h:104\"} 42",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }
}
