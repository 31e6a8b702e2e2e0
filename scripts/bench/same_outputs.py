"""Runs two builds of `mae-run` on the same models and inputs and compares what they write,
byte for byte: `predict` (CSV and JSON, whose floats are the shortest forms that read back as
the same float32 bits) and `eval` (JSON), on image files, DICOM files and an `.npz` split, for
tract in fp32, int8 dynamic and int8 static and for ONNX Runtime; then `serve`'s answers to
`/v1` and `/v2` requests and the series of `/metrics` (names, labels, and the values that do
not depend on timing).

usage: same_outputs.py BIN_A BIN_B OUT   (BIN_*: folders holding mae-run and mae-export)

Models and inputs are made in OUT with the project's fixture generator and BIN_A's exporter:
the fixture models (multi-class, binary, multi-label) and a random ViT-Tiny/16 at 224 exported
as fp32, int8 dynamic and int8 static. Exits 1 if anything differs; prints a table.
"""
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
py = sys.executable
bin_a, bin_b, out = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out, exist_ok=True)
fx = os.path.join(out, "fixtures")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode not in (0, 1) or (r.returncode == 1 and not r.stderr):
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    return r


if not os.path.exists(os.path.join(fx, "data.npz")):
    run([py, os.path.join(root, "runtime/tests/fixtures/gen_models.py"), fx])
vit = os.path.join(out, "vit_tiny.pth")
if not os.path.exists(vit):
    run([py, os.path.join(root, "scripts/bench/make_vit.py"), vit, "--model", "vit_tiny_patch16"])
export = os.path.join(bin_a, "mae-export")
models = {}
for name, extra in [("vit_fp32", []), ("vit_int8", ["--int8"]),
                    ("vit_int8s", ["--int8", "--calibration-data", os.path.join(fx, "images"),
                                   "--calibration-images", "5"])]:
    path = os.path.join(out, f"{name}.onnx")
    if not os.path.exists(path):
        run([export, "--onnx", "--checkpoint", vit, "--model", "vit_tiny_patch16",
             "--output", path] + extra)
    models[name] = path
for name in ("multiclass", "binary", "multilabel"):
    models[name] = os.path.join(fx, f"{name}.onnx")

inputs = [os.path.join(fx, "images"), os.path.join(fx, "dicom"), os.path.join(fx, "data.npz")]
cases = []  # (name, argv after the binary, env)
for m in ("vit_fp32", "vit_int8", "vit_int8s", "multiclass", "binary", "multilabel"):
    backends = ["tract", "ort"] if m in ("vit_fp32", "vit_int8", "binary") else ["tract"]
    for be in backends:
        for threads in ("1", "2"):
            common = ["--model", models[m], "--backend", be, "--threads", threads]
            for fmt in ("json", "csv"):
                cases.append((f"predict {m} {be} t{threads} {fmt}",
                              ["predict"] + common + inputs + ["--split", "test", "--format", fmt]))
            cases.append((f"eval {m} {be} t{threads}",
                          ["eval"] + common + ["--data-path", inputs[2], "--split", "test",
                                               "--format", "json"]))
# tract's own graph, and the plan with a symbolic batch.
for env in ("MAE_TRACT_REWRITES=none", "MAE_TRACT_PLANS=symbolic"):
    cases.append((f"predict vit_int8 {env}",
                  ["predict", "--model", models["vit_int8"], "--threads", "2"] + inputs
                  + ["--split", "test", "--format", "json"], env))

