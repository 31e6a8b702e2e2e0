//! The Open Inference Protocol (KServe v2, as Triton speaks it) over HTTP/REST: the request and
//! response documents of `POST /v2/models/{name}/infer` and the metadata documents, with the
//! binary tensor data extension (the default of Triton's clients) and the classification
//! extension. Routing lives in `serve`.
//!
//! One input tensor per request, in any of three forms:
//! - `FP32 [N, 3, H, W]`: normalised pixels, as the graph's `pixel_values` takes them;
//! - `UINT8 [N, H, W, 3]` (or `[H, W, 3]`): RGB images, as a `--with-preprocessing` model takes
//!   them; at the model's size they are only normalised, other sizes get the full evaluation
//!   preprocessing (resize, center crop, normalise);
//! - `BYTES [N]` (or `[N, 1]`): encoded image files (PNG, JPEG, BMP, TIFF, DICOM), as binary
//!   data, or base64 strings in JSON.
//!
//! Outputs: `logits` (the graph's, before calibration) and `probabilities` (calibrated), FP32
//! `[N, classes]`; `parameters.classification = k` turns one into BYTES `"score:index:label"`.
//! A model exported with `mae-export --explain` also answers its maps, FP32 `rollout`
//! `[N, h, w]` and `gradcam` `[N, classes, h, w]`, when the request names them in `outputs`.

use std::path::Path;

use base64ct::{Base64, Encoding};
use image::RgbImage;
use mae_models::imaging::{preprocess_eval, to_chw_normalized};
use serde_json::{json, Map, Value};

use crate::engine::model::{Dim, IoInfo, ModelMeta};
use crate::engine::Scores;
use crate::inputs::decode_bytes;

/// An error answered as `{"error": message}` with an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub status: u16,
    pub message: String,
}

impl ProtocolError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
}

type Result<T> = std::result::Result<T, ProtocolError>;

/// The values of the one input tensor of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum InputData {
    Fp32(Vec<f32>),
    Uint8(Vec<u8>),
    Bytes(Vec<Vec<u8>>),
}

/// The input tensor of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: InputData,
}

/// An entry of the request's `outputs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedOutput {
    pub name: String,
    /// `parameters.binary_data`, when given.
    pub binary: Option<bool>,
    /// `parameters.classification`: the top-k classes as strings instead of the tensor.
    pub classification: usize,
}

/// A parsed `POST /v2/models/{name}/infer` request.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    pub id: Option<String>,
    pub input: InputTensor,
    /// `None`: every output.
    pub outputs: Option<Vec<RequestedOutput>>,
    /// `parameters.binary_data_output`: binary outputs unless an output says otherwise.
    pub binary_output: bool,
}

/// The protocol's datatype of an ONNX element type as `ModelFile` names it.
pub fn datatype(onnx: &str) -> &'static str {
    match onnx {
        "float" => "FP32",
        "float16" => "FP16",
        "bfloat16" => "BF16",
        "double" => "FP64",
        "uint8" => "UINT8",
        "uint16" => "UINT16",
        "uint32" => "UINT32",
        "uint64" => "UINT64",
        "int8" => "INT8",
        "int16" => "INT16",
        "int32" => "INT32",
        "int64" => "INT64",
        "bool" => "BOOL",
        "string" => "BYTES",
        _ => "UNKNOWN",
    }
}

fn tensor_metadata(io: &IoInfo) -> Value {
    let shape: Vec<i64> = io
        .shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => *v,
            Dim::Param(_) => -1,
        })
        .collect();
    json!({"name": io.name, "datatype": datatype(&io.dtype), "shape": shape})
}

/// `GET /v2/models/{name}`: the graph's inputs and outputs with their datatypes and shapes
/// (`-1` for a dynamic dimension).
pub fn model_metadata(
    name: &str,
    versions: &[String],
    inputs: &[IoInfo],
    outputs: &[IoInfo],
) -> Value {
    json!({
        "name": name,
        "versions": versions,
        "platform": "onnx",
        "inputs": inputs.iter().map(tensor_metadata).collect::<Vec<_>>(),
        "outputs": outputs.iter().map(tensor_metadata).collect::<Vec<_>>(),
    })
}

