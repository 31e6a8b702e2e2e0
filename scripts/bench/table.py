"""The runtime benchmark's table: CPU model and features, then every ratio the edge-speed goals
name, all from the JSON files of one `scripts/bench/runtime.sh` run.

usage: table.py OUT_DIR [--model NAME] [--threads N]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpuinfo import cpu  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--model", default="vit_base_patch16")
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()


def load(name):
    p = os.path.join(a.out, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None


def batch(r, b):
    if r is None:
        return None
    return next((x for x in r["batches"] if x["batch_size"] == b), None)


def f(v, unit="", digits=1):
    return "–" if v is None else f"{v:.{digits}f}{unit}"


def ratio(x, y, digits=2):
    return "–" if x is None or y is None or y == 0 else f"{x / y:.{digits}f}×"


def ms(r, b=1):
    x = batch(r, b)
    return None if x is None else x["p50_ms"] / b


def ips(r, b):
    x = batch(r, b)
    return None if x is None else x["images_per_s"]


def p99(r, b=1):
    x = batch(r, b)
    return None if x is None else x["p99_ms"]


def rss(r):
    return None if r is None or r.get("peak_rss_bytes") is None else r["peak_rss_bytes"] / 1e6


t, ti, t1 = load("tract-fp32"), load("tract-fp32-images"), load("tract-fp32-1t")
ts = load("tract-fp32-symbolic")
o, o1, q = load("ort-fp32"), load("ort-fp32-1t"), load("ort-int8")
tq, qs, tqs = load("tract-int8"), load("ort-int8s"), load("tract-int8s")
serve, serve1 = load("serve"), load("serve-1")
tqi = load("tract-int8-images")
town, town1 = load("tract-fp32-own"), load("tract-fp32-own-1t")
tqown, tqsown = load("tract-int8-own"), load("tract-int8s-own")


def round_pairs(x, y, fx=ms, fy=ms):
    """(fx(x), fy(y)) of each alternating round k = 1, 2, ... that has both files."""
    pairs, k = [], 1
    while load(f"round-{k}-{x}") and load(f"round-{k}-{y}"):
        pairs.append((fx(load(f"round-{k}-{x}")), fy(load(f"round-{k}-{y}"))))
        k += 1
    return pairs


def median_of_ratios(pairs):
    """'median R× (range A–B×)' of x / y over the rounds, or None without rounds."""
    rs = sorted(x / y for x, y in pairs if x is not None and y)
    if not rs:
        return None
    mid = len(rs) // 2
    med = rs[mid] if len(rs) % 2 else (rs[mid - 1] + rs[mid]) / 2
    return f"median {med:.2f}× (range {rs[0]:.2f}–{rs[-1]:.2f}×)"


def each(pairs):
    return ", ".join(f"{x:.0f}/{y:.0f}" for x, y in pairs if x is not None and y is not None)


rounds = round_pairs("tract", "ort")
model, cores, has, lacks = cpu()
print(f"**CPU:** {model}, {cores} cores. Has: {', '.join(has) or 'none of the listed'}. "
      f"Lacks: {', '.join(lacks) or 'none'}.\n")
if t or o:
    print(f"Model: {a.model}: fp32, int8 dynamic (activations quantised per call) and int8 static "
          f"(calibrated ranges, QDQ); {a.threads} threads unless said; p50 latency per image.\n")
    print("| measure | tract | ONNX Runtime | tract / ORT | goal |")
    print("|---|---|---|---|---|")
    print(f"| batch 1 latency, {a.threads} threads | {f(ms(t), ' ms')} | {f(ms(o), ' ms')} | {ratio(ms(t), ms(o))} | ≤ 1.3× |")
    if rounds:
        print(f"| batch 1 latency, {len(rounds)} alternating rounds (tract/ORT ms: {each(rounds)}) | – | – | "
              f"{median_of_ratios(rounds)} | ≤ 1.3× |")
    print(f"| batch 1 latency, {a.threads} threads, tract's own graph (MAE_TRACT_REWRITES=none) | {f(ms(town), ' ms')} | – | {ratio(ms(town), ms(o))} | – |")
    print(f"| batch 1 latency, 1 thread, tract's own graph | {f(ms(town1), ' ms')} | – | {ratio(ms(town1), ms(o1))} | – |")
    print(f"| batch 1 latency, {a.threads} threads, one symbolic plan (MAE_TRACT_PLANS=symbolic) | {f(ms(ts), ' ms')} | – | {ratio(ms(ts), ms(o))} | – |")
    print(f"| batch 8 throughput, one symbolic plan, images over threads | {f(ips(ts, 8), ' img/s', 2)} | – | {ratio(ips(o, 8), ips(ts, 8))} | – |")
    print(f"| batch 1 latency, 1 thread | {f(ms(t1), ' ms')} | {f(ms(o1), ' ms')} | {ratio(ms(t1), ms(o1))} | – |")
    speedup_t = None if ms(t1) is None or ms(t) is None else ms(t1) / ms(t)
    speedup_o = None if ms(o1) is None or ms(o) is None else ms(o1) / ms(o)
    print(f"| speed-up from the 2nd thread (batch 1) | {f(speedup_t, '×', 2)} | {f(speedup_o, '×', 2)} | – | – |")
    print(f"| batch 8 throughput, operators over threads | {f(ips(t, 8), ' img/s', 2)} | {f(ips(o, 8), ' img/s', 2)} | {ratio(ips(o, 8), ips(t, 8))} | – |")
    print(f"| batch 8 throughput, images over threads | {f(ips(ti, 8), ' img/s', 2)} | {f(ips(o, 8), ' img/s', 2)} | {ratio(ips(o, 8), ips(ti, 8))} | ≤ 1.1× |")
    for name, (tr, orr, own) in {"dynamic": (tq, q, tqown), "static": (tqs, qs, tqsown)}.items():
        print(f"| int8 {name}, batch 1 latency | {f(ms(tr), ' ms')} | {f(ms(orr), ' ms')} | {ratio(ms(tr), ms(orr))} | – |")
        print(f"| int8 {name}, batch 1 latency, tract's own graph | {f(ms(own), ' ms')} | – | {ratio(ms(own), ms(orr))} | – |")
        print(f"| int8 {name}, speed-up over fp32, batch 1 | {ratio(ms(t), ms(tr))} | {ratio(ms(o), ms(orr))} | – | ≥ 2× (VNNI) |")
        print(f"| int8 {name}, speed-up over fp32, batch 8 | {ratio(ips(tr, 8), ips(t, 8))} | {ratio(ips(orr, 8), ips(o, 8))} | – | ≥ 2× (VNNI) |")
        suffix = "int8" if name == "dynamic" else "int8s"
        vs_ort = round_pairs(f"tract-{suffix}", f"ort-{suffix}")
        if vs_ort:
            print(f"| int8 {name}, batch 1 latency, {len(vs_ort)} alternating rounds (tract/ORT ms: {each(vs_ort)}) "
                  f"| – | – | {median_of_ratios(vs_ort)} | – |")
            up_t = round_pairs("tract", f"tract-{suffix}")
            up_o = round_pairs("ort", f"ort-{suffix}")
            print(f"| int8 {name}, speed-up over fp32, batch 1, the same rounds (fp32/int8 ms, tract: {each(up_t)}; "
                  f"ORT: {each(up_o)}) | {median_of_ratios(up_t)} | {median_of_ratios(up_o)} | – | ≥ 2× (VNNI) |")
    print(f"| int8 dynamic, batch 8 throughput, images over threads | {f(ips(tqi, 8), ' img/s', 2)} | {f(ips(q, 8), ' img/s', 2)} | {ratio(ips(q, 8), ips(tqi, 8))} | – |")
    print(f"| peak RSS fp32 / int8 dynamic / int8 static | {f(rss(t), ' MB', 0)} / {f(rss(tq), ' MB', 0)} / {f(rss(tqs), ' MB', 0)} "
          f"| {f(rss(o), ' MB', 0)} / {f(rss(q), ' MB', 0)} / {f(rss(qs), ' MB', 0)} | – | – |")
    print(f"| peak RSS tract fp32: one-image plan / one symbolic plan | {f(rss(t), ' MB', 0)} / {f(rss(ts), ' MB', 0)} | – | – | – |")
    best = max([x for x in [ips(t, 8), ips(ti, 8)] if x is not None], default=None)
    print(f"| peak RSS int8 in tract's own graph: dynamic / static | {f(rss(tqown), ' MB', 0)} / {f(rss(tqsown), ' MB', 0)} | – | – | – |")
    if serve:
        print(f"| serve, {serve['clients']} clients (tract) | {f(serve['images_per_s'], ' img/s', 2)} | – | "
              f"{ratio(serve['images_per_s'], best)} of tract's best bench | ≥ 0.95× |")
    if serve1:
        print(f"| serve, 1 client, p99 (tract) | {f(serve1['p99_ms'], ' ms')} | – | "
              f"{ratio(serve1['p99_ms'], p99(t))} of bench p99 at batch 1 | ≤ 1.2× |")
    served = round_pairs("serve-1", "bench-b1", fx=lambda r: r["p99_ms"], fy=p99)
    if served:
        warm = [(load(f"round-{r}-serve-1") or {}).get("warmup", 0) for r in range(1, len(served) + 1)]
        after = f", each after {warm[0]} untimed requests" if warm and min(warm) == max(warm) > 0 else ""
        print(f"| serve, 1 client, p99 (tract), {len(served)} alternating rounds of serve and bench{after} "
              f"(p99 ms: {each(served)}) | – | – | {median_of_ratios(served)} of bench p99 at batch 1 | ≤ 1.2× |")


def path_rounds(name):
    """The rounds' result files of one kernel-path column (scripts/bench/kernel_paths.sh)."""
    runs, k = [], 1
    while os.path.exists(os.path.join(a.out, f"path-{k}-{name}.json")):
        runs.append(load(f"path-{k}-{name}"))
        k += 1
    return runs


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def path_ratio(x, y, fx, fy):
    """'median R× (range A–B×)' of fx(x-round) / fy(y-round) over the rounds both have."""
    return median_of_ratios([(fx(p), fy(q)) for p, q in zip(path_rounds(x), path_rounds(y))])