def without_backend(text):
    """`text` as JSON with every "backend" description taken out, or None if it is not JSON."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "backend"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    try:
        return strip(json.loads(text))
    except (ValueError, TypeError):
        return None


def described_only(a, b):
    """Whether two answers differ only in the backend's description (its words, which name
    what the build does, such as the kernel path), every number the same."""
    x, y = without_backend(a), without_backend(b)
    return x is not None and x == y


results = []
bad = 0
described = 0
for case in cases:
    name, argv = case[0], case[1]
    env = dict(os.environ)
    if len(case) > 2:
        k, v = case[2].split("=")
        env[k] = v
    texts = []
    for b in (bin_a, bin_b):
        r = run([os.path.join(b, "mae-run")] + argv, env=env)
        # A refused case (a multi-label model on single labels) is compared by its message.
        texts.append((r.returncode, r.stdout or r.stderr))
    same = texts[0] == texts[1] and len(texts[0][1]) > 0
    if not same and texts[0][0] == texts[1][0] and described_only(texts[0][1], texts[1][1]):
        same, name = True, name + " (backend description differs)"
        described += 1
    bad += not same
    results.append((name + (" (refused)" if not texts[0][0] == 0 else ""), same, len(texts[0][1])))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def request(url, body=None, headers=None):
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def serve_answers(b, model, threads):
    port = free_port()
    audit = os.path.join(out, f"audit-{port}.jsonl")
    p = subprocess.Popen([os.path.join(b, "mae-run"), "serve", "--model", model, "--listen",
                          f"127.0.0.1:{port}", "--threads", threads, "--audit-log", audit],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if request(base + "/healthz")[0] == 200:
                break
        except Exception:
            time.sleep(0.1)
    answers = {}
    png = open(os.path.join(fx, "images/rgb.png"), "rb").read()
    dcm = open(os.path.join(fx, "dicom/ct16.dcm"), "rb").read()
    boundary = "XyZzy"
    multi = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"{n}\"\r\n\r\n".encode()
        + data + b"\r\n" for n, data in (("rgb.png", png), ("ct16.dcm", dcm))) + f"--{boundary}--\r\n".encode()
    answers["v1 png"] = request(base + "/v1/predict?top_k=2", png, {"Content-Type": "image/png",
                                                                    "X-Request-Id": "a"})
    answers["v1 multipart"] = request(base + "/v1/predict", multi,
                                      {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    answers["v1 bad image"] = request(base + "/v1/predict", b"not an image", {"Content-Type": "image/png"})
    answers["v1 model"] = request(base + "/v1/model")
    name = os.path.splitext(os.path.basename(model))[0]
    infer = json.dumps({"id": "x", "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                               "data": [base64.b64encode(png).decode(),
                                                        base64.b64encode(dcm).decode()]}]}).encode()
    answers["v2 infer bytes"] = request(base + f"/v2/models/{name}/infer", infer,
                                        {"Content-Type": "application/json"})
    answers["v2 model"] = request(base + f"/v2/models/{name}")
    answers["v2 server"] = request(base + "/v2")
    answers["v2 missing"] = request(base + "/v2/models/nope")
    answers["metrics"] = request(base + "/metrics")
    p.terminate()
    p.wait(timeout=60)
    return answers


def series(text):
    """The series of a /metrics text: name{labels} -> value, timing-dependent values blanked."""
    got = {}
    for line in text.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        timing = key.startswith("mae_request_duration_seconds")
        got[key] = None if timing else float(value)
    return got


for threads in ("1", "2"):
    a = serve_answers(bin_a, models["vit_fp32"], threads)
    b = serve_answers(bin_b, models["vit_fp32"], threads)
    for k in a:
        if k == "metrics":
            sa, sb = series(a[k][1]), series(b[k][1])
            same = a[k][0] == b[k][0] and sa == sb and len(sa) > 0
            detail = len(sa)
            if not same:
                print("metrics only before:", sorted(set(sa) - set(sb)))
                print("metrics only after:", sorted(set(sb) - set(sa)))
                print("metrics values:", [(k2, sa[k2], sb.get(k2)) for k2 in sa if sa[k2] != sb.get(k2)])
        else:
            same = a[k] == b[k]
            detail = len(a[k][1])
        label = f"serve t{threads} {k}"
        if not same and a[k][0] == b[k][0] and described_only(a[k][1], b[k][1]):
            same, label = True, label + " (backend description differs)"
            described += 1
        bad += not same
        results.append((label, same, detail))

width = max(len(r[0]) for r in results)
for name, same, n in results:
    print(f"{name:<{width}}  {'same' if same else 'DIFFERENT'}  ({n} bytes or series)")
print(f"{len(results) - bad} same ({described} of them apart from the backend's description), "
      f"{bad} different")
sys.exit(1 if bad else 0)