/// `GET /v2`; serving a model repository adds Triton's `model_repository` extension (its
/// index).
pub fn server_metadata(repository: bool) -> Value {
    let mut extensions = vec!["binary_tensor_data", "classification"];
    if repository {
        extensions.push("model_repository");
    }
    json!({
        "name": "mae-run",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": extensions,
    })
}

/// Parses a request body; `header_len` is the `Inference-Header-Content-Length` header, when
/// the body carries binary tensor data after the JSON document.
pub fn parse_request(body: &[u8], header_len: Option<usize>) -> Result<InferRequest> {
    let (head, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(ProtocolError::bad_request(format!(
                "Inference-Header-Content-Length {n} is past the end of the {}-byte body",
                body.len()
            )))
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let doc: Value = serde_json::from_slice(head).map_err(|e| {
        ProtocolError::bad_request(format!("the request is not a valid JSON document: {e}"))
    })?;
    let doc = doc
        .as_object()
        .ok_or_else(|| ProtocolError::bad_request("the request must be a JSON object"))?;
    let id = doc.get("id").and_then(Value::as_str).map(String::from);
    let binary_output = doc
        .get("parameters")
        .and_then(|p| p.get("binary_data_output"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let inputs = doc
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| ProtocolError::bad_request("the request has no 'inputs' list"))?;
    let [input] = inputs.as_slice() else {
        return Err(ProtocolError::bad_request(format!(
            "the model takes exactly one input tensor; the request has {}",
            inputs.len()
        )));
    };
    let input = parse_input(input, &mut binary)?;
    if !binary.is_empty() {
        return Err(ProtocolError::bad_request(format!(
            "{} bytes of binary data after the last tensor",
            binary.len()
        )));
    }
    let outputs = match doc.get("outputs") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => {
            Some(list.iter().map(parse_output).collect::<Result<Vec<_>>>()?)
        }
        Some(_) => return Err(ProtocolError::bad_request("'outputs' must be a list")),
    };
    Ok(InferRequest {
        id,
        input,
        outputs,
        binary_output,
    })
}

fn parse_output(v: &Value) -> Result<RequestedOutput> {
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ProtocolError::bad_request("an entry of 'outputs' has no 'name'"))?;
    let params = v.get("parameters");
    let classification = match params.and_then(|p| p.get("classification")) {
        None | Some(Value::Null) => 0,
        Some(k) => k.as_u64().ok_or_else(|| {
            ProtocolError::bad_request(format!(
                "output {name}: 'classification' must be a non-negative integer"
            ))
        })? as usize,
    };
    Ok(RequestedOutput {
        name: name.to_string(),
        binary: params
            .and_then(|p| p.get("binary_data"))
            .and_then(Value::as_bool),
        classification,
    })
}