columns = [("avx512", "mae-run AVX-512"), ("avx-vnni", "mae-run AVX-VNNI"), ("avx2", "mae-run AVX2"),
           ("own-avx512", "tract's own, AVX-512"), ("own-avx2", "tract's own, AVX2"),
           ("ort", "ONNX Runtime")]
columns = [(c, title) for c, title in columns
           if path_rounds(f"{c}-fp32") or path_rounds(f"{c}-int8")]
if columns:
    n = len(path_rounds(f"{columns[0][0]}-int8"))
    print(f"\n### Kernel paths ({n} alternating rounds, median of the rounds; {a.threads} threads)\n")
    print("Each mae-run path forced with `MAE_KERNELS`; the AVX-VNNI and AVX2 columns, and tract's "
          "own AVX2 column, also hide the wider features from tract (`TRACT_CPU_ISA`), as on a CPU "
          "without them. AVX-VNNI's fp32 is the AVX2 path. ONNX Runtime runs the kernels it picks "
          "for this CPU.\n")
    print("| measure | " + " | ".join(title for _, title in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for kind in ["fp32", "int8"]:
        for b, what, fn, unit in [(1, "batch 1 latency", lambda r: ms(r, 1), " ms"),
                                  (8, "batch 8 throughput", lambda r: ips(r, 8), " img/s")]:
            cells = [f(median([fn(r) for r in path_rounds(f"{c}-{kind}")]), unit)
                     for c, _ in columns]
            print(f"| {kind}, {what} | " + " | ".join(cells) + " |")
    print("\n| ratio (median over the rounds, range) | value | goal |")
    print("|---|---|---|")
    lat, thr = (lambda r: ms(r, 1)), (lambda r: 1 / ips(r, 8) if ips(r, 8) else None)
    rows = [
        ("fp32 batch 1: tract's own AVX2 / mae-run AVX2", "own-avx2-fp32", "avx2-fp32", lat, "≥ 1.3×"),
        ("fp32 batch 1: tract's own AVX-512 / mae-run AVX-512", "own-avx512-fp32", "avx512-fp32", lat, "–"),
        ("int8 over fp32 on AVX2, batch 1", "avx2-fp32", "avx2-int8", lat, "≥ 1.5×"),
        ("int8 over fp32 on AVX2, batch 8", "avx2-fp32", "avx2-int8", thr, "≥ 1.5×"),
        ("int8 AVX-VNNI over fp32 AVX2, batch 1", "avx2-fp32", "avx-vnni-int8", lat, "≥ 2×"),
        ("int8 AVX-VNNI over fp32 AVX2, batch 8", "avx2-fp32", "avx-vnni-int8", thr, "≥ 2×"),
        ("int8 AVX-512 (VNNI) over fp32 AVX-512, batch 1", "avx512-fp32", "avx512-int8", lat, "–"),
        ("fp32 batch 1: mae-run AVX2 / ONNX Runtime", "avx2-fp32", "ort-fp32", lat, "–"),
        ("fp32 batch 1: mae-run AVX-512 / ONNX Runtime", "avx512-fp32", "ort-fp32", lat, "–"),
        ("int8 batch 1: mae-run AVX-VNNI / ONNX Runtime", "avx-vnni-int8", "ort-int8", lat, "–"),
        ("int8 batch 1: mae-run AVX2 / ONNX Runtime", "avx2-int8", "ort-int8", lat, "–"),
    ]
    for what, x, y, fn, goal in rows:
        if path_rounds(x) and path_rounds(y):
            print(f"| {what} | {path_ratio(x, y, fn, fn)} | {goal} |")
