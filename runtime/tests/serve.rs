//! `mae-run serve` as deployed: the Open Inference Protocol (KServe v2) driven by Triton's
//! official Python client, bearer-token access, and the listening policy.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// Probabilities through `/v2` against `/v1` on the same file (acceptance bound of issue 17).
const SAME_PATH_TOL: f32 = 1e-6;

/// A `mae-run serve` child on a free loopback port, killed on drop.
struct Served {
    child: Child,
    addr: String,
}

impl Served {
    fn start(args: &[&str]) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mae-run"))
            .arg("serve")
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env_remove("ORT_DYLIB_PATH")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("serve exited before listening")
                .unwrap();
            if let Some(rest) = line.split("://").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Served { child, addr }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with extra header lines; returns (status, headers, body).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    parse_response(&resp)
}

fn parse_response(resp: &[u8]) -> (u16, String, Vec<u8>) {
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    let mut body = resp[split..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
    out
}

fn json_of(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

fn rows(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().flat_map(floats).collect()
}

/// Asserts that Triton's Python client is installed (requirements.txt pins it).
fn require_tritonclient() {
    let ok = Command::new(PYTHON)
        .args(["-c", "import tritonclient.http"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "tritonclient[http] is not installed in the project virtualenv ({PYTHON}); \
         run scripts/setup.sh (requirements.txt pins it)"
    );
}

/// Runs `oip_client.py` against `addr`; returns its JSON report.
fn triton_client(addr: &str, model: &str, image: &Path, token: Option<&str>) -> serde_json::Value {
    require_tritonclient();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oip_client.py");
    let tensor = fixtures().join(format!("tensor_{model}.f32"));
    let batch = reference()["tensor"][model]["batch"].to_string();
    let mut cmd = Command::new(PYTHON);
    cmd.arg(&script)
        .args([addr, model, p(image), p(&tensor), &batch]);
    if let Some(t) = token {
        cmd.arg(t);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "oip_client.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_of(&out.stdout)
}

#[test]
fn triton_client_speaks_to_serve() {
    let model = fixtures().join("multiclass.onnx");
    let image = fixtures().join("images/rgb.png");
    let s = Served::start(&["--model", p(&model)]);
    let v = triton_client(&s.addr, "multiclass", &image, None);
    assert_eq!(v["live"], true);
    assert_eq!(v["ready"], true);
    assert_eq!(v["model_ready"], true);
    assert_eq!(v["server"]["name"], "mae-run");
    let meta = &v["metadata"];
    assert_eq!(meta["name"], "multiclass");
    assert_eq!(meta["inputs"][0]["name"], "pixel_values");
    assert_eq!(meta["inputs"][0]["datatype"], "FP32");
    assert_eq!(
        meta["inputs"][0]["shape"],
        serde_json::json!([-1, 3, 32, 32])
    );
    let outs: Vec<&str> = meta["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(outs, ["logits", "probabilities"]);
    assert_eq!(meta["outputs"][1]["shape"], serde_json::json!([-1, 3]));

    // The same file through /v1/predict: the same probabilities.
    let png = std::fs::read(&image).unwrap();
    let (code, _, body) = request(
        &s.addr,
        "POST",
        "/v1/predict",
        &[("Content-Type", "image/png")],
        &png,
    );
    assert_eq!(code, 200);
    let v1 = floats(&json_of(&body)["predictions"][0]["probabilities"]);
    let d = assert_close(
        "v2 BYTES vs v1",
        &rows(&v["bytes"]["probabilities"]),
        &v1,
        SAME_PATH_TOL,
    );
    eprintln!("v2 vs v1 probabilities: max |Δ| {d:.1e}");
    assert_eq!(rows(&v["bytes"]["logits"]).len(), 3);
    let want = floats(&reference()["files"]["multiclass"]["images/rgb.png"]);
    assert_close("v2 BYTES vs PyTorch", &v1, &want, PROB_TOL);

    // FP32 pixel values: PyTorch's probabilities; only the requested output comes back.
    assert_close(
        "v2 FP32 vs PyTorch",
        &rows(&v["fp32"]["probabilities"]),
        &floats(&reference()["tensor"]["multiclass"]["probabilities"]),
        PROB_TOL,
    );
    assert_eq!(
        v["fp32"]["output_names"],
        serde_json::json!(["probabilities"])
    );
    // UINT8 images at the model's size are normalised as the client would.
    assert_close(
        "v2 UINT8 vs FP32",
        &rows(&v["uint8"]),
        &rows(&v["uint8_as_fp32"]),
        SAME_PATH_TOL,
    );
    // Classification: "score:index:label", best first.
    let cls = v["classification"].as_array().unwrap();
    assert_eq!(cls.len(), 2);
    let best = mae_models::metrics::argmax(&v1);
    let first = cls[0].as_str().unwrap();
    let names = ["cat", "dog", "bird"];
    assert!(
        first.ends_with(&format!(":{best}:{}", names[best])),
        "{first}"
    );
    assert!(
        v["unknown_model_error"]
            .as_str()
            .unwrap()
            .contains("no-such-model"),
        "{v}"
    );
}

#[test]
fn v2_errors_are_json() {
    let model = fixtures().join("multiclass.onnx");
    let s = Served::start(&["--model", p(&model), "--max-body-bytes", "10000"]);
    let infer = "/v2/models/multiclass/infer";
    let cases: [(&str, &[u8], u16, &str); 4] = [
        ("bad json", b"{", 400, "JSON"),
        (
            "bad shape",
            br#"{"inputs":[{"name":"pixel_values","datatype":"FP32","shape":[1,3,8,8],"data":[0]}]}"#,
            400,
            "elements",
        ),
        (
            "bad image",
            br#"{"inputs":[{"name":"f","datatype":"BYTES","shape":[1],"data":["AAAA"]}]}"#,
            400,
            "f[0]",
        ),
        (
            "empty batch",
            br#"{"inputs":[{"name":"pixel_values","datatype":"FP32","shape":[0,3,32,32],"data":[]}]}"#,
            400,
            "N ≥ 1",
        ),
    ];
    for (what, body, code, needle) in cases {
        let (got, _, resp) = request(&s.addr, "POST", infer, &[], body);
        assert_eq!(got, code, "{what}: {}", String::from_utf8_lossy(&resp));
        let v = json_of(&resp);
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{what}: {msg}");
        assert_eq!(v.as_object().unwrap().len(), 1, "{what}: {v}");
    }
    let zeros = vec!["0"; 3 * 32 * 32].join(",");
    let body = format!(
        r#"{{"inputs":[{{"name":"pixel_values","datatype":"FP32","shape":[1,3,32,32],
        "data":[{zeros}]}}],"outputs":[{{"name":"features"}}]}}"#
    );
    let (code, _, resp) = request(&s.addr, "POST", infer, &[], body.as_bytes());
    assert_eq!(code, 400);
    let msg = json_of(&resp)["error"].as_str().unwrap().to_string();
    assert!(msg.contains("unknown output 'features'"), "{msg}");
    let (code, _, resp) = request(&s.addr, "POST", infer, &[], &vec![b' '; 20_000]);
    assert_eq!(code, 413);
    assert!(json_of(&resp)["error"].is_string());
    let (code, _, _) = request(&s.addr, "GET", "/v2/models/multiclass/versions/7", &[], b"");
    assert_eq!(code, 404);
    // One --model: no repository, no index.
    let (code, _, resp) = request(&s.addr, "POST", "/v2/repository/index", &[], b"");
    assert_eq!(code, 404);
    assert!(json_of(&resp)["error"]
        .as_str()
        .unwrap()
        .contains("--model-repository"));
    let (_, _, resp) = request(&s.addr, "GET", "/v2", &[], b"");
    assert!(!json_of(&resp)["extensions"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("model_repository")));
    let (code, _, _) = request(&s.addr, "GET", "/v2/models/multiclass/versions/1", &[], b"");
    assert_eq!(code, 200);
    let (code, _, _) = request(&s.addr, "GET", infer, &[], b"");
    assert_eq!(code, 405);
}

