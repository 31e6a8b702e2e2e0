//! `--audit-log FILE`: one JSON line per prediction, appended (time, input, input SHA-256, model
//! SHA-256 and architecture, outputs), for clinical traceability. Every line is an
//! [`AuditRecord`], with the same fields whichever way the prediction was asked for
//! (`mae-run predict`, `/v1`, `/v2`); what does not apply is `null`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::engine::model::ModelMeta;
use crate::engine::Prediction;

/// One line of the audit log.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AuditRecord {
    /// `prediction`, or `unauthorized` for a request refused for its token.
    pub event: &'static str,
    /// How it was asked for: `cli` (`mae-run predict`), `v1` or `v2`.
    pub api: Option<&'static str>,
    /// The request's id (`X-Request-Id`, the Open Inference Protocol's `id`, or the server's).
    pub request_id: Option<String>,
    /// The route of a refused request.
    pub route: Option<&'static str>,
    /// The model: its served name, or its file for `mae-run predict`.
    pub model: Option<String>,
    pub model_version: Option<String>,
    pub model_sha256: Option<String>,
    pub arch: Option<String>,
    pub backend: Option<String>,
    /// The input: a file, an upload's name, or a tensor's name and index.
    pub input: Option<String>,
    pub input_sha256: Option<String>,
    pub class: Option<String>,
    pub labels: Option<Vec<String>>,
    pub probabilities: Option<Vec<f32>>,
    pub temperature: Option<f64>,
    pub threshold: Option<f64>,
    /// The name of the caller's API key, and its address.
    pub key: Option<String>,
    pub client: Option<String>,
}

impl AuditRecord {
    /// The prediction `p` for `input` (of SHA-256 `input_sha256`) by the model `meta`
    /// describes; the caller fills in how it was asked for.
    pub fn prediction(meta: &ModelMeta, input: String, input_sha256: &str, p: &Prediction) -> Self {
        Self {
            event: "prediction",
            model_sha256: Some(meta.sha256.clone()),
            arch: meta.arch.clone(),
            input: Some(input),
            input_sha256: Some(input_sha256.to_string()),
            class: p.class.clone(),
            labels: Some(p.labels.clone()),
            probabilities: Some(p.probabilities.clone()),
            temperature: meta.temperature,
            threshold: Some(meta.decision_threshold()),
            ..Default::default()
        }
    }
}

/// An append-only JSON-lines log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open audit log {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    /// Appends `record` (an [`AuditRecord`], or another service's record) with a `time`
    /// field, as one line written with one call, and syncs it.
    pub fn append(&self, record: &impl serde::Serialize) -> anyhow::Result<()> {
        let mut value = serde_json::to_value(record)?;
        if let Some(o) = value.as_object_mut() {
            o.insert("time".into(), now_rfc3339().into());
        }
        let mut line = value.to_string();
        line.push('\n');
        let mut f = self
            .file
            .lock()
            .map_err(|_| anyhow::anyhow!("audit log lock poisoned"))?;
        f.write_all(line.as_bytes())
            .and_then(|_| f.sync_data())
            .with_context(|| format!("cannot write audit log {}", self.path.display()))
    }
}

/// The current UTC time as `2026-05-01T12:34:56.789Z`.
pub fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&p).unwrap();
        for input in ["a", "b"] {
            let record = AuditRecord {
                event: "prediction",
                input: Some(input.into()),
                ..Default::default()
            };
            log.append(&record).unwrap();
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["input"], "b");
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        // Every field, whether it applies or not.
        assert!(lines[0]["key"].is_null() && lines[0]["model_sha256"].is_null());
    }
}
