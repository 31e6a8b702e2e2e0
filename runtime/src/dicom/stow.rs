//! DICOMweb STOW-RS (PS3.18 10.5), both ways:
//! - in: the body of `POST /dicomweb/studies` (`multipart/related; type="application/dicom"`),
//!   each part a DICOM file taken as a C-STORE is ([`Intake::stow`]), answered with the standard
//!   response (a DICOM JSON object of the stored and the failed instances);
//! - out: `--forward-stow URL`, results posted to `URL/studies` in one request per batch
//!   ([`post`]), over a small blocking HTTP/1.1 client (plain `http://`).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::dimse::{self, status};
use super::scu::Instance;
use super::source::Source;
use super::spool::Spool;
use super::{Events, NodeConfig};

/// STOW-RS failure reasons (PS3.18 table 10.5.3-2; the DIMSE statuses of PS3.4).
pub mod reason {
    /// Processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// SOP class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Referenced transfer syntax not supported.
    pub const TRANSFER_SYNTAX_NOT_SUPPORTED: u16 = 0xC122;
    /// The instance's Study Instance UID is not the one in the URL.
    pub const STUDY_MISMATCH: u16 = 0xA900;
}

/// One part of a multipart body: its content type and bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Part<'a> {
    pub content_type: Option<String>,
    pub body: &'a [u8],
}

/// A parameter of a `Content-Type` value, unquoted (`boundary`, `type`).
fn param(content_type: &str, name: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Why a STOW-RS request as a whole is refused: (HTTP status, message).
pub type Refusal = (u16, String);

/// Splits a `multipart/related; type="application/dicom"` body into its parts.
pub fn parse_multipart<'a>(content_type: &str, body: &'a [u8]) -> Result<Vec<Part<'a>>, Refusal> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("multipart/related") {
        return Err((
            415,
            format!("STOW-RS takes multipart/related; type=\"application/dicom\", not '{media}'"),
        ));
    }
    if let Some(t) = param(content_type, "type") {
        if !t.eq_ignore_ascii_case("application/dicom") {
            return Err((
                415,
                format!("STOW-RS here takes parts of type application/dicom, not '{t}' (DICOM JSON and XML metadata with bulk data are not taken)"),
            ));
        }
    }
    let Some(boundary) = param(content_type, "boundary").filter(|b| !b.is_empty()) else {
        return Err((400, "the Content-Type has no boundary parameter".into()));
    };
    let delim = format!("--{boundary}").into_bytes();
    let find = |from: usize| -> Option<usize> {
        body.get(from..)?
            .windows(delim.len())
            .position(|w| w == delim.as_slice())
            .map(|p| p + from)
    };
    let mut at = find(0).ok_or((400, "the body has no part (no boundary line)".to_string()))?;
    let mut parts = Vec::new();
    loop {
        let after = at + delim.len();
        if body.get(after..after + 2) == Some(b"--") {
            break;
        }
        // The rest of the boundary line (transport padding), then the part's headers.
        let line_end = body[after..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| after + p + 2)
            .ok_or((400, "a boundary line does not end".to_string()))?;
        let (head, start) = if body[line_end..].starts_with(b"\r\n") {
            (String::new(), line_end + 2)
        } else {
            let head_end = body[line_end..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| line_end + p)
                .ok_or((
                    400,
                    format!("part {} has no end of headers", parts.len() + 1),
                ))?;
            (
                String::from_utf8_lossy(&body[line_end..head_end]).to_string(),
                head_end + 4,
            )
        };
        let content_type = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        });
        // The part ends at CRLF before the next delimiter.
        let mut next = start;
        let end = loop {
            let d = find(next).ok_or((
                400,
                format!("part {} is not closed by a boundary", parts.len() + 1),
            ))?;
            if d >= start + 2 && &body[d - 2..d] == b"\r\n" {
                break d;
            }
            next = d + 1;
        };
        parts.push(Part {
            content_type,
            body: &body[start..end - 2],
        });
        at = end;
    }
    if parts.is_empty() {
        return Err((400, "the body has no parts".into()));
    }
    Ok(parts)
}