/// `SHA256HEX NAME` for `token`.
fn key_line(token: &str, name: &str) -> String {
    format!(
        "{} {name}\n",
        mae_models::digest::sha256_hex(token.as_bytes())
    )
}

#[test]
fn bearer_tokens_are_required_with_api_keys() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    std::fs::write(
        &keys,
        key_line("tok-ward", "ward-7") + &key_line("tok-pacs", "pacs"),
    )
    .unwrap();
    let audit = dir.path().join("audit.jsonl");
    let model = fixtures().join("multiclass.onnx");
    let s = Served::start(&[
        "--model",
        p(&model),
        "--api-keys",
        p(&keys),
        "--audit-log",
        p(&audit),
    ]);
    let png = std::fs::read(fixtures().join("images/rgb.png")).unwrap();
    let post = |auth: Option<&str>| {
        let mut h = vec![("Content-Type", "image/png")];
        if let Some(a) = auth {
            h.push(("Authorization", a));
        }
        request(&s.addr, "POST", "/v1/predict", &h, &png)
    };
    for auth in [None, Some("Bearer tok-nope"), Some("Basic tok-pacs")] {
        let (code, head, body) = post(auth);
        assert_eq!(code, 401, "{auth:?}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{head}"
        );
        assert!(json_of(&body)["error"].as_str().unwrap().contains("token"));
    }
    let (code, _, body) = post(Some("Bearer tok-pacs"));
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    // v2 and metrics too; health probes stay open.
    for path in ["/v2/models/multiclass", "/metrics", "/v1/model"] {
        let (code, _, _) = request(&s.addr, "GET", path, &[], b"");
        assert_eq!(code, 401, "{path}");
        let (code, _, _) = request(
            &s.addr,
            "GET",
            path,
            &[("Authorization", "Bearer tok-ward")],
            b"",
        );
        assert_eq!(code, 200, "{path}");
    }
    for path in ["/healthz", "/v2/health/ready", "/v2/health/live"] {
        assert_eq!(request(&s.addr, "GET", path, &[], b"").0, 200, "{path}");
    }
    // The Triton client passes the token as a header.
    let v = triton_client(
        &s.addr,
        "multiclass",
        &fixtures().join("images/rgb.png"),
        Some("tok-ward"),
    );
    assert_eq!(v["model_ready"], true);
    // The audit log names the key and the caller; refusals are logged without a key.
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| json_of(l.as_bytes())).collect();
    let refused = lines
        .iter()
        .filter(|l| l["event"] == "unauthorized")
        .count();
    assert_eq!(refused, 3 + 3);
    let v1 = lines.iter().find(|l| l["api"] == "v1").unwrap();
    assert_eq!(v1["key"], "pacs");
    assert!(v1["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(lines
        .iter()
        .any(|l| l["api"] == "v2" && l["key"] == "ward-7"));
}