fn parse_input(v: &Value, binary: &mut &[u8]) -> Result<InputTensor> {
    let field = |k: &str| {
        v.get(k)
            .ok_or_else(|| ProtocolError::bad_request(format!("the input has no '{k}'")))
    };
    let name = field("name")?
        .as_str()
        .ok_or_else(|| ProtocolError::bad_request("the input's 'name' must be a string"))?
        .to_string();
    let bad = |msg: String| ProtocolError::bad_request(format!("input {name}: {msg}"));
    let datatype = field("datatype")?
        .as_str()
        .ok_or_else(|| bad("'datatype' must be a string".into()))?;
    let shape: Vec<usize> = field("shape")?
        .as_array()
        .ok_or_else(|| bad("'shape' must be a list".into()))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("'shape' must hold non-negative integers".into()))?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    let binary_size = v
        .get("parameters")
        .and_then(|p| p.get("binary_data_size"))
        .map(|n| {
            n.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad("'binary_data_size' must be an integer".into()))
        })
        .transpose()?;
    let raw: Option<&[u8]> = match binary_size {
        Some(n) if n > binary.len() => {
            return Err(bad(format!(
                "binary_data_size {n} is more than the {} bytes of binary data left",
                binary.len()
            )))
        }
        Some(n) => {
            let (mine, rest) = binary.split_at(n);
            *binary = rest;
            Some(mine)
        }
        None => None,
    };
    let json_data = || -> Result<Vec<&Value>> {
        let mut flat = Vec::new();
        flatten(field("data")?, &mut flat);
        Ok(flat)
    };
    let data = match datatype {
        "FP32" => InputData::Fp32(match raw {
            Some(b) if b.len() % 4 == 0 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Some(b) => {
                return Err(bad(format!(
                    "{} bytes is not a whole number of FP32",
                    b.len()
                )))
            }
            None => json_data()?
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("FP32 'data' must hold numbers".into()))?,
        }),
        "UINT8" => InputData::Uint8(match raw {
            Some(b) => b.to_vec(),
            None => json_data()?
                .iter()
                .map(|x| x.as_u64().and_then(|x| u8::try_from(x).ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("UINT8 'data' must hold integers 0..=255".into()))?,
        }),
        "BYTES" => InputData::Bytes(match raw {
            Some(b) => split_bytes(b).map_err(bad)?,
            None => json_data()?
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    let s = x
                        .as_str()
                        .ok_or_else(|| bad(format!("BYTES element {i} must be a string")))?;
                    Base64::decode_vec(s.trim()).map_err(|_| {
                        bad(format!(
                            "BYTES element {i} is not base64 (encoded files go as base64 \
                             strings in JSON, or as binary data)"
                        ))
                    })
                })
                .collect::<Result<_>>()?,
        }),
        other => {
            return Err(bad(format!(
                "datatype {other} is not taken: send FP32 [N, 3, H, W] pixel values, UINT8 \
                 [N, H, W, 3] RGB images or BYTES [N] image files"
            )))
        }
    };
    let n = match &data {
        InputData::Fp32(v) => v.len(),
        InputData::Uint8(v) => v.len(),
        InputData::Bytes(v) => v.len(),
    };
    if n != count {
        return Err(bad(format!(
            "shape {shape:?} holds {count} elements but {n} were sent"
        )));
    }
    Ok(InputTensor { name, shape, data })
}

/// Nested JSON lists in row-major order.
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|x| flatten(x, out)),
        other => out.push(other),
    }
}

/// BYTES in the binary form: each element a 4-byte little-endian length, then its bytes.
fn split_bytes(mut b: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let Some((len, rest)) = b.split_first_chunk::<4>() else {
            return Err("BYTES binary data ends inside a length prefix".into());
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(format!(
                "BYTES element {} claims {len} bytes, {} are left",
                out.len(),
                rest.len()
            ));
        }
        out.push(rest[..len].to_vec());
        b = &rest[len..];
    }
    Ok(out)
}

fn join_bytes(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in items {
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s);
    }
    out
}

