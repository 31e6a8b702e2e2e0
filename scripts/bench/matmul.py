"""ONNX Runtime (and numpy's BLAS) on the matrix products of `runtime/examples/tract_matmul.rs`:
a one-node ONNX model, input [m, k] times a constant [k, n], best of N runs on 1 and 2 threads,
then one table with tract's figures (read from TRACT_TABLE) and the ratios, beside the CPU.

usage: matmul.py TRACT_TABLE [ITERATIONS]   (scripts/bench/matmul.sh runs both sides)
"""
import os
import re
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpuinfo import cpu  # noqa: E402

tract_rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"\| (\w+) \| (\d+)×(\d+)×(\d+) \| (\d) \| ([\d.]+) \| (\d+) \| (.*) \|", line)
    if m:
        tract_rows[(m[1], int(m[5]))] = (int(m[2]), int(m[3]), int(m[4]), float(m[6]), m[8])
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 20


def best(f):
    for _ in range(3):
        f()
    t = []
    for _ in range(iters):
        s = time.perf_counter()
        f()
        t.append(time.perf_counter() - s)
    return min(t)


def ort_time(m, k, n, threads, path):
    w = ((np.arange(k * n) % 97 - 48) / 97).astype(np.float32).reshape(k, n)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    a = np.full((m, k), 0.5, np.float32)
    return best(lambda: s.run(None, {"a": a})), w, a


model, cores, has, lacks = cpu()
print(f"CPU: {model}, {cores} cores · has {', '.join(has) or '–'} · lacks {', '.join(lacks) or '–'}")
lock = open(os.path.join(os.path.dirname(__file__), "..", "..", "Cargo.lock")).read()
tract = re.search(r'name = "tract-linalg"\nversion = "([^"]+)"', lock)
print(f"tract-linalg {tract[1] if tract else '?'}, onnxruntime {ort.__version__}, numpy {np.__version__} · "
      f"best of {iters} runs\n")
print("| product | m×k×n | threads | tract ms | ORT ms | numpy ms (BLAS, own threads) | tract / ORT | tract GFLOP/s "
      "| ORT GFLOP/s | tract kernel |")
print("|---|---|---|---|---|---|---|---|---|---|")
with tempfile.TemporaryDirectory() as d:
    for (name, threads), (m, k, n, tract_ms, kernel) in tract_rows.items():
        secs, w, a = ort_time(m, k, n, threads, os.path.join(d, f"{name}.onnx"))
        np_secs = best(lambda: a @ w)
        flop = 2 * m * k * n
        print(f"| {name} | {m}×{k}×{n} | {threads} | {tract_ms:.2f} | {secs * 1e3:.2f} | {np_secs * 1e3:.2f} | "
              f"{tract_ms / (secs * 1e3):.2f}× | {flop / tract_ms / 1e6:.0f} | {flop / secs / 1e9:.0f} | {kernel} |")
