//! Routing: which routes need a token ([`gate`]), which take a body, how `/metrics` labels a
//! route, and [`handle`], which hands a request to `/v1`, `/v2` or the server's own routes.

use hyper::{HeaderMap, Method};
use serde_json::json;

use crate::serve::audit::AuditRecord;
use crate::serve::state::{error_response, json_response, route_error, Reply, Req, Shared};

/// Routes that need no token: health probes.
fn is_public(path: &str) -> bool {
    matches!(path, "/healthz" | "/v2/health/live" | "/v2/health/ready")
}

/// The route of `path` as `/metrics` labels it (model names folded into `{name}`).
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/predict" => "/v1/predict",
        "/v1/model" => "/v1/model",
        "/healthz" => "/healthz",
        "/metrics" => "/metrics",
        "/v2" => "/v2",
        "/v2/health/live" => "/v2/health/live",
        "/v2/health/ready" => "/v2/health/ready",
        "/v2/repository/index" => "/v2/repository/index",
        p if p == "/dicomweb/studies" || p.starts_with("/dicomweb/studies/") => "/dicomweb/studies",
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
pub fn gate(
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
        let _ = log.append(&AuditRecord {
            event: "unauthorized",
            route: Some(route_label(path)),
            client: address.map(str::to_string),
            ..Default::default()
        });
    }
    let msg = "a valid bearer token is required (Authorization: Bearer TOKEN)";
    Err(route_error(path, 401, msg).with_header("WWW-Authenticate", "Bearer"))
}

/// Whether a request's body is read: only the prediction routes, the repository index and
/// STOW-RS take one.
pub fn takes_body(method: &Method, path: &str) -> bool {
    *method == Method::POST
        && (path == "/v1/predict"
            || path.ends_with("/infer")
            || path == "/v2/repository/index"
            || stow_study(path).is_some())
}

/// `Some(None)` for `/dicomweb/studies`, `Some(Some(uid))` for `/dicomweb/studies/{uid}`.
fn stow_study(path: &str) -> Option<Option<&str>> {
    let rest = path.strip_prefix("/dicomweb/studies")?;
    match rest.strip_prefix('/') {
        None if rest.is_empty() => Some(None),
        Some(uid) if !uid.is_empty() && !uid.contains('/') => Some(Some(uid)),
        _ => None,
    }
}

/// `POST /dicomweb/studies[/{study}]`: STOW-RS, when a DICOM node takes it.
fn stow(req: &Req, shared: &Shared, study: Option<&str>) -> Reply {
    let Some(ingest) = shared.ingest.get() else {
        return error_response(
            404,
            "DICOMweb STOW-RS is served with --dicom-listen (the DICOM node takes the instances)",
        );
    };
    let client = req.caller.address.clone().unwrap_or_default();
    let (code, content_type, body) = ingest.stow(
        req.header("Content-Type").unwrap_or(""),
        &req.body,
        study,
        &client,
    );
    Reply::new(code, content_type, body)
}

/// Answers a request whose token (if needed) has been checked and whose body has been read.
pub fn handle(mut req: Req, shared: &Shared) -> Reply {
    if req.path == "/v2" || req.path.starts_with("/v2/") {
        return crate::serve::v2::route(&mut req, shared);
    }
    if let Some(study) = stow_study(&req.path) {
        return match req.method {
            Method::POST => stow(&req, shared, study),
            _ => error_response(405, "method not allowed: STOW-RS is POST"),
        };
    }
    match (&req.method, req.path.as_str()) {
        (&Method::POST, "/v1/predict") => crate::serve::v1::predict(&req, shared),
        (&Method::GET, "/v1/model") => crate::serve::v1::model(&req, shared),
        (&Method::GET, "/healthz") => json_response(200, &json!({"status": "ok"})),
        (&Method::GET, "/metrics") => {
            let queued: Vec<_> = shared
                .models
                .iter()
                .map(|m| {
                    (
                        &m.labels,
                        m.queued.load(std::sync::atomic::Ordering::SeqCst),
                    )
                })
                .collect();
            let text = shared.metrics.render(&queued);
            Reply::new(200, crate::serve::metrics::CONTENT_TYPE, text.into_bytes())
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
