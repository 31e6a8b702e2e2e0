//! The Open Inference Protocol's routes (KServe v2, as Triton speaks it): server and model
//! metadata, health, readiness and `infer`, on the codec of `oip.rs`; with
//! `--model-repository`, Triton's repository index.

use hyper::Method;
use serde_json::json;

use crate::engine::label;
use crate::serve::audit::AuditRecord;
use crate::serve::oip;
use crate::serve::state::{json_response, v2_error, Reply, Req, Shared, Slot};
use crate::serve::workers::infer;

/// The model `name` at `version`, or at its highest version.
pub fn find_slot<'a>(
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
pub fn route(req: &mut Req, shared: &Shared) -> Reply {
    let path = req.path.clone();
    let segments: Vec<&str> = path
        .trim_start_matches("/v2")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let method = req.method.clone();
    let get = method == Method::GET || method == Method::HEAD;
    match segments.as_slice() {
        [] if get => json_response(200, &oip::server_metadata(shared.repository)),
        ["repository", "index"] if !shared.repository => v2_error(
            404,
            "the model repository extension is served with --model-repository, not --model",
        ),
        ["repository", "index"] if method == Method::POST => repository_index(req, shared),
        ["repository", "index"] => v2_error(405, "method not allowed"),
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
                    let r = infer_route(req, shared, slot);
                    shared.answered(slot, r.status);
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

/// `POST /v2/repository/index` (Triton's model repository extension): every model version
/// served, each READY (a repository is loaded whole at start, or mae-run does not start).
/// The body may be empty or `{"ready": BOOL}`; both answers are the same list.
fn repository_index(req: &Req, shared: &Shared) -> Reply {
    if !req.body.iter().all(u8::is_ascii_whitespace) {
        let body: serde_json::Value = match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(e) => return v2_error(400, &format!("the request body is not JSON: {e}")),
        };
        let Some(fields) = body.as_object() else {
            return v2_error(400, "the request body must be a JSON object");
        };
        for (k, v) in fields {
            match k.as_str() {
                "ready" if v.is_boolean() => {}
                "ready" => return v2_error(400, "'ready' must be true or false"),
                other => return v2_error(400, &format!("unknown field '{other}' (only 'ready')")),
            }
        }
    }
    let index: Vec<serde_json::Value> = shared
        .models
        .iter()
        .map(|s| json!({"name": s.name, "version": s.version, "state": "READY"}))
        .collect();
    json_response(200, &serde_json::Value::Array(index))
}

/// `POST /v2/models/NAME[/versions/V]/infer`.
fn infer_route(req: &mut Req, shared: &Shared, slot: &Slot) -> Reply {
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
        let request_id = request.id.clone().unwrap_or_else(|| shared.request_id());
        for (i, (sha, probs)) in shas.iter().zip(&scores.probabilities).enumerate() {
            let p = label(&slot.meta, probs, 1);
            let input = format!("{}[{i}]", request.input.name);
            let record = AuditRecord::prediction(&slot.meta, input, sha, &p);
            let _ = log.append(&slot.audit("v2", &request_id, caller, record));
        }
    }
    match body.header_len {
        Some(n) => Reply::new(200, "application/octet-stream", body.bytes)
            .with_header("Inference-Header-Content-Length", &n.to_string()),
        None => Reply::new(200, "application/json", body.bytes),
    }
}