/// Normalised pixels `[N, 3, s, s]` and the image count of an input tensor, with the SHA-256
/// of each image's bytes (for the audit log).
pub fn to_pixels(input: &InputTensor, meta: &ModelMeta) -> Result<(Vec<f32>, usize, Vec<String>)> {
    let s = meta.preprocess.input_size;
    let name = &input.name;
    let bad = |msg: String| ProtocolError::bad_request(format!("input {name}: {msg}"));
    match &input.data {
        InputData::Fp32(v) => {
            let [n, 3, h, w] = input.shape[..] else {
                return Err(bad(format!(
                    "FP32 shape {:?} is not [N, 3, {s}, {s}]",
                    input.shape
                )));
            };
            if (h, w) != (s, s) || n == 0 {
                return Err(bad(format!(
                    "FP32 shape {:?} is not [N, 3, {s}, {s}] with N ≥ 1",
                    input.shape
                )));
            }
            let len = 3 * s * s;
            let shas = v
                .chunks(len)
                .map(|c| {
                    let bytes: Vec<u8> = c.iter().flat_map(|x| x.to_le_bytes()).collect();
                    mae_models::digest::sha256_hex(&bytes)
                })
                .collect();
            Ok((v.clone(), n, shas))
        }
        InputData::Uint8(v) => {
            let (n, h, w) = match input.shape[..] {
                [n, h, w, 3] => (n, h, w),
                [h, w, 3] => (1, h, w),
                _ => {
                    return Err(bad(format!(
                        "UINT8 shape {:?} is not [N, H, W, 3] (RGB)",
                        input.shape
                    )))
                }
            };
            if n == 0 || h == 0 || w == 0 {
                return Err(bad(format!("UINT8 shape {:?} is empty", input.shape)));
            }
            let mut pixels = Vec::with_capacity(n * 3 * s * s);
            let mut shas = Vec::with_capacity(n);
            for chunk in v.chunks(h * w * 3) {
                shas.push(mae_models::digest::sha256_hex(chunk));
                let img = RgbImage::from_raw(w as u32, h as u32, chunk.to_vec())
                    .ok_or_else(|| bad("UINT8 data does not fill the shape".into()))?;
                if (h, w) == (s, s) {
                    pixels.extend(to_chw_normalized(
                        &img,
                        meta.preprocess.mean,
                        meta.preprocess.std,
                    ));
                } else {
                    pixels.extend(preprocess_eval(&img, &meta.preprocess));
                }
            }
            Ok((pixels, n, shas))
        }
        InputData::Bytes(files) => {
            let n = match input.shape[..] {
                [n] | [n, 1] => n,
                _ => {
                    return Err(bad(format!(
                        "BYTES shape {:?} is not [N] (one encoded image file each)",
                        input.shape
                    )))
                }
            };
            if n == 0 {
                return Err(bad("no images".into()));
            }
            let mut pixels = Vec::with_capacity(n * 3 * s * s);
            let mut shas = Vec::with_capacity(n);
            for (i, bytes) in files.iter().enumerate() {
                if bytes.is_empty() {
                    return Err(bad(format!("element {i} is empty")));
                }
                let img = decode_bytes(bytes, Path::new(&format!("{name}[{i}]")))
                    .map_err(|e| bad(format!("{e:#}")))?;
                pixels.extend(preprocess_eval(&img, &meta.preprocess));
                shas.push(mae_models::digest::sha256_hex(bytes));
            }
            Ok((pixels, n, shas))
        }
    }
}

/// A response body, and the length of its JSON part when binary data follows it.
#[derive(Debug, Clone)]
pub struct Body {
    pub bytes: Vec<u8>,
    pub header_len: Option<usize>,
}

