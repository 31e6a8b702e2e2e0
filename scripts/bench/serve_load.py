"""Load test of `mae-run serve`: N concurrent clients POST the same PNG to /v1/predict for a
fixed time, or until they have sent a number of requests between them; prints throughput and
latency percentiles as JSON.

usage: serve_load.py URL IMAGE.png [--clients 8] [--seconds 30 | --requests N] [--warmup W]

--warmup sends W requests one after another before the clock starts, untimed, as
`mae-run bench --warmup` runs untimed passes first: the first requests after an idle spell (or
after another process has filled the caches) pay for waking the server's threads and memory.
"""
import argparse
import json
import threading
import time
import urllib.request

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("url")
ap.add_argument("image")
ap.add_argument("--clients", type=int, default=8)
ap.add_argument("--seconds", type=float, default=30)
ap.add_argument("--requests", type=int, help="stop after this many requests in all (not --seconds)")
ap.add_argument("--warmup", type=int, default=0, help="untimed requests first, one at a time")
a = ap.parse_args()
body = open(a.image, "rb").read()


def send():
    """One request; whether it was answered with 200."""
    req = urllib.request.Request(a.url, data=body, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status == 200
    except Exception:
        return False


for _ in range(a.warmup):
    if not send():
        raise SystemExit(f"serve_load.py: a warm-up request to {a.url} failed")
lat, errors, sent = [], [0], [0]
lock = threading.Lock()
stop = float("inf") if a.requests else time.perf_counter() + a.seconds


def take():
    """Whether this client sends another request (under --requests, one of those left)."""
    if time.perf_counter() >= stop:
        return False
    if a.requests is None:
        return True
    with lock:
        if sent[0] >= a.requests:
            return False
        sent[0] += 1
        return True


def client():
    while take():
        t = time.perf_counter()
        ok = send()
        dt = (time.perf_counter() - t) * 1e3
        with lock:
            if ok:
                lat.append(dt)
            else:
                errors[0] += 1


t0 = time.perf_counter()
threads = [threading.Thread(target=client) for _ in range(a.clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.perf_counter() - t0
lat = np.array(lat) if lat else np.array([float("nan")])
print(json.dumps({"clients": a.clients, "warmup": a.warmup, "seconds": elapsed,
                  "requests": int(len(lat)),
                  "errors": errors[0], "images_per_s": len(lat) / elapsed,
                  "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                  "p99_ms": float(np.percentile(lat, 99))}))