/// A multipart/related body of `files`: (Content-Type, body).
pub fn build_multipart(files: &[&[u8]], boundary: &str) -> (String, Vec<u8>) {
    let mut body = Vec::new();
    for f in files {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(f);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        body,
    )
}

/// What happened to one posted instance: (SOP class, SOP instance, failure reason if any).
pub type Outcome = (String, String, Option<(u16, String)>);

/// The STOW-RS response body (PS3.18 10.5.3) of `outcomes`, and its HTTP status: 200 when all
/// were stored, 202 when some, 409 when none.
pub fn response(outcomes: &[Outcome]) -> (u16, Value) {
    let item = |class: &str, instance: &str| {
        let mut m = serde_json::Map::new();
        m.insert("00081150".into(), json!({"vr": "UI", "Value": [class]}));
        m.insert("00081155".into(), json!({"vr": "UI", "Value": [instance]}));
        m
    };
    let (mut stored, mut failed) = (Vec::new(), Vec::new());
    for (class, instance, failure) in outcomes {
        let mut m = item(class, instance);
        match failure {
            None => stored.push(Value::Object(m)),
            Some((code, _)) => {
                m.insert("00081197".into(), json!({"vr": "US", "Value": [code]}));
                failed.push(Value::Object(m));
            }
        }
    }
    let status = match (stored.is_empty(), failed.is_empty()) {
        (_, true) => 200,
        (false, false) => 202,
        (true, false) => 409,
    };
    let mut doc = serde_json::Map::new();
    if !failed.is_empty() {
        doc.insert("00081198".into(), json!({"vr": "SQ", "Value": failed}));
    }
    if !stored.is_empty() {
        doc.insert("00081199".into(), json!({"vr": "SQ", "Value": stored}));
    }
    (status, Value::Object(doc))
}

/// Where received instances go, for the listener's C-STOREs and STOW-RS alike.
#[derive(Debug)]
pub struct Intake {
    pub cfg: Arc<NodeConfig>,
    pub spool: Arc<Spool>,
    pub received: std::sync::Mutex<Sender<PathBuf>>,
    pub events: Arc<dyn Events>,
}