/// The response to `req`, from the outputs of its batch.
pub fn infer_response(
    model: &str,
    version: &str,
    req: &InferRequest,
    scores: &Scores,
    meta: &ModelMeta,
) -> Result<Body> {
    let available: Vec<(&str, &Vec<Vec<f32>>)> = scores
        .logits
        .as_ref()
        .map(|l| ("logits", l))
        .into_iter()
        .chain([("probabilities", &scores.probabilities)])
        .collect();
    // Explanation maps (rollout, gradcam): only when asked for by name.
    let maps = &scores.maps;
    let wanted: Vec<RequestedOutput> = match &req.outputs {
        Some(list) => list.clone(),
        None => available
            .iter()
            .map(|(name, _)| RequestedOutput {
                name: name.to_string(),
                binary: None,
                classification: 0,
            })
            .collect(),
    };
    let mut outputs = Vec::new();
    let mut binary = Vec::new();
    for out in &wanted {
        if let Some(m) = maps.iter().find(|m| m.name == out.name) {
            if out.classification > 0 {
                return Err(ProtocolError::bad_request(format!(
                    "output '{}' is a map, not class scores: it has no classification",
                    out.name
                )));
            }
            let mut entry = Map::new();
            entry.insert("name".into(), out.name.clone().into());
            entry.insert("datatype".into(), "FP32".into());
            entry.insert("shape".into(), json!(m.shape));
            if out.binary.unwrap_or(req.binary_output) {
                let raw: Vec<u8> = m.values.iter().flat_map(|x| x.to_le_bytes()).collect();
                entry.insert("parameters".into(), json!({"binary_data_size": raw.len()}));
                binary.extend(raw);
            } else {
                entry.insert("data".into(), json!(m.values));
            }
            outputs.push(Value::Object(entry));
            continue;
        }
        let Some((_, rows)) = available.iter().find(|(n, _)| *n == out.name) else {
            let names: Vec<&str> = available
                .iter()
                .map(|(n, _)| *n)
                .chain(maps.iter().map(|m| m.name.as_str()))
                .collect();
            return Err(ProtocolError::bad_request(format!(
                "unknown output '{}': this model has {}",
                out.name,
                names.join(", ")
            )));
        };
        let n = rows.len();
        let c = rows.first().map_or(0, Vec::len);
        let mut entry = Map::new();
        entry.insert("name".into(), out.name.clone().into());
        let as_binary = out.binary.unwrap_or(req.binary_output);
        let (datatype, shape, raw, data): (&str, Vec<usize>, Vec<u8>, Value) =
            if out.classification > 0 {
                let k = out.classification.min(c);
                let labels: Vec<Vec<u8>> = rows
                    .iter()
                    .flat_map(|row| {
                        mae_models::metrics::top_k(row, k)
                            .into_iter()
                            .map(|(i, v)| format!("{v}:{i}:{}", meta.class_name(i)).into_bytes())
                    })
                    .collect();
                let strings: Vec<Value> = labels
                    .iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned().into())
                    .collect();
                ("BYTES", vec![n, k], join_bytes(&labels), strings.into())
            } else {
                let flat: Vec<f32> = rows.iter().flatten().copied().collect();
                let raw = flat.iter().flat_map(|x| x.to_le_bytes()).collect();
                ("FP32", vec![n, c], raw, json!(flat))
            };
        entry.insert("datatype".into(), datatype.into());
        entry.insert("shape".into(), json!(shape));
        if as_binary {
            entry.insert("parameters".into(), json!({"binary_data_size": raw.len()}));
            binary.extend(raw);
        } else {
            entry.insert("data".into(), data);
        }
        outputs.push(Value::Object(entry));
    }
    let mut doc = json!({"model_name": model, "model_version": version, "outputs": outputs});
    if let Some(id) = &req.id {
        doc["id"] = id.clone().into();
    }
    let mut bytes = doc.to_string().into_bytes();
    let header_len = (!binary.is_empty()).then_some(bytes.len());
    bytes.extend(binary);
    Ok(Body { bytes, header_len })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn json_and_binary_requests() {
        let body = br#"{"id":"a","inputs":[{"name":"pixel_values","datatype":"FP32",
            "shape":[1,2],"data":[[1.5,-2]]}],"outputs":[{"name":"probabilities",
            "parameters":{"classification":2}}]}"#;
        let r = parse_request(body, None).unwrap();
        assert_eq!(r.id.as_deref(), Some("a"));
        assert_eq!(r.input.data, InputData::Fp32(vec![1.5, -2.0]));
        assert_eq!(r.outputs.unwrap()[0].classification, 2);

        let head = br#"{"inputs":[{"name":"x","datatype":"BYTES","shape":[2],
            "parameters":{"binary_data_size":11}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = head.to_vec();
        body.extend(join_bytes(&[b"abc".to_vec(), vec![]]));
        body.extend([9]);
        // One byte too many after the tensors.
        assert!(parse_request(&body, Some(head.len())).is_err());
        body.pop();
        let r = parse_request(&body, Some(head.len())).unwrap();
        assert!(r.binary_output);
        assert_eq!(
            r.input.data,
            InputData::Bytes(vec![b"abc".to_vec(), vec![]])
        );
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let err = |b: &[u8]| parse_request(b, None).unwrap_err().message;
        assert!(err(b"{").contains("JSON"));
        assert!(err(br#"{"inputs":[]}"#).contains("exactly one input"));
        let e = err(br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[3],"data":[1,2]}]}"#);
        assert!(e.contains("3 elements but 2"), "{e}");
        let e = err(br#"{"inputs":[{"name":"x","datatype":"INT64","shape":[1],"data":[1]}]}"#);
        assert!(e.contains("INT64"), "{e}");
        let e = err(br#"{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],"data":["*"]}]}"#);
        assert!(e.contains("base64"), "{e}");
    }

    #[test]
    fn datatypes() {
        assert_eq!(datatype("float"), "FP32");
        assert_eq!(datatype("uint8"), "UINT8");
        assert_eq!(datatype("int64"), "INT64");
    }
}