#[test]
fn non_loopback_needs_keys_or_an_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("multiclass.onnx");
    let o = mae_run(
        dir.path(),
        &["serve", "--model", p(&model), "--listen", "0.0.0.0:0"],
    );
    assert_fails_with(&o, "--api-keys");
    let bad = dir.path().join("keys.txt");
    std::fs::write(&bad, "not-a-hash someone\n").unwrap();
    let o = mae_run(
        dir.path(),
        &["serve", "--model", p(&model), "--api-keys", p(&bad)],
    );
    assert_fails_with(&o, "line 1");
    // With the opt-out it starts (and is stopped here).
    let mut child = Command::new(env!("CARGO_BIN_EXE_mae-run"))
        .args(["serve", "--model", p(&model), "--listen", "0.0.0.0:0"])
        .arg("--insecure-no-auth")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = lines.any(|l| l.is_ok_and(|l| l.contains("serving")));
    let _ = child.kill();
    let _ = child.wait();
    assert!(serving, "serve --insecure-no-auth did not start");
}

#[test]
fn model_repository_serves_each_model_with_its_own_batcher() {
    use base64ct::{Base64, Encoding};
    let repo = tempfile::tempdir().unwrap();
    for (name, version, file) in [
        ("animals", 1, "multiclass"),
        ("animals", 2, "multilabel"),
        ("pneumonia", 3, "binary"),
    ] {
        let d = repo.path().join(format!("{name}/{version}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(
            fixtures().join(format!("{file}.onnx")),
            d.join("model.onnx"),
        )
        .unwrap();
    }
    let s = Served::start(&["--model-repository", p(repo.path())]);
    let get = |path: &str| {
        let (code, _, body) = request(&s.addr, "GET", path, &[], b"");
        assert_eq!(code, 200, "{path}: {}", String::from_utf8_lossy(&body));
        json_of(&body)
    };
    let latest = get("/v2/models/animals");
    assert_eq!(latest["versions"], serde_json::json!(["1", "2"]));
    assert_eq!(latest["outputs"][1]["shape"], serde_json::json!([-1, 4]));
    let v1 = get("/v2/models/animals/versions/1");
    assert_eq!(v1["outputs"][1]["shape"], serde_json::json!([-1, 3]));
    assert_eq!(get("/v2/models/pneumonia/versions/3/ready")["ready"], true);
    let (code, _, _) = request(&s.addr, "GET", "/v2/models/pneumonia/versions/1", &[], b"");
    assert_eq!(code, 404);

    // Triton's repository index, through Triton's client: every version, READY.
    require_tritonclient();
    let script = r#"
import json, sys
import tritonclient.http as http
c = http.InferenceServerClient(sys.argv[1])
print(json.dumps({"index": c.get_model_repository_index(),
                  "extensions": c.get_server_metadata()["extensions"]}))
"#;
    let out = Command::new(PYTHON)
        .args(["-c", script, &s.addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = json_of(&out.stdout);
    let ready = |name: &str, version: &str| serde_json::json!({"name": name, "version": version, "state": "READY"});
    let index = serde_json::json!([
        ready("animals", "1"),
        ready("animals", "2"),
        ready("pneumonia", "3")
    ]);
    assert_eq!(got["index"], index);
    assert!(
        got["extensions"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("model_repository")),
        "{got}"
    );
    let (code, _, body) = request(
        &s.addr,
        "POST",
        "/v2/repository/index",
        &[],
        br#"{"ready": true}"#,
    );
    assert_eq!((code, json_of(&body)), (200, index));
    for bad in [&br#"{"ready": 1}"#[..], br#"{"model": "x"}"#, b"[1]", b"{"] {
        let (code, _, body) = request(&s.addr, "POST", "/v2/repository/index", &[], bad);
        assert_eq!(code, 400, "{}", String::from_utf8_lossy(bad));
        assert!(json_of(&body)["error"].is_string());
    }

    let png = std::fs::read(fixtures().join("images/rgb.png")).unwrap();
    let body = format!(
        r#"{{"inputs":[{{"name":"file","datatype":"BYTES","shape":[1],"data":["{}"]}}]}}"#,
        Base64::encode_string(&png)
    );
    for (path, file, classes) in [
        ("/v2/models/pneumonia/infer", "binary", 2),
        ("/v2/models/animals/versions/1/infer", "multiclass", 3),
        ("/v2/models/animals/infer", "multilabel", 4),
    ] {
        let (code, _, resp) = request(&s.addr, "POST", path, &[], body.as_bytes());
        assert_eq!(code, 200, "{path}: {}", String::from_utf8_lossy(&resp));
        let v = json_of(&resp);
        let probs = v["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == "probabilities")
            .unwrap();
        assert_eq!(probs["shape"], serde_json::json!([1, classes]));
        let want = floats(&reference()["files"][file]["images/rgb.png"]);
        assert_close(path, &floats(&probs["data"]), &want, PROB_TOL);
    }
    // /v1 picks a model with ?model=.
    let (code, _, resp) = request(
        &s.addr,
        "POST",
        "/v1/predict?model=pneumonia",
        &[("Content-Type", "image/png")],
        &png,
    );
    assert_eq!(code, 200);
    assert_eq!(
        json_of(&resp)["class_names"],
        serde_json::json!(["normal", "pneumonia"])
    );
    let (code, _, _) = request(&s.addr, "POST", "/v1/predict?model=nope", &[], &png);
    assert_eq!(code, 404);
    // Metrics carry each model's labels.
    let (_, _, text) = request(&s.addr, "GET", "/metrics", &[], b"");
    let text = String::from_utf8(text).unwrap();
    for line in [
        "mae_model_images_total{model=\"pneumonia\",version=\"3\"} 2",
        "mae_model_images_total{model=\"animals\",version=\"1\"} 1",
        "mae_model_images_total{model=\"animals\",version=\"2\"} 1",
        "mae_model_requests_total{model=\"pneumonia\",version=\"3\",code=\"200\"} 2",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}

#[test]
fn edge_bundle_runs_from_its_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/package-edge.sh");
    let bundle = dir.path().join("out/mae-edge.tar.gz");
    let model = fixtures().join("multiclass.onnx");
    let o = Command::new("bash")
        .arg(&script)
        .args(["--model", p(&model), "--out", p(&bundle)])
        .args(["--binary", env!("CARGO_BIN_EXE_mae-run")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = Command::new("tar")
        .args(["-xzf", p(&bundle), "-C", p(dir.path())])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let b = dir.path().join("mae-edge");
    for f in [
        "bin/mae-run",
        "models/multiclass.onnx",
        "mae-run.service",
        "mae-run.env",
        "SHA256SUMS",
        "INSTALL.md",
        "MODEL_CARD.md",
    ] {
        assert!(b.join(f).is_file(), "{f} missing from the bundle");
    }
    let card = std::fs::read_to_string(b.join("MODEL_CARD.md")).unwrap();
    assert!(card.starts_with("# Model card: multiclass.onnx"), "{card}");
    let o = Command::new("sha256sum")
        .args(["--quiet", "-c", "SHA256SUMS"])
        .current_dir(&b)
        .output()
        .unwrap();
    assert!(o.status.success(), "SHA256SUMS: {}", stdout(&o));
    let unit = std::fs::read_to_string(b.join("mae-run.service")).unwrap();
    for line in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ReadOnlyPaths=/opt/mae-edge",
        "--expect-sha256 ${MAE_MODEL_SHA256}",
    ] {
        assert!(unit.contains(line), "{line} missing from the unit:\n{unit}");
    }
    // Start the unit's command line with its env file, as systemd would, with the bundle in
    // place of /opt/mae-edge, a loopback port and a keys file of this test.
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, key_line("edge-token", "ward")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap()
        .replace("/opt/mae-edge", p(&b));
    let env = std::fs::read_to_string(b.join("mae-run.env"))
        .unwrap()
        .replace("/opt/mae-edge", p(&b));
    std::fs::write(dir.path().join("test.env"), env).unwrap();
    let audit = dir.path().join("audit.jsonl");
    let script = format!(
        "set -a; . ./test.env; MAE_LISTEN=127.0.0.1:0; MAE_API_KEYS={}; \
         MAE_EXTRA_ARGS='--audit-log {}'; set +a; exec {exec}",
        p(&keys),
        p(&audit)
    );
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .current_dir(dir.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = lines.find_map(|l| {
        let l = l.ok()?;
        Some(
            l.split("http://")
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_string(),
        )
    });
    std::thread::spawn(move || for _ in lines {});
    let s = Served {
        child,
        addr: addr.expect("the bundled service did not start"),
    };
    assert_eq!(request(&s.addr, "GET", "/v2/health/ready", &[], b"").0, 200);
    let png = std::fs::read(fixtures().join("images/rgb.png")).unwrap();
    let (code, _, _) = request(&s.addr, "POST", "/v1/predict", &[], &png);
    assert_eq!(code, 401);
    let (code, _, body) = request(
        &s.addr,
        "POST",
        "/v1/predict",
        &[("Authorization", "Bearer edge-token")],
        &png,
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let want = floats(&reference()["files"]["multiclass"]["images/rgb.png"]);
    assert_close(
        "bundle",
        &floats(&json_of(&body)["predictions"][0]["probabilities"]),
        &want,
        PROB_TOL,
    );
    assert!(std::fs::read_to_string(&audit)
        .unwrap()
        .contains("\"key\":\"ward\""));
}

/// Sends `head` at once, then `slow` one byte every 50 ms until the server closes the
/// connection (or 5 s pass); returns what the server answered.
fn trickle(addr: &str, head: &[u8], slow: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    s.write_all(head).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Read before each write, so that an answer is seen before the next byte could make the
    // closed socket reset.
    for b in slow.iter().cycle().take(300) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                continue;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
        if s.write_all(&[*b]).is_err() {
            break;
        }
    }
    got
}

#[test]
fn trickling_clients_do_not_block_others_and_are_cut_off() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let model = fixtures().join("multiclass.onnx");
    let s = Served::start(&[
        "--model",
        p(&model),
        "--workers",
        "1",
        // Long enough that the tricklers are still connected when the normal request and the
        // connection cap are checked, on a loaded machine too.
        "--header-timeout-ms",
        "6000",
        "--body-timeout-ms",
        "6000",
        "--max-connections",
        "3",
    ]);
    let done = Arc::new(AtomicBool::new(false));
    let tricklers: Vec<_> = [
        // The head, a byte at a time.
        (
            b"POST /v1/predict HTTP/1.1\r\n".to_vec(),
            b"X-Slow: aaaa".to_vec(),
        ),
        // A whole head, then the body a byte at a time.
        (
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".to_vec(),
            b"x".to_vec(),
        ),
    ]
    .into_iter()
    .map(|(head, slow)| {
        let (addr, done) = (s.addr.clone(), done.clone());
        std::thread::spawn(move || {
            let got = trickle(&addr, &head, &slow);
            done.store(true, Ordering::SeqCst);
            got
        })
    })
    .collect();
    std::thread::sleep(Duration::from_millis(300));
    // The one worker and the model are free for a normal client meanwhile.
    let png = std::fs::read(fixtures().join("images/rgb.png")).unwrap();
    let (code, _, _) = request(&s.addr, "POST", "/v1/predict", &[], &png);
    assert_eq!(code, 200);
    assert!(
        !done.load(Ordering::SeqCst),
        "a trickling connection ended before the normal request was answered"
    );
    // Over the connection cap (2 tricklers + 1 idle): 503.
    let idle = TcpStream::connect(&s.addr).unwrap();
    // Until the server has taken the idle connection in (on a loaded machine, later than at
    // once), well before the tricklers' timeouts.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let (code, body) = loop {
        std::thread::sleep(Duration::from_millis(100));
        let (code, _, body) = request(&s.addr, "GET", "/healthz", &[], b"");
        if code == 503 || std::time::Instant::now() > deadline {
            break (code, body);
        }
    };
    assert_eq!(code, 503, "{}", String::from_utf8_lossy(&body));
    drop(idle);
    // The tricklers are cut off: the slow head by closing, the slow body with 408.
    let answers: Vec<Vec<u8>> = tricklers.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        !String::from_utf8_lossy(&answers[0]).contains(" 200 "),
        "{:?}",
        String::from_utf8_lossy(&answers[0])
    );
    let slow_body = String::from_utf8_lossy(&answers[1]);
    assert!(slow_body.starts_with("HTTP/1.1 408"), "{slow_body:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(request(&s.addr, "GET", "/healthz", &[], b"").0, 200);
}

/// A TCP connection to `addr` from the loopback address `from` (all of 127/8 is loopback on
/// Linux), as a blocking std stream.
fn connect_from(from: &str, addr: &str) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let tcp = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        socket.connect(addr.parse().unwrap()).await.unwrap()
    });
    let tcp = tcp.into_std().unwrap();
    tcp.set_nonblocking(false).unwrap();
    tcp
}

/// One address holding many half-sent request heads takes only its own share of the
/// connections (`--max-connections-per-client`, at its default): its connections over the
/// share get 503 naming the per-client cap, and a client from another address is still served.
#[test]
fn one_address_cannot_take_every_connection() {
    let model = fixtures().join("multiclass.onnx");
    let s = Served::start(&[
        "--model",
        p(&model),
        "--max-connections",
        "48",
        "--header-timeout-ms",
        "20000",
    ]);
    let half = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..64 {
        let mut c = connect_from("127.0.0.1", &s.addr);
        c.write_all(half).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 512];
        match c.read(&mut buf) {
            Ok(n) if n > 0 => {
                let answer = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(
                    answer.starts_with("HTTP/1.1 503") && answer.contains("from this address"),
                    "{answer:?}"
                );
                refused += 1;
            }
            // Still waiting for the rest of its head: held open.
            _ => held.push(c),
        }
    }
    assert_eq!(
        (held.len(), refused),
        (32, 32),
        "the default cap is 32 per address"
    );
    // 32 of 48 connections are taken; another address gets a slot and its answer.
    let mut other = connect_from("127.0.0.2", &s.addr);
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = other.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // Once the first address closes some, it is served again.
    held.truncate(20);
    std::thread::sleep(Duration::from_millis(300));
    let mut again = connect_from("127.0.0.1", &s.addr);
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    again
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = again.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// A self-signed certificate for `localhost` and its key, as PEM files in `dir`.
fn test_certificate(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[test]
fn tls_with_a_test_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = test_certificate(dir.path());
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, key_line("tls-token", "tls-client")).unwrap();
    let model = fixtures().join("multiclass.onnx");
    let s = Served::start(&[
        "--model",
        p(&model),
        "--tls-cert",
        p(&cert),
        "--tls-key",
        p(&key),
        "--api-keys",
        p(&keys),
    ]);
    let port = s.addr.rsplit(':').next().unwrap();
    // Python's ssl module verifies the chain and the host name against the test certificate.
    let client = r#"
import json, ssl, sys, urllib.request, urllib.error
url, ca, image, token = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
out = {}
for name, headers in [("with", {"Authorization": "Bearer " + token}), ("without", {})]:
    req = urllib.request.Request(url, data=open(image, "rb").read(), headers=headers)
    try:
        with urllib.request.urlopen(req, context=ctx) as r:
            out[name] = {"status": r.status, "body": json.loads(r.read())}
    except urllib.error.HTTPError as e:
        out[name] = {"status": e.code, "body": json.loads(e.read())}
print(json.dumps(out))
"#;
    let image = fixtures().join("images/rgb.png");
    let o = Command::new(PYTHON)
        .args(["-c", client])
        .arg(format!("https://localhost:{port}/v1/predict"))
        .args([p(&cert), p(&image), "tls-token"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json_of(&o.stdout);
    assert_eq!(v["with"]["status"], 200, "{v}");
    assert_eq!(v["without"]["status"], 401, "{v}");
    let want = floats(&reference()["files"]["multiclass"]["images/rgb.png"]);
    assert_close(
        "tls",
        &floats(&v["with"]["body"]["predictions"][0]["probabilities"]),
        &want,
        PROB_TOL,
    );
    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = TcpStream::connect(&s.addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut resp = Vec::new();
    let _ = plain.read_to_end(&mut resp);
    assert!(!resp.starts_with(b"HTTP/1.1 200"));
    // A key that does not match the certificate is refused at start.
    let other = tempfile::tempdir().unwrap();
    let (_, other_key) = test_certificate(other.path());
    let o = mae_run(
        dir.path(),
        &[
            "serve",
            "--model",
            p(&model),
            "--tls-cert",
            p(&cert),
            "--tls-key",
            p(&other_key),
        ],
    );
    assert_fails_with(&o, "--tls-cert");
}