impl Intake {
    /// Takes one DICOM file posted by `client` (in the study `study`, when the URL names one):
    /// checked as a C-STORE's instance is, written to the spool and handed on.
    pub fn take(&self, file: &[u8], study: Option<&str>, client: &str) -> Outcome {
        let inst = match Instance::from_file(file) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("STOW-RS part from {client}: {e:#}");
                return (
                    String::new(),
                    String::new(),
                    Some((status::CANNOT_UNDERSTAND, format!("{e:#}"))),
                );
            }
        };
        let failure = self.check(file, &inst, study).err();
        let failure = match failure {
            Some(f) => Some(f),
            None => self.keep(file, &inst, client).err(),
        };
        if let Some((code, why)) = &failure {
            tracing::warn!(
                "STOW-RS {} from {client}: failure {code:#06x}: {why}",
                inst.sop_instance
            );
        }
        (inst.sop_class, inst.sop_instance, failure)
    }

    fn check(
        &self,
        file: &[u8],
        inst: &Instance,
        study: Option<&str>,
    ) -> Result<(), (u16, String)> {
        if !dimse::is_uid(&inst.sop_instance) {
            return Err((
                status::CANNOT_UNDERSTAND,
                format!("SOP Instance UID '{}' is not a UID", inst.sop_instance),
            ));
        }
        if dimse::storage_class_name(&inst.sop_class).is_none() {
            return Err((
                reason::SOP_CLASS_NOT_SUPPORTED,
                format!(
                    "SOP class {} is not an image class the node takes",
                    inst.sop_class
                ),
            ));
        }
        if dimse::transfer_syntax_name(&inst.transfer_syntax).is_none() {
            return Err((
                reason::TRANSFER_SYNTAX_NOT_SUPPORTED,
                format!(
                    "transfer syntax {} is not one the input layer decodes",
                    inst.transfer_syntax
                ),
            ));
        }
        if file.len() > self.cfg.limits.max_instance_bytes {
            return Err((
                status::OUT_OF_RESOURCES,
                format!(
                    "{} bytes, over --dicom-max-instance-bytes {}",
                    file.len(),
                    self.cfg.limits.max_instance_bytes
                ),
            ));
        }
        let name = std::path::Path::new(&inst.sop_instance);
        mae_models::input::dicom::frame_count(file, name)
            .map_err(|e| (status::CANNOT_UNDERSTAND, e.to_string()))?;
        if let Some(want) = study {
            let source =
                Source::parse(file).map_err(|e| (status::CANNOT_UNDERSTAND, format!("{e:#}")))?;
            if source.study != want {
                return Err((
                    reason::STUDY_MISMATCH,
                    format!(
                        "Study Instance UID {} is not the study {want} of the URL",
                        source.study
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Writes `file` to the spool (fsynced, renamed), records it and hands it on.
    pub fn keep(&self, file: &[u8], inst: &Instance, client: &str) -> Result<(), (u16, String)> {
        let path = self.spool.put(&inst.sop_instance, file).map_err(|e| {
            tracing::warn!(
                "DICOM spool {}: cannot write: {e}",
                self.spool.dir.display()
            );
            (status::OUT_OF_RESOURCES, format!("cannot spool: {e}"))
        })?;
        self.events.record(json!({
            "event": "dicom-received",
            "via": "stow-rs",
            "client": client,
            "sop_class_uid": inst.sop_class,
            "sop_instance_uid": inst.sop_instance,
            "transfer_syntax": inst.transfer_syntax,
            "bytes": file.len(),
        }));
        if let Ok(tx) = self.received.lock() {
            let _ = tx.send(path);
        }
        Ok(())
    }

    /// Answers one STOW-RS request: (HTTP status, content type, body).
    pub fn stow(
        &self,
        content_type: &str,
        body: &[u8],
        study: Option<&str>,
        client: &str,
    ) -> (u16, &'static str, Vec<u8>) {
        if let Some(s) = study {
            if !dimse::is_uid(s) {
                let msg = json!({"error": format!("'{s}' in the URL is not a Study Instance UID")});
                return (400, "application/json", msg.to_string().into_bytes());
            }
        }
        let parts = match parse_multipart(content_type, body) {
            Ok(p) => p,
            Err((code, msg)) => {
                return (
                    code,
                    "application/json",
                    json!({"error": msg}).to_string().into_bytes(),
                )
            }
        };
        let outcomes: Vec<Outcome> = parts
            .iter()
            .map(|p| {
                match p
                    .content_type
                    .as_deref()
                    .map(|c| c.split(';').next().unwrap_or("").trim())
                {
                    Some(c) if !c.eq_ignore_ascii_case("application/dicom") => (
                        String::new(),
                        String::new(),
                        Some((
                            reason::PROCESSING_FAILURE,
                            format!("a part of type '{c}', not application/dicom"),
                        )),
                    ),
                    _ => self.take(p.body, study, client),
                }
            })
            .collect();
        let (code, doc) = response(&outcomes);
        (code, "application/dicom+json", doc.to_string().into_bytes())
    }
}

/// A `--forward-stow` destination: `http://HOST[:PORT]/PATH`, posted to at `PATH/studies`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StowUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl std::fmt::Display for StowUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.path)
    }
}

impl std::str::FromStr for StowUrl {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let Some(rest) = s.strip_prefix("http://") else {
            if s.starts_with("https://") {
                bail!("--forward-stow {s}: https is not spoken by mae-run's STOW-RS client; give the PACS's plain http:// DICOMweb address (on a trusted network) or a local TLS proxy's");
            }
            bail!("--forward-stow {s}: expected http://HOST[:PORT]/PATH (the DICOMweb root, e.g. http://pacs:8042/dicom-web)");
        };
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .with_context(|| format!("--forward-stow {s}: bad port '{p}'"))?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() {
            bail!("--forward-stow {s}: no host");
        }
        Ok(Self {
            host: host.to_string(),
            port,
            path: format!("/{}", path.trim_end_matches('/')),
        })
    }
}

/// Posts `files` to `url`'s `/studies` in one STOW-RS request; returns per file `None` when
/// stored, or the reason it was not. An error means no answer (try all again later).
pub fn post(
    url: &StowUrl,
    files: &[&[u8]],
    timeout: Duration,
) -> anyhow::Result<Vec<Option<String>>> {
    let boundary = format!("mae-stow-{:016x}", rand_u64());
    let (content_type, body) = build_multipart(files, &boundary);
    let target = format!("{}/studies", url.path.trim_end_matches('/'));
    let addr = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", url.host))?
        .next()
        .with_context(|| format!("{} has no address", url.host))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {url}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let head = format!(
        "POST {target} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: {content_type}\r\n\
         Accept: application/dicom+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        url.host,
        url.port,
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(&body))
        .with_context(|| format!("cannot send to {url}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .with_context(|| format!("no answer from {url}"))?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("{url} answered no HTTP head"))?;
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{url} answered a bad status line"))?;
    let mut body = resp[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).to_string();
    match code {
        200 => Ok(vec![None; files.len()]),
        202 | 409 => {
            // Which failed: the response's Failed SOP Sequence.
            let doc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let failed: Vec<(String, String)> = doc["00081198"]["Value"]
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .map(|i| {
                            let uid = i["00081155"]["Value"][0].as_str().unwrap_or("").to_string();
                            let why = i["00081197"]["Value"][0]
                                .as_u64()
                                .map_or("failed".into(), |c| format!("failure reason {c:#06x}"));
                            (uid, why)
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(files
                .iter()
                .map(|f| {
                    let uid = Instance::from_file(f)
                        .map(|i| i.sop_instance)
                        .unwrap_or_default();
                    if failed.is_empty() && code == 409 {
                        return Some(format!("HTTP 409: {}", text()));
                    }
                    failed
                        .iter()
                        .find(|(u, _)| *u == uid)
                        .map(|(_, why)| format!("HTTP {code}, {why}"))
                })
                .collect())
        }
        _ => bail!("{url} answered HTTP {code}: {}", text()),
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if n == 0 || b.len() < eol + 2 + n {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
    out
}

/// A boundary's randomness: the clock and the process, hashed.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn multipart_round_trips_and_bad_bodies_are_refused() {
        let files: [&[u8]; 3] = [b"first\r\n--not-the-boundary", b"", b"third"];
        let (ct, body) = build_multipart(&files, "b0undary");
        let parts = parse_multipart(&ct, &body).unwrap();
        assert_eq!(parts.len(), 3);
        for (p, f) in parts.iter().zip(files) {
            assert_eq!(p.body, f);
            assert_eq!(p.content_type.as_deref(), Some("application/dicom"));
        }
        assert_eq!(
            parse_multipart("application/dicom", &body).unwrap_err().0,
            415
        );
        let json = "multipart/related; type=\"application/dicom+json\"; boundary=b0undary";
        assert_eq!(parse_multipart(json, &body).unwrap_err().0, 415);
        assert_eq!(
            parse_multipart("multipart/related", &body).unwrap_err().0,
            400
        );
        let cut = &body[..body.len() - 20];
        assert_eq!(parse_multipart(&ct, cut).unwrap_err().0, 400);
        assert_eq!(parse_multipart(&ct, b"no parts here").unwrap_err().0, 400);
    }

    #[test]
    fn the_response_lists_stored_and_failed_instances() {
        let ok = ("1.2".to_string(), "1.2.3".to_string(), None);
        let bad = (
            "1.2".to_string(),
            "1.2.4".to_string(),
            Some((0x0122, "no".to_string())),
        );
        let (code, doc) = response(std::slice::from_ref(&ok));
        assert_eq!(code, 200);
        assert_eq!(doc["00081199"]["Value"][0]["00081155"]["Value"][0], "1.2.3");
        assert!(doc.get("00081198").is_none());
        let (code, doc) = response(&[ok, bad.clone()]);
        assert_eq!(code, 202);
        assert_eq!(doc["00081198"]["Value"][0]["00081197"]["Value"][0], 0x0122);
        assert_eq!(response(&[bad]).0, 409);
    }

    #[test]
    fn stow_urls() {
        let u: StowUrl = "http://pacs:8042/dicom-web/".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("pacs", 8042, "/dicom-web")
        );
        let u: StowUrl = "http://pacs".parse().unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        assert!("https://pacs/dicom-web".parse::<StowUrl>().is_err());
        assert!("pacs:8042".parse::<StowUrl>().is_err());
        assert!("http://pacs:x/".parse::<StowUrl>().is_err());
    }
}
