//! `mae-run serve --dicom-listen` as a clinic's DICOM node, against the reference components:
//! Orthanc as the PACS (it sends a study to mae-run and receives the results), dcmtk's
//! `echoscu` and `storescu` as modalities, pynetdicom as a second SCU, highdicom as the SR
//! reader and dciodvfy (dicom3tools) as the validator. Each test starts its own Orthanc and
//! mae-run on free local ports with their own folders. `scripts/setup.sh` installs the tools;
//! a missing one fails the test with what to run.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// SR probabilities against `mae-run predict` on the same files (issue 31's bound).
const SR_PROB_TOL: f32 = 1e-6;

fn require_tool(name: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()));
    assert!(
        found,
        "{name} is not installed (Debian package {package}); run scripts/setup.sh, which \
         installs dcmtk, orthanc and dicom3tools"
    );
}

fn require_python(module: &str) {
    let ok = Command::new(PYTHON)
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{module} is not installed in the project virtualenv ({PYTHON}); run scripts/setup.sh \
         (requirements.txt pins it)"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `mae-run serve --dicom-listen 127.0.0.1:0` child, killed on drop.
struct Node {
    child: Child,
    port: u16,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Node {
    fn start(dir: &Path, model: &Path, extra: &[&str]) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mae-run"))
            .args(["--log", "info", "serve", "--model", p(model)])
            .args(["--listen", "127.0.0.1:0", "--dicom-listen", "127.0.0.1:0"])
            .args(["--dicom-spool", p(&dir.join("spool"))])
            .args(["--audit-log", p(&dir.join("audit.jsonl"))])
            .args(extra)
            .env_remove("ORT_DYLIB_PATH")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let port = loop {
            let line = match lines.next() {
                Some(l) => l.unwrap(),
                None => panic!("serve exited before listening:\n{}", log.lock().unwrap()),
            };
            log.lock().unwrap().push_str(&(line.clone() + "\n"));
            if let Some(rest) = line.split("DICOM node listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap();
                break addr.rsplit(':').next().unwrap().parse().unwrap();
            }
        };
        let sink = log.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(l + "\n"));
            }
        });
        Node { child, port, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The HTTP server's address, from the log.
    fn http(&self) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            if let Some(rest) = log.split("http://").nth(1) {
                return rest.split_whitespace().next().unwrap().to_string();
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of the series `series` (name and labels, as written) in the HTTP server's
    /// `/metrics`, or `None` without it.
    fn metric(&self, series: &str) -> Option<f64> {
        let mut s = TcpStream::connect(self.http()).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Orthanc's DICOMweb plugin (Debian package `orthanc-dicomweb`), loaded when installed.
const DICOMWEB_PLUGIN: &str = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so";

/// An Orthanc child with its own storage, HTTP and DICOM ports, killed on drop.
struct Orthanc {
    child: Child,
    http: u16,
    dir: PathBuf,
}

/// The SOP Instance UID of an instance as Orthanc's REST API describes it.
fn sop_instance_uid(instance: &serde_json::Value) -> String {
    instance["MainDicomTags"]["SOPInstanceUID"]
        .as_str()
        .unwrap()
        .to_string()
}

impl Orthanc {
    /// The SOP Instance UIDs of every instance Orthanc holds.
    fn sop_instance_uids(&self) -> Vec<String> {
        self.get("/instances?expand")
            .as_array()
            .unwrap()
            .iter()
            .map(sop_instance_uid)
            .collect()
    }

    /// Starts Orthanc (AE ORTHANC) knowing mae-run as modality `mae` (AE MAE on `node_port`).
    fn start(dir: &Path, http: u16, dicom: u16, node_port: u16) -> Orthanc {
        require_tool("Orthanc", "orthanc");
        let dir = dir.join("orthanc");
        std::fs::create_dir_all(&dir).unwrap();
        let config = serde_json::json!({
            "Name": "mae-test",
            "StorageDirectory": dir.join("db"),
            "IndexDirectory": dir.join("db"),
            "HttpPort": http,
            "DicomPort": dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "Plugins": if Path::new(DICOMWEB_PLUGIN).exists() { vec![DICOMWEB_PLUGIN] } else { vec![] },
            "DicomWeb": {"Enable": true, "Root": "/dicom-web/"},
            "DicomModalities": {"mae": ["MAE", "127.0.0.1", node_port]},
        });
        let path = dir.join("orthanc.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let log = std::fs::File::create(dir.join("orthanc.log")).unwrap();
        let child = Command::new("Orthanc")
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let o = Orthanc { child, http, dir };
        let start = Instant::now();
        while o.try_get("/system").is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "Orthanc did not start: {}",
                std::fs::read_to_string(o.dir.join("orthanc.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        o
    }

    fn request(&self, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).ok()?;
        s.write_all(body).ok()?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).ok()?;
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&resp[..split]).to_string();
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        let mut body = resp[split + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        Some((status, body))
    }

    fn try_get(&self, path: &str) -> Option<serde_json::Value> {
        match self.request("GET", path, b"")? {
            (200, body) => serde_json::from_slice(&body).ok(),
            _ => None,
        }
    }

    fn get(&self, path: &str) -> serde_json::Value {
        self.try_get(path)
            .unwrap_or_else(|| panic!("Orthanc GET {path} failed"))
    }

    fn post(&self, path: &str, body: &[u8]) -> serde_json::Value {
        let (status, resp) = self.request("POST", path, body).unwrap();
        assert_eq!(
            status,
            200,
            "POST {path}: {}\nOrthanc's log:\n{}",
            String::from_utf8_lossy(&resp),
            std::fs::read_to_string(self.dir.join("orthanc.log")).unwrap_or_default()
        );
        serde_json::from_slice(&resp).unwrap()
    }

    fn file(&self, instance: &str) -> Vec<u8> {
        let (status, body) = self
            .request("GET", &format!("/instances/{instance}/file"), b"")
            .unwrap();
        assert_eq!(status, 200);
        body
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 4 + n..];
    }
}

/// The study of `fixtures/dicom_study.py` in `dir`: (file, SOP Instance UID, transfer syntax).
fn study(dir: &Path) -> Vec<(PathBuf, String, String)> {
    require_python("pylibjpeg");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dicom_study.py");
    let out = Command::new(PYTHON).arg(script).arg(dir).output().unwrap();
    assert!(out.status.success(), "{script}: {}", stderr(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                PathBuf::from(x["file"].as_str().unwrap()),
                x["sop_instance_uid"].as_str().unwrap().to_string(),
                x["transfer_syntax"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The audit log's records of `event`.
fn audit(dir: &Path, event: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == event)
        .collect()
}

/// dciodvfy's error lines for `file` (warnings are not errors).
fn dciodvfy_errors(file: &Path) -> Vec<String> {
    let out = Command::new("dciodvfy").arg(file).output().unwrap();
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.starts_with("Error"))
        .map(str::to_string)
        .collect()
}

fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(name).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// Asks Orthanc to send resources (`A", "B` for several) to mae-run (REST
/// `/modalities/mae/store`); its job report.
fn store_study(orthanc: &Orthanc, study: &str, node: &Node) -> serde_json::Value {
    let body = format!(r#"{{"Resources": ["{study}"], "Synchronous": true}}"#);
    let (status, resp) = orthanc
        .request("POST", "/modalities/mae/store", body.as_bytes())
        .unwrap();
    assert_eq!(
        status,
        200,
        "Orthanc's store to mae-run: {}\nmae-run's log:\n{}",
        String::from_utf8_lossy(&resp),
        node.log()
    );
    serde_json::from_slice(&resp).unwrap()
}

/// Orthanc sends a study of five transfer syntaxes to mae-run, which sends an SR and a
/// Secondary Capture per image back into the same study; the SRs hold `mae-run predict`'s
/// probabilities, read back by highdicom, and dciodvfy finds no error in either object.
#[test]
fn orthanc_sends_a_study_and_gets_the_results_back() {
    require_tool("dciodvfy", "dicom3tools");
    require_python("highdicom");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = fixtures().join("binary.onnx");
    let files = study(&d.join("study"));
    let (http, dicom) = (free_port(), free_port());
    let forward = format!("ORTHANC@127.0.0.1:{dicom}");
    let callers = d.join("callers.txt");
    std::fs::write(&callers, "ORTHANC 127.0.0.1\n").unwrap();
    let node = Node::start(
        d,
        &model,
        &["--forward", &forward, "--dicom-callers", p(&callers)],
    );
    let orthanc = Orthanc::start(d, http, dicom, node.port);
    for (f, _, _) in &files {
        orthanc.post("/instances", &std::fs::read(f).unwrap());
    }
    let studies = orthanc.get("/studies");
    let study_id = studies[0].as_str().unwrap().to_string();
    let job = store_study(&orthanc, &study_id, &node);
    assert_eq!(job["FailedInstancesCount"], 0, "{job}\n{}", node.log());
    assert_eq!(job["InstancesCount"], files.len(), "{job}");

    // Every image comes back as an SR and a Secondary Capture.
    let want = 3 * files.len();
    let start = Instant::now();
    let instances = loop {
        let got = orthanc.get(&format!("/studies/{study_id}/instances"));
        if got.as_array().unwrap().len() >= want {
            break got;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{} of {want} instances in Orthanc's study; mae-run's log:\n{}",
            got.as_array().unwrap().len(),
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(instances.as_array().unwrap().len(), want);
    assert_eq!(orthanc.get("/studies").as_array().unwrap().len(), 1);
    let by_uid: BTreeMap<String, String> = instances
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (sop_instance_uid(i), i["ID"].as_str().unwrap().to_string()))
        .collect();
    // Orthanc may store the last result before mae-run has logged it as sent.
    while audit(d, "dicom-sent").len() < 2 * files.len() {
        assert!(start.elapsed() < Duration::from_secs(120), "{}", node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let classified = audit(d, "dicom-classified");
    assert_eq!(classified.len(), files.len());
    assert_eq!(audit(d, "dicom-received").len(), files.len());
    assert_eq!(audit(d, "dicom-sent").len(), 2 * files.len());

    // The reference: mae-run predict on the same files.
    let mut args = vec!["predict", "--model", p(&model), "--format", "json"];
    args.extend(files.iter().map(|(f, _, _)| p(f)));
    let out = mae_run(d, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let predicted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference: BTreeMap<String, Vec<f32>> = predicted["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let input = r["input"].as_str().unwrap();
            let uid = files
                .iter()
                .find(|(f, _, _)| p(f) == input)
                .unwrap()
                .1
                .clone();
            (uid, floats(&r["probabilities"]))
        })
        .collect();
    assert_eq!(reference.len(), files.len());

    let results = d.join("from-orthanc");
    std::fs::create_dir_all(&results).unwrap();
    let mut srs = Vec::new();
    for record in &classified {
        let source = record["sop_instance_uid"].as_str().unwrap();
        for key in ["sr_sop_instance_uid", "sc_sop_instance_uid"] {
            let uid = record[key].as_str().unwrap();
            let id = by_uid
                .get(uid)
                .unwrap_or_else(|| panic!("{key} {uid} of {source} is not in Orthanc"));
            let tags = orthanc.get(&format!("/instances/{id}/simplified-tags"));
            let sop_class = tags["SOPClassUID"].as_str().unwrap();
            if key.starts_with("sr") {
                assert_eq!(sop_class, "1.2.840.10008.5.1.4.1.1.88.33");
                assert_eq!(tags["Modality"], "SR");
            } else {
                assert_eq!(sop_class, "1.2.840.10008.5.1.4.1.1.7");
                assert_eq!(tags["BurnedInAnnotation"], "YES");
            }
            assert_eq!(tags["PatientID"], "MAE-0001");
            let file = results.join(format!("{uid}.dcm"));
            std::fs::write(&file, orthanc.file(id)).unwrap();
            let errors = dciodvfy_errors(&file);
            assert!(
                errors.is_empty(),
                "dciodvfy on the {key} of {source}:\n{}",
                errors.join("\n")
            );
            if key.starts_with("sr") {
                srs.push((source.to_string(), file));
            }
        }
    }

    // highdicom reads each SR: the finding, and every probability equal to predict's.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/read_sr.py");
    let out = Command::new(PYTHON)
        .arg(script)
        .args(srs.iter().map(|(_, f)| f))
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {}", stderr(&out));
    let read: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for ((source, _), doc) in srs.iter().zip(read.as_array().unwrap()) {
        let want = &reference[source];
        let got: Vec<f32> = ["normal", "pneumonia"]
            .iter()
            .map(|c| doc["numbers"][c].as_f64().unwrap() as f32)
            .collect();
        assert_close(&format!("SR of {source}"), &got, want, SR_PROB_TOL);
        let class = if want[1] > 0.5 { "pneumonia" } else { "normal" };
        assert_eq!(doc["finding"]["value"], class, "{doc}");
        assert_eq!(doc["referenced"][0], source.as_str());
        assert_eq!(doc["study_instance_uid"], "1.2.826.0.1.3680043.8.498.1001");
        let sha = predicted["model"]["sha256"].as_str().unwrap();
        assert_eq!(doc["observer"]["Device Observer Serial Number"], sha);
    }

    // Sent again, the source images get no second result: the UIDs are derived, not new. The
    // study, results included, goes: mae-run takes its own Secondary Captures without
    // classifying them (no results of results), and Orthanc is refused the SRs' SOP class.
    let sources: Vec<String> = files
        .iter()
        .map(|(_, uid, _)| by_uid[uid].clone())
        .collect();
    let job = store_study(&orthanc, &sources.join("\", \""), &node);
    assert_eq!(job["FailedInstancesCount"], 0, "{job}");
    let start = Instant::now();
    while audit(d, "dicom-sent").len() < 4 * files.len() {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", node.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let again = orthanc.get(&format!("/studies/{study_id}/instances"));
    assert_eq!(again.as_array().unwrap().len(), want);
}

/// Callers: an AE title not in --dicom-callers is rejected with "calling AE title not
/// recognized", a wrong called AE title with "called AE title not recognized"; a listed
/// caller's C-ECHO succeeds (dcmtk's echoscu and mae-run dicom-echo).
#[test]
fn unknown_callers_are_rejected() {
    require_tool("echoscu", "dcmtk");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let callers = d.join("callers.txt");
    std::fs::write(&callers, "# the PACS\nPACS\nONLYHERE 10.1.2.3\n").unwrap();
    let node = Node::start(
        d,
        &fixtures().join("binary.onnx"),
        &[
            "--results-dir",
            p(&d.join("results")),
            "--dicom-callers",
            p(&callers),
        ],
    );
    let port = node.port.to_string();
    let ok = tool(
        "echoscu",
        &["-aet", "PACS", "-aec", "MAE", "127.0.0.1", &port],
    );
    assert!(ok.status.success(), "{}", text(&ok));
    for (calling, called, reason) in [
        ("STRANGER", "MAE", "Calling AE Title Not Recognized"),
        ("ONLYHERE", "MAE", "Calling AE Title Not Recognized"),
        ("PACS", "OTHER", "Called AE Title Not Recognized"),
    ] {
        let o = tool(
            "echoscu",
            &["-aet", calling, "-aec", called, "127.0.0.1", &port],
        );
        assert!(!o.status.success(), "{calling} → {called} was let in");
        assert!(
            text(&o).contains(reason),
            "{calling} → {called}: {}",
            text(&o)
        );
    }
    let to = format!("MAE@127.0.0.1:{port}");
    let o = mae_run(d, &["dicom-echo", "--to", &to, "--ae-title", "PACS"]);
    assert!(
        o.status.success() && stdout(&o).contains("success"),
        "{}",
        text(&o)
    );
    let o = mae_run(d, &["dicom-echo", "--to", &to, "--ae-title", "NOBODY"]);
    assert_fails_with(&o, "rejected");
    // The audit record follows the rejection the caller already has.
    let start = Instant::now();
    while audit(d, "dicom-rejected").len() < 4 {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(node.log().contains("rejected"), "{}", node.log());
}

/// Negotiation with pynetdicom: per presentation context, a transfer syntax the input layer
/// does not decode is refused with "transfer syntaxes not supported" (4), a SOP class that is
/// not an image with "abstract syntax not supported" (3), and the others accepted, on one
/// association.
#[test]
fn unsupported_transfer_syntaxes_are_refused_per_context() {
    require_python("pynetdicom");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let node = Node::start(
        d,
        &fixtures().join("binary.onnx"),
        &["--results-dir", p(&d.join("r"))],
    );
    let script = r#"
import json, sys
from pynetdicom import AE
ae = AE(ae_title="PYNET")
ct = "1.2.840.10008.5.1.4.1.1.2"
ae.add_requested_context(ct, ["1.2.840.10008.1.2.4.100"])          # MPEG2: refused
ae.add_requested_context(ct, ["1.2.840.10008.1.2.4.201"])          # HTJ2K: refused
ae.add_requested_context(ct, ["1.2.840.10008.1.2.4.90"])           # JPEG 2000: taken
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.481.5", ["1.2.840.10008.1.2.1"])  # RT Plan
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="MAE")
contexts = sorted(assoc.accepted_contexts + assoc.rejected_contexts, key=lambda c: c.context_id)
out = {"established": assoc.is_established, "results": [c.result for c in contexts]}
assoc.release()
print(json.dumps(out))
"#;
    let o = Command::new(PYTHON)
        .args(["-c", script, &node.port.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(got["established"], true, "{got}");
    // In the order proposed: MPEG2, HTJ2K, JPEG 2000, RT Plan.
    assert_eq!(got["results"], serde_json::json!([4, 4, 0, 3]), "{got}");
}

/// An instance over --dicom-max-instance-bytes is answered "out of resources" (0xA700), one
/// whose data set does not parse "cannot understand" (0xC000); neither reaches the spool, and
/// the node goes on answering.
#[test]
fn oversized_and_broken_instances_get_failure_statuses() {
    require_tool("storescu", "dcmtk");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = study(&d.join("study"));
    let node = Node::start(
        d,
        &fixtures().join("binary.onnx"),
        &[
            "--results-dir",
            p(&d.join("r")),
            "--dicom-max-instance-bytes",
            "3000",
        ],
    );
    let port = node.port.to_string();
    let big = files
        .iter()
        .find(|(f, _, _)| std::fs::metadata(f).unwrap().len() > 4000)
        .unwrap();
    let o = tool(
        "storescu",
        &["-v", "-aec", "MAE", "127.0.0.1", &port, p(&big.0)],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Refused: OutOfResources"), "{}", text(&o));
    let to = format!("MAE@127.0.0.1:{port}");
    let o = mae_run(d, &["dicom-send", "--to", &to, p(&big.0)]);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("status 0xa700"), "{}", text(&o));
    assert!(
        node.log().contains("--dicom-max-instance-bytes"),
        "{}",
        node.log()
    );

    // A data set cut short: its meta says one thing, its body is garbage.
    let small = files
        .iter()
        .find(|(f, _, _)| std::fs::metadata(f).unwrap().len() < 3000)
        .unwrap();
    let mut bytes = std::fs::read(&small.0).unwrap();
    let n = bytes.len();
    bytes.truncate(n - n / 3);
    bytes.extend_from_slice(&[0xff; 64]);
    let broken = d.join("broken.dcm");
    std::fs::write(&broken, &bytes).unwrap();
    let o = mae_run(d, &["dicom-send", "--to", &to, p(&broken)]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(stdout(&o).contains("status 0xc000"), "{}", text(&o));
    assert!(audit(d, "dicom-received").is_empty());

    // The node still takes a good instance.
    let o = mae_run(d, &["dicom-send", "--to", &to, p(&small.0)]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(audit(d, "dicom-received").len(), 1);
}

/// Faults: the PACS is down while mae-run has results to send, and mae-run is killed with
/// SIGKILL with them still queued; restarted with the same spool, and the PACS started, every
/// result arrives, once (counted by SOP Instance UID in Orthanc).
#[test]
fn queued_results_survive_a_pacs_outage_and_sigkill() {
    require_tool("Orthanc", "orthanc");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = study(&d.join("study"));
    let model = fixtures().join("binary.onnx");
    let (http, dicom) = (free_port(), free_port());
    let forward = format!("ORTHANC@127.0.0.1:{dicom}");
    let args = [
        "--forward",
        &forward,
        "--forward-retry-first-s",
        "1",
        "--forward-retry-max-s",
        "2",
    ];
    let node = Node::start(d, &model, &args);
    let to = format!("MAE@127.0.0.1:{}", node.port);
    let mut send = vec!["dicom-send", "--to", &to];
    send.extend(files.iter().map(|(f, _, _)| p(f)));
    let o = mae_run(d, &send);
    assert!(o.status.success(), "{}", text(&o));
    let start = Instant::now();
    while audit(d, "dicom-classified").len() < files.len() {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The PACS is down: the sends fail and are retried.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(node.log().contains("retrying in"), "{}", node.log());
    assert!(audit(d, "dicom-sent").is_empty());
    // /metrics: one association, every instance received and classified, their results
    // waiting, the oldest for over a second.
    let n = files.len() as f64;
    let dest = format!("{{destination=\"{forward}\"}}");
    let metric = |node: &Node, series: &str| node.metric(series).unwrap_or(f64::NAN);
    assert_eq!(
        metric(&node, "mae_dicom_associations_total{result=\"accepted\"}"),
        1.0
    );
    assert_eq!(metric(&node, "mae_dicom_instances_received_total"), n);
    assert_eq!(metric(&node, "mae_dicom_instances_classified_total"), n);
    assert_eq!(metric(&node, "mae_dicom_spool_pending"), 0.0);
    assert_eq!(
        metric(&node, &format!("mae_dicom_queue_length{dest}")),
        2.0 * n
    );
    assert!(metric(&node, &format!("mae_dicom_queue_oldest_seconds{dest}")) >= 1.0);
    assert_eq!(metric(&node, "mae_dicom_associations_open"), 0.0);
    drop(node); // SIGKILL

    let node = Node::start(d, &model, &args);
    assert!(node.log().contains("waiting from before"), "{}", node.log());
    let orthanc = Orthanc::start(d, http, dicom, node.port);
    let want: Vec<String> = audit(d, "dicom-classified")
        .iter()
        .flat_map(|r| {
            [
                r["sr_sop_instance_uid"].as_str().unwrap().to_string(),
                r["sc_sop_instance_uid"].as_str().unwrap().to_string(),
            ]
        })
        .collect();
    let start = Instant::now();
    loop {
        let n = orthanc.get("/instances").as_array().unwrap().len();
        if n >= want.len() && audit(d, "dicom-sent").len() >= want.len() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{n} of {} results in Orthanc:\n{}",
            want.len(),
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut got = orthanc.sop_instance_uids();
    got.sort();
    let mut want = want;
    want.sort();
    assert_eq!(got, want);
    assert_eq!(audit(d, "dicom-sent").len(), want.len());
    // The restarted node sent what the first one queued, and its outbox is empty.
    let sent = format!("mae_dicom_results_sent_total{dest}");
    assert_eq!(metric(&node, &sent), want.len() as f64);
    assert_eq!(metric(&node, &format!("mae_dicom_queue_length{dest}")), 0.0);
    assert_eq!(
        metric(&node, &format!("mae_dicom_queue_oldest_seconds{dest}")),
        0.0
    );
    assert_eq!(metric(&node, "mae_dicom_instances_received_total"), 0.0);
}

/// Test certificates: a CA, the node's certificate (localhost, 127.0.0.1) and a client's, both
/// issued by the CA, and a second client's from a CA the node does not know, as PEM files in
/// `dir`.
fn tls_certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let ca = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let (ours, theirs) = (ca("mae test CA"), ca("another CA"));
    std::fs::write(dir.join("ca.pem"), ours.pem()).unwrap();
    let leaf = |name: &str, sans: &[&str], issuer: &CertifiedIssuer<'_, KeyPair>| {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    leaf("node", &["localhost", "127.0.0.1"], &ours);
    leaf("client", &[], &ours);
    leaf("stranger", &[], &theirs);
}

/// DICOM TLS (PS3.15 Annex B) with client certificates required: dcmtk's echoscu and storescu
/// with a certificate of the node's client CA are let in (the image's results are written);
/// a caller with no certificate, one with a certificate of another CA, and one without TLS
/// at all are refused, and the audit log says why.
#[test]
fn tls_with_client_certificates() {
    require_tool("echoscu", "dcmtk");
    require_tool("storescu", "dcmtk");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tls_certificates(d);
    let files = study(&d.join("study"));
    let results = d.join("results");
    let pem = |n: &str| d.join(n).to_str().unwrap().to_string();
    let node = Node::start(
        d,
        &fixtures().join("binary.onnx"),
        &[
            "--results-dir",
            p(&results),
            "--dicom-tls-cert",
            &pem("node.pem"),
            "--dicom-tls-key",
            &pem("node.key"),
            "--dicom-tls-client-ca",
            &pem("ca.pem"),
        ],
    );
    let port = node.port.to_string();
    let (key, cert, ca) = (pem("client.key"), pem("client.pem"), pem("ca.pem"));
    let tls: Vec<&str> = vec!["+tls", &key, &cert, "+cf", &ca, "-aet", "MODALITY"];
    let mut echo = tls.clone();
    echo.extend(["-aec", "MAE", "127.0.0.1", &port]);
    let o = tool("echoscu", &echo);
    assert!(o.status.success(), "{}\n{}", text(&o), node.log());
    let mut store = tls.clone();
    store.extend(["-aec", "MAE", "127.0.0.1", &port, p(&files[0].0)]);
    let o = tool("storescu", &store);
    assert!(o.status.success(), "{}\n{}", text(&o), node.log());
    assert!(node.log().contains("over TLS accepted"), "{}", node.log());
    let start = Instant::now();
    while audit(d, "dicom-classified").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "{}", node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read_dir(&results).unwrap().count(), 2);

    let (skey, scert) = (pem("stranger.key"), pem("stranger.pem"));
    let refused: [(&str, Vec<&str>); 3] = [
        ("no certificate", vec!["+tla", "+cf", &ca]),
        ("another CA's", vec!["+tls", &skey, &scert, "+cf", &ca]),
        ("no TLS", vec![]),
    ];
    for (what, args) in &refused {
        let mut a = args.clone();
        a.extend([
            "-to",
            "5",
            "-aet",
            "MODALITY",
            "-aec",
            "MAE",
            "127.0.0.1",
            &port,
        ]);
        let o = tool("echoscu", &a);
        assert!(!o.status.success(), "{what}: let in\n{}", text(&o));
    }
    let start = Instant::now();
    while audit(d, "dicom-rejected").len() < refused.len() {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let reasons: Vec<String> = audit(d, "dicom-rejected")
        .iter()
        .map(|r| r["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons.len(), refused.len(), "{reasons:?}");
    for why in [
        "peer sent no certificates",
        "UnknownIssuer",
        "does the remote support TLS",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(why)),
            "{why}: {reasons:?}"
        );
    }
    assert!(
        reasons
            .iter()
            .all(|r| r.starts_with("TLS handshake failed")),
        "{reasons:?}"
    );
    assert!(
        node.log().contains("DICOM TLS handshake with"),
        "{}",
        node.log()
    );
}

/// pydicom's `SC_rgb_jpeg.dcm`, whose meta declares explicit VR over an implicit VR data set,
/// is taken by C-STORE (mae-run dicom-send sends the data set as written; dcmtk's storescu
/// cannot read the file) and classified, with a warning naming the mismatch,
/// as `mae-run predict` classifies it.
#[test]
fn a_data_set_in_the_wrong_vr_is_classified_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = Command::new(PYTHON)
        .args([
            "-c",
            "from pydicom.data import get_testdata_file as f; print(f('SC_rgb_jpeg.dcm'))",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let file = PathBuf::from(stdout(&out).trim());
    let model = fixtures().join("binary.onnx");
    let node = Node::start(d, &model, &["--results-dir", p(&d.join("r"))]);
    let port = node.port.to_string();
    let to = format!("MAE@127.0.0.1:{port}");
    let o = mae_run(d, &["dicom-send", "--to", &to, p(&file)]);
    assert!(o.status.success(), "{}\n{}", text(&o), node.log());
    let start = Instant::now();
    while audit(d, "dicom-classified").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "{}", node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        node.log()
            .contains("but the data set is written in implicit VR"),
        "{}",
        node.log()
    );
    let predicted = mae_run(
        d,
        &[
            "predict",
            "--model",
            p(&model),
            "--format",
            "json",
            p(&file),
        ],
    );
    assert!(predicted.status.success(), "{}", text(&predicted));
    assert!(
        stderr(&predicted).contains("implicit VR"),
        "{}",
        text(&predicted)
    );
    let row: serde_json::Value = serde_json::from_str(stdout(&predicted).trim()).unwrap();
    let classified = &audit(d, "dicom-classified")[0];
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    assert_close(
        "SC_rgb_jpeg.dcm through the node",
        &floats(&classified["probabilities"]),
        &floats(&row["predictions"][0]["probabilities"]),
        SR_PROB_TOL,
    );
    assert_eq!(std::fs::read_dir(d.join("r")).unwrap().count(), 2);
}

/// DICOMweb both ways: dicomweb-client posts a study to mae-run's `POST /dicomweb/studies`
/// (STOW-RS) with one instance of a class the node does not take; the response lists the
/// images as stored and that instance as failed (0x0122), and each image's SR and Secondary
/// Capture go on by STOW-RS (`--forward-stow`) into Orthanc's DICOMweb plugin. A body of
/// another media type is answered 415, and the route needs the token when --api-keys is set.
#[test]
fn dicomweb_stow_in_and_out() {
    use sha2::Digest;
    require_python("dicomweb_client");
    assert!(
        Path::new(DICOMWEB_PLUGIN).exists(),
        "Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} is missing: run scripts/setup.sh (Debian \
         package orthanc-dicomweb)"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = fixtures().join("binary.onnx");
    let files = study(&d.join("study"));
    let (http, dicom) = (free_port(), free_port());
    let stow = format!("http://127.0.0.1:{http}/dicom-web");
    let keys = d.join("keys.txt");
    let hash = sha2::Sha256::digest(b"s3cret-token-0123456789");
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&keys, format!("{hex} pacs\n")).unwrap();
    let node = Node::start(
        d,
        &model,
        &["--forward-stow", &stow, "--api-keys", p(&keys)],
    );
    let orthanc = Orthanc::start(d, http, dicom, node.port);
    let url = format!("http://{}/dicomweb", node.http());

    // Without the token: 401, as /v2.
    let post = |auth: &str, content_type: &str, body: &[u8]| {
        let mut s = TcpStream::connect(node.http()).unwrap();
        let head = format!(
            "POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: {content_type}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp
    };
    let resp = post("", "application/dicom", b"x");
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    let auth = "Authorization: Bearer s3cret-token-0123456789\r\n";
    let resp = post(auth, "application/dicom", b"x");
    assert!(resp.starts_with("HTTP/1.1 415"), "{resp}");

    // dicomweb-client, with the token in its session.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stow.py");
    let wrapper = "import sys, requests\n\
         s = requests.Session(); s.headers['Authorization'] = 'Bearer s3cret-token-0123456789'\n\
         import dicomweb_client.api as api\n\
         orig = api.DICOMwebClient.__init__\n\
         api.DICOMwebClient.__init__ = lambda self, url: orig(self, url=url, session=s)\n\
         sys.argv = sys.argv[1:]\n\
         exec(open(sys.argv[0]).read())\n";
    let out = Command::new(PYTHON)
        .args(["-c", wrapper, script, &url])
        .args(files.iter().map(|(f, _, _)| f))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stderr(&out), node.log());
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut stored: Vec<&str> = answer["stored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    stored.sort();
    let mut want: Vec<&str> = files.iter().map(|(_, uid, _)| uid.as_str()).collect();
    want.sort();
    assert_eq!(stored, want, "{answer}");
    assert_eq!(
        answer["failed"],
        serde_json::json!([["1.2.826.0.1.3680043.8.498.99.1", 0x0122]]),
        "{}",
        node.log()
    );

    // Each image's SR and Secondary Capture reach Orthanc through its DICOMweb plugin.
    let start = Instant::now();
    while audit(d, "dicom-sent").len() < 2 * files.len() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{} of {} results sent; mae-run's log:\n{}",
            audit(d, "dicom-sent").len(),
            2 * files.len(),
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let received = audit(d, "dicom-received");
    assert_eq!(received.len(), files.len());
    assert!(received.iter().all(|r| r["via"] == "stow-rs"));
    let in_orthanc: std::collections::BTreeSet<String> =
        orthanc.sop_instance_uids().into_iter().collect();
    assert_eq!(in_orthanc.len(), 2 * files.len());
    for record in audit(d, "dicom-classified") {
        for key in ["sr_sop_instance_uid", "sc_sop_instance_uid"] {
            let uid = record[key].as_str().unwrap();
            assert!(in_orthanc.contains(uid), "{key} {uid} is not in Orthanc");
        }
    }
    for sent in audit(d, "dicom-sent") {
        assert_eq!(sent["destination"], stow.as_str());
    }
}

/// Runs `tests/fixtures/scu.py ARGS` (pynetdicom) with its standard output piped, line by line.
fn scu(args: &[&str]) -> (Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    require_python("pynetdicom");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/scu.py");
    let mut child = Command::new(PYTHON)
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// mae-run killed with SIGKILL in the middle of an incoming study, with instances answered
/// Success still waiting to be classified, and restarted on the same spool; the modality sends
/// again what was not answered Success. Every image answered Success gets exactly one SR and
/// one Secondary Capture in Orthanc (counted by SOP Instance UID), and nothing else arrives.
#[test]
fn sigkill_in_the_middle_of_a_study() {
    require_tool("Orthanc", "orthanc");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = study(&d.join("study"));
    let model = fixtures().join("binary.onnx");
    let (http, dicom) = (free_port(), free_port());
    let forward = format!("ORTHANC@127.0.0.1:{dicom}");
    let orthanc = Orthanc::start(d, http, dicom, 1);
    // Each classification waits 2 s, so instances pile up in the spool.
    let slow = [
        "--forward",
        &forward,
        "--forward-retry-first-s",
        "1",
        "--debug-delay-ms",
        "2000",
    ];
    let node = Node::start(d, &model, &slow);
    let port = node.port.to_string();
    let mut send = vec!["send", &port, "0.5"];
    send.extend(files.iter().map(|(f, _, _)| p(f)));
    let (mut sender, mut lines) = scu(&send);
    let mut stored = Vec::new();
    while stored.len() < 3 {
        let line = lines.next().expect("scu.py ended").unwrap();
        let mut w = line.split_whitespace();
        assert_eq!(w.next(), Some("OK"), "{line}\n{}", node.log());
        stored.push(w.next().unwrap().to_string());
    }
    let classified_before = audit(d, "dicom-classified").len();
    drop(node); // SIGKILL, in the middle of the association and of the spool
    assert!(
        classified_before < stored.len(),
        "every stored instance was classified before the kill: nothing was in flight"
    );
    for line in lines.map_while(Result::ok) {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("OK") => stored.push(w.next().unwrap().to_string()),
            Some("FAIL") => {}
            _ => panic!("scu.py: {line}"),
        }
    }
    let _ = sender.wait();
    assert!(stored.len() < files.len(), "the kill ended no C-STORE");

    // Restarted on the same spool; the modality sends again what was not stored.
    let node = Node::start(d, &model, &["--forward", &forward]);
    assert!(
        node.log().contains("received before the last stop"),
        "{}",
        node.log()
    );
    let again: Vec<&(PathBuf, String, String)> = files
        .iter()
        .filter(|(_, uid, _)| !stored.contains(uid))
        .collect();
    let to = format!("MAE@127.0.0.1:{}", node.port);
    let mut resend = vec!["dicom-send", "--to", &to];
    resend.extend(again.iter().map(|(f, _, _)| p(f)));
    let o = mae_run(d, &resend);
    assert!(o.status.success(), "{}", text(&o));

    let want = 2 * files.len();
    let start = Instant::now();
    let in_orthanc: Vec<String> = loop {
        let got: Vec<String> = orthanc.sop_instance_uids();
        if got.len() >= want && start.elapsed() > Duration::from_secs(2) {
            break got;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{} of {want} results in Orthanc:\n{}",
            got.len(),
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // One SR and one SC per source image, by the UIDs the audit log gives them.
    let mut expected = std::collections::BTreeSet::new();
    for r in audit(d, "dicom-classified") {
        for key in ["sr_sop_instance_uid", "sc_sop_instance_uid"] {
            expected.insert(r[key].as_str().unwrap().to_string());
        }
    }
    let sources: std::collections::BTreeSet<String> = audit(d, "dicom-classified")
        .iter()
        .map(|r| r["sop_instance_uid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sources.len(), files.len(), "every image classified");
    assert_eq!(expected.len(), want, "two result UIDs per image");
    let got: std::collections::BTreeSet<String> = in_orthanc.iter().cloned().collect();
    assert_eq!(got.len(), in_orthanc.len(), "an instance twice in Orthanc");
    assert_eq!(got, expected);
}

/// Limits: with `--dicom-max-associations 1`, a second caller is rejected transiently ("local
/// limit exceeded") while the first holds its association, and let in once it is released; an
/// association silent past `--dicom-idle-timeout-s` is aborted, with a log line that says so.
#[test]
fn the_association_limit_and_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = fixtures().join("binary.onnx");
    let node = Node::start(
        d,
        &model,
        &[
            "--results-dir",
            p(&d.join("results")),
            "--dicom-max-associations",
            "1",
            "--dicom-idle-timeout-s",
            "2",
        ],
    );
    let port = node.port.to_string();
    // The first holds its association until told to go on.
    let (mut first, mut first_lines) = scu(&["hold", &port, "stdin"]);
    assert_eq!(first_lines.next().unwrap().unwrap(), "ASSOCIATED");
    let (mut second, mut second_lines) = scu(&["hold", &port, "0"]);
    let line = second_lines.next().unwrap().unwrap();
    // Transient (2), service provider, presentation related (3), local limit exceeded (2).
    assert_eq!(line, "REJECTED 2 3 2", "{}", node.log());
    let _ = second.wait();
    first.stdin.take().unwrap().write_all(b"go on\n").unwrap();
    assert_eq!(first_lines.next().unwrap().unwrap(), "ECHO OK");
    let _ = first.wait();
    assert!(
        node.log().contains("--dicom-max-associations"),
        "{}",
        node.log()
    );
    assert_eq!(
        node.metric("mae_dicom_associations_total{result=\"rejected\"}"),
        Some(1.0)
    );

    // Silent for 4 s against a limit of 2 s: aborted, and the echo after it fails.
    let start = Instant::now();
    while node.metric("mae_dicom_associations_open") != Some(0.0) {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut idle, mut idle_lines) = scu(&["hold", &port, "4"]);
    assert_eq!(idle_lines.next().unwrap().unwrap(), "ASSOCIATED");
    assert_eq!(idle_lines.next().unwrap().unwrap(), "ECHO FAILED");
    let _ = idle.wait();
    assert!(
        node.log().contains("idle for 2s (--dicom-idle-timeout-s)"),
        "{}",
        node.log()
    );
}
