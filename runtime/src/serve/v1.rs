//! mae-run's own API: `POST /v1/predict` (one image as the body, or several as
//! `multipart/form-data`; `?top_k=N`, `?model=NAME`, `?explain=rollout|gradcam|occlusion` with
//! `occlusion_window`, `occlusion_stride`, `occlusion_baseline`) and `GET /v1/model`.

use std::path::Path;

use mae_models::imaging::preprocess_eval;
use serde_json::json;

use crate::engine::label;
use crate::explain::occlusion::{self, Occlusion};
use crate::explain::{self, Method};
use crate::inputs::{decode_bytes, sha256_hex};
use crate::serve::audit::AuditRecord;
use crate::serve::state::{error_response, json_response, Reply, Req, Shared, Slot};
use crate::serve::workers::infer;

/// The model a `/v1` request addresses: `?model=NAME`, else the first one.
fn v1_slot<'a>(shared: &'a Shared, query: &str) -> Result<&'a Slot, Reply> {
    match query.split('&').find_map(|kv| kv.strip_prefix("model=")) {
        None => shared
            .models
            .first()
            .ok_or_else(|| error_response(503, "no model is loaded")),
        Some(name) => {
            crate::serve::v2::find_slot(shared, name, None).map_err(|msg| error_response(404, &msg))
        }
    }
}

/// `GET /v1/model`: the model's metadata and SHA-256.
pub fn model(req: &Req, shared: &Shared) -> Reply {
    match v1_slot(shared, &req.query) {
        Ok(slot) => json_response(200, &slot.model_doc),
        Err(r) => r,
    }
}

/// `POST /v1/predict`, counted for its model.
pub fn predict(req: &Req, shared: &Shared) -> Reply {
    match v1_slot(shared, &req.query) {
        Ok(slot) => {
            let r = predict_with(req, shared, slot);
            shared.answered(slot, r.status);
            r
        }
        Err(r) => r,
    }
}

fn predict_with(req: &Req, shared: &Shared, slot: &Slot) -> Reply {
    let caller = &req.caller;
    let body = &req.body;
    let top_k = req
        .query
        .split('&')
        .find_map(|kv| kv.strip_prefix("top_k="))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    let request_id = req
        .header("X-Request-Id")
        .map(|s| s.chars().take(128).collect::<String>())
        .unwrap_or_else(|| shared.request_id());
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
    let method = match query_value(&req.query, "explain").map(Method::parse) {
        None => None,
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => return error_response(400, &format!("{e:#}")),
    };
    let occlusion = match method {
        Some(m) => match explain_settings(&req.query, slot, m) {
            Ok(o) => Some(o),
            Err(e) => return error_response(400, &format!("explain={}: {e:#}", m.as_str())),
        },
        None => None,
    };
    let n = parts.len();
    let scores = match infer(shared, slot, pixels.clone(), n) {
        Ok(s) => s,
        Err((code, msg)) => return error_response(code, &msg),
    };
    let maps = match method {
        Some(m @ (Method::Rollout | Method::Gradcam)) => {
            match explain::split_maps(&scores.maps, m, n) {
                Ok(e) => e.into_iter().map(Some).collect(),
                Err(e) => return error_response(500, &format!("{e:#}")),
            }
        }
        _ => vec![None; n],
    };
    let rows = scores.probabilities;
    let meta = &slot.meta;
    let len = pixels.len() / n.max(1);
    let mut predictions = Vec::new();
    for (i, ((((name, _), sha), probs), map)) in
        parts.iter().zip(&shas).zip(&rows).zip(maps).enumerate()
    {
        let p = label(meta, probs, top_k);
        let explanation = match (method, map, &occlusion) {
            (Some(_), Some(e), _) => Some(e),
            (Some(Method::Occlusion), None, Some(o)) => {
                let image = &pixels[i * len..(i + 1) * len];
                let s = meta.preprocess.input_size;
                let mut run = |px: &[f32], k: usize| {
                    infer(shared, slot, px.to_vec(), k)
                        .map(|s| s.probabilities)
                        .map_err(|(code, msg)| anyhow::anyhow!("{msg} ({code})"))
                };
                match occlusion::explain_with(image, s, probs, o, OCCLUSION_BATCH, &mut run) {
                    Ok(e) => Some(e),
                    Err(e) => return error_response(500, &format!("occlusion: {e:#}")),
                }
            }
            _ => None,
        };
        if let Some(log) = &shared.audit {
            let record = AuditRecord::prediction(meta, name.clone(), sha, &p);
            let _ = log.append(&slot.audit("v1", &request_id, caller, record));
        }
        let mut doc = json!({
            "name": name,
            "input_sha256": sha,
            "class": p.class,
            "probability": p.probability,
            "labels": p.labels,
            "top": p.top,
            "probabilities": p.probabilities,
        });
        if let Some(e) = explanation {
            doc["explanation"] = json!({
                "method": e.method,
                "shape": e.shape,
                "map": e.values,
            });
        }
        predictions.push(doc);
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

/// Occluded images per queued request of `?explain=occlusion`.
const OCCLUSION_BATCH: usize = 16;

/// The value of `key=` in a query string.
fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Checks `?explain=` against the model; the occlusion settings of the query (defaults as
/// `mae-run predict`'s).
fn explain_settings(query: &str, slot: &Slot, m: Method) -> anyhow::Result<Occlusion> {
    let meta = &slot.meta;
    explain::require_output(&format!("model '{}'", slot.name), &meta.output_names, m)?;
    let number = |key: &str| -> anyhow::Result<Option<usize>> {
        query_value(query, key)
            .map(|v| {
                v.parse()
                    .map_err(|_| anyhow::anyhow!("{key}={v} is not a whole number"))
            })
            .transpose()
    };
    let baseline = match query_value(query, "occlusion_baseline") {
        Some(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("occlusion_baseline={v} is not a number"))?,
        None => 0.0,
    };
    Occlusion::resolve(
        number("occlusion_window")?,
        number("occlusion_stride")?,
        baseline,
        meta.preprocess.input_size,
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
