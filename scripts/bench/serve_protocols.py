"""Load test of `mae-run serve` through /v1/predict and the Open Inference Protocol's
/v2/models/{name}/infer with persistent HTTP/1.1 connections (HTTPS with --cafile): N clients
send the same image file for a fixed time; prints requests/s and latency percentiles as JSON.

usage: serve_protocols.py BASE_URL MODEL IMAGE --api v1|v2 [--clients 8] [--seconds 10]
                          [--token T] [--cafile CERT.pem]

/v2 requests carry the file as a BYTES tensor in the binary tensor data extension (what Triton's
client sends by default) and ask for binary outputs.
"""
import argparse
import http.client
import json
import ssl
import struct
import threading
import time
import urllib.parse

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("model")
ap.add_argument("image")
ap.add_argument("--api", choices=["v1", "v2"], required=True)
ap.add_argument("--clients", type=int, default=8)
ap.add_argument("--seconds", type=float, default=10)
ap.add_argument("--token")
ap.add_argument("--cafile")
a = ap.parse_args()

url = urllib.parse.urlsplit(a.base)
data = open(a.image, "rb").read()
headers = {}
if a.token:
    headers["Authorization"] = f"Bearer {a.token}"
if a.api == "v1":
    path, body = "/v1/predict", data
    headers["Content-Type"] = "image/png"
else:
    path = f"/v2/models/{a.model}/infer"
    raw = struct.pack("<I", len(data)) + data
    head = json.dumps({
        "inputs": [{"name": "image_file", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    body = head + raw
    headers["Inference-Header-Content-Length"] = str(len(head))
    headers["Content-Type"] = "application/octet-stream"
ctx = ssl.create_default_context(cafile=a.cafile) if url.scheme == "https" else None


def connect():
    if ctx is not None:
        return http.client.HTTPSConnection(url.hostname, url.port, context=ctx, timeout=120)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=120)


lat, errors = [], [0]
lock = threading.Lock()
start_at = time.perf_counter() + 0.5
stop = start_at + a.seconds


def client():
    conn = connect()
    # Open the connection (and the TLS session) before the clock starts.
    conn.connect()
    while time.perf_counter() < start_at:
        time.sleep(0.001)
    while time.perf_counter() < stop:
        t = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            ok = r.status == 200
        except Exception:
            ok = False
            conn.close()
            conn = connect()
        dt = (time.perf_counter() - t) * 1e3
        with lock:
            if ok:
                lat.append(dt)
            else:
                errors[0] += 1


threads = [threading.Thread(target=client) for _ in range(a.clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.perf_counter() - start_at
arr = np.array(lat) if lat else np.array([float("nan")])
print(json.dumps({"api": a.api, "scheme": url.scheme, "auth": bool(a.token),
                  "clients": a.clients, "seconds": round(elapsed, 2), "requests": len(lat),
                  "errors": errors[0], "requests_per_s": round(len(lat) / elapsed, 1),
                  "p50_ms": round(float(np.percentile(arr, 50)), 2),
                  "p95_ms": round(float(np.percentile(arr, 95)), 2)}))
