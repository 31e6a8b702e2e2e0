"""ONNX Runtime's own Python InferenceSession on an ONNX file: the reference figures that
`mae-run bench --backend ort` is compared with (same file, same threads, same batch sizes).

usage: ort_python.py MODEL.onnx [--threads 2] [--batch-size 1,8] [--iterations 20] [--warmup 3]
Prints one JSON object.
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--batch-size", default="1,8")
ap.add_argument("--iterations", type=int, default=20)
ap.add_argument("--warmup", type=int, default=3)
a = ap.parse_args()

so = ort.SessionOptions()
so.intra_op_num_threads = a.threads
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
t0 = time.perf_counter()
sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
load_ms = (time.perf_counter() - t0) * 1e3
inp = sess.get_inputs()[0]
_, c, h, w = inp.shape
rng = np.random.default_rng(0)
out = {"runtime": f"onnxruntime {ort.__version__} (Python)", "threads": a.threads,
       "load_ms": load_ms, "batches": []}
for b in [int(x) for x in a.batch_size.split(",")]:
    x = rng.standard_normal((b, c, h, w), dtype=np.float32)
    for _ in range(a.warmup):
        sess.run(None, {inp.name: x})
    times = []
    for _ in range(a.iterations):
        t = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append((time.perf_counter() - t) * 1e3)
    times = np.array(times)
    p50 = float(np.percentile(times, 50))
    out["batches"].append({"batch_size": b, "p50_ms": p50, "p95_ms": float(np.percentile(times, 95)),
                           "p99_ms": float(np.percentile(times, 99)), "ms_per_image": p50 / b,
                           "images_per_s": 1e3 * b / p50})
print(json.dumps(out))
