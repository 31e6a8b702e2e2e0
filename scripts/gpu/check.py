"""The six steps of scripts/gpu/check.sh, each under its own time budget, recorded in one JSON
file and a Markdown table. check.sh sets up the environment (libraries, binaries, data) and
runs this with the standard library only, so that it runs on any Python 3.9+.

usage: check.py --out DIR --bin DIR --python PY [--data NPZ] [--dry-run] [--ort-gpu DIR]
                [--ort-cpu LIB] [--budgets 20,110,85,165,80,90] [--deadline 560]

Every step records a status: `ok`, `failed: <why>`, `timeout: <what>` or `unsupported: <why>`.
The JSON is rewritten (atomically) after each step, so a run cut short still leaves every
finished step in $OUT; `complete` turns true at the end.
"""
import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "reference.py")
STEPS = ["info", "finetune_throughput", "pretrain_throughput", "short_finetune", "launch_nccl",
         "mae_run_cuda"]
# Caps in seconds on the GPU (the whole check must stay under the device's 10 minutes per
# call) and in the dry run (a few minutes on a 2-core CPU with debug binaries).
GPU_BUDGETS = [20, 110, 85, 165, 80, 90]
DRY_BUDGETS = [45, 100, 100, 150, 90, 60]
# Figures measured on an H200 with PyTorch 2.11 (the issue's anchors), for the table.
ANCHORS_H200 = {
    "finetune_vit_base_patch16_b128": {"eager-bf16": 2475, "compile-bf16": 3318,
                                       "seed (fp16, unfused attention)": 1710},
    "pretrain_mae_vit_base_patch16_b256": {"eager-bf16": 3241},
    "pretrain_mae_vit_large_patch16_b128": {"eager-bf16": 1573},
}


class Timeout(Exception):
    """A command ran out of time; `lines` holds what it printed before it was stopped."""

    def __init__(self, msg, lines=()):
        super().__init__(msg)
        self.lines = list(lines)


class Check:
    def __init__(self, a):
        self.a = a
        self.out = a.out
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        # Checkpoints, ONNX files and data stay out of $OUT, which the device tool sends back.
        self.work = a.work or os.path.join(
            "/tmp" if not a.dry_run else self.out, "mae-gpu-check-work")
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.started = time.monotonic()
        self.deadline = self.started + a.deadline
        self.step_deadline = self.deadline
        self.device = "cpu" if a.dry_run else "cuda"
        self.missing = []
        self.result = {
            "schema": 1,
            "mode": "dry-run" if a.dry_run else "gpu",
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "complete": False,
            "host": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
            "binaries": a.bin,
            "work": None,
            "data": a.data,
            "steps": [],
            "missing": self.missing,
        }
        self.ncmd = 0
        self.helps = {}
        self.result["work"] = self.work

    # -- running commands -------------------------------------------------------------------
    def left(self):
        return min(self.step_deadline, self.deadline) - time.monotonic()

    def run(self, name, argv, cap=None, env=None):
        """Runs argv with its output in logs/; returns (rc, stdout lines with the monotonic
        time each arrived, stderr tail). Raises Timeout when the step's time runs out."""
        self.ncmd += 1
        start = time.monotonic()
        limit = self.left() if cap is None else min(cap, self.left())
        if limit < 1:
            raise Timeout(f"no time left for {name}")
        log = os.path.join(self.logs, f"{self.ncmd:02d}-{name}.log")
        lines = []
        with open(log, "w") as f:
            f.write("$ " + " ".join(argv) + "\n")
            f.flush()
            try:
                p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=f, text=True,
                                     start_new_session=True, env=env, cwd=self.work)
            except OSError as e:
                return 127, [], f"cannot start {argv[0]}: {e}"

            def pump():
                for line in p.stdout:
                    lines.append((time.monotonic(), line.rstrip("\n")))

            t = threading.Thread(target=pump, daemon=True)
            t.start()
            try:
                rc = p.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                kill_group(p)
                t.join(5)
                with open(log, "a") as g:
                    g.write(f"\n[check] killed after {limit:.0f}s\n")
                raise Timeout(f"{name} ran past {limit:.0f}s", lines) from None
            t.join(10)
        with open(log) as f:
            stderr = f.read().split("\n", 1)[-1]
        stdout = "\n".join(x for _, x in lines)
        with open(log, "a") as f:
            f.write("[stdout]\n" + stdout + "\n")
        tail = (stderr.strip() or stdout)[-2000:]
        secs = time.monotonic() - start
        with open(log, "a") as f:
            f.write(f"[check] rc {rc} in {secs:.1f}s\n")
        print(f"[check]   {name}: rc {rc} in {secs:.1f}s, log {os.path.relpath(log, self.out)}",
              flush=True)
        return rc, lines, tail

    def run_ok(self, name, argv, cap=None):
        rc, lines, tail = self.run(name, argv, cap)
        if rc != 0:
            raise StepFailed(f"{name} exited {rc}: {last_error(tail)}")
        return [x for _, x in lines]

    def python_json(self, name, args, cap=None):
        out = self.run_ok(name, [self.a.python, REFERENCE] + args, cap)
        for line in reversed(out):
            if line.startswith("{"):
                return json.loads(line)
        raise StepFailed(f"{name} printed no JSON")

    def bin(self, name):
        return os.path.join(self.a.bin, name)

    def help_has(self, argv, flag):
        key = " ".join(argv)
        if key not in self.helps:
            rc, lines, _ = self.run("help", argv + ["--help"], cap=30)
            self.helps[key] = "\n".join(x for _, x in lines) if rc == 0 else ""
        return flag in self.helps[key]

    # -- bookkeeping ------------------------------------------------------------------------
    def note_missing(self, what):
        if what not in self.missing:
            self.missing.append(what)

    def save(self):
        self.result["seconds"] = round(time.monotonic() - self.started, 1)
        write_atomic(os.path.join(self.out, "check.json"), json.dumps(self.result, indent=2) + "\n")
        write_atomic(os.path.join(self.out, "check.md"), table(self.result))

    def step(self, n, fn, budget, *args):
        """Runs fn(self, rec, *args), which fills rec in place, so that what a step measured
        before it failed or ran out of time is kept."""
        name = STEPS[n - 1]
        print(f"[check] step {n}: {name} (budget {budget:.0f}s)", flush=True)
        rec = {"n": n, "name": name, "budget_s": budget}
        t = time.monotonic()
        self.step_deadline = t + budget
        try:
            fn(self, rec, *args)
            rec.setdefault("status", "ok")
        except Timeout as e:
            rec["status"] = f"timeout: {e}"
        except StepFailed as e:
            rec["status"] = f"failed: {e}"
        except Exception as e:  # noqa: BLE001 - a step's bug must not lose the other steps
            rec["status"] = f"failed: {type(e).__name__}: {e}"
        rec["seconds"] = round(time.monotonic() - t, 1)
        self.result["steps"].append(rec)
        self.save()
        print(f"[check] step {n}: {rec['status']} in {rec['seconds']}s", flush=True)
        return rec


class StepFailed(Exception):
    pass


def kill_group(p):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def last_error(tail):
    lines = [x for x in tail.strip().splitlines() if x.strip()]
    for x in reversed(lines):
        if "error" in x.lower() or "Error" in x:
            return x.strip()[:300]
    return lines[-1].strip()[:300] if lines else "no output"


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def ratio(a, b):
    return round(a / b, 3) if finite(a) and finite(b) and b > 0 else None


# -- steps ----------------------------------------------------------------------------------
def step_info(c, rec):
    lines = c.run_ok("mae-train-info", [c.bin("mae-train"), "info"])
    info = {}
    for x in lines:
        if ":" in x:
            k, v = x.split(":", 1)
            info[k.strip().replace(" ", "_")] = v.strip()
        elif x.startswith("mae-train "):
            info["version"] = x.split()[1]
    rec["mae_train"] = info
    rec["torch"] = c.python_json("torch-info", ["info"])
    for tool in ("mae-run", "mae-export"):
        rc, out, _ = c.run(f"{tool}-version", [c.bin(tool), "--version"], cap=20)
        rec.setdefault("versions", {})[tool] = out[0][1] if rc == 0 and out else f"rc {rc}"
    # mae-train info prints availability only; the rest comes from the device's PyTorch.
    for what in ("GPU name", "CUDA version", "cuDNN version", "bf16 support"):
        c.note_missing(f"mae-train info: no {what} (taken from PyTorch on the same machine)")
    t = rec["torch"]
    rec["summary"] = {
        "gpu": t.get("gpu_name"), "cuda": t.get("cuda_version"), "cudnn": t.get("cudnn_version"),
        "bf16": t.get("bf16_supported"),
        "mae_train_sees_cuda": info.get("cuda_available") == "true",
    }
    if not c.a.dry_run and info.get("cuda_available") != "true":
        rec["status"] = ("failed: mae-train sees no CUDA (is LD_LIBRARY_PATH on the device's "
                         "torch/lib, and libtorch_cuda.so linked?)")


BENCH_LINE = re.compile(r", (\w+): ([\d.]+) ms/step, ([\d.]+) img/s")


def trainer_bench(c, name, model, depth, batch, steps, warmup, cap):
    argv = [c.bin("mae-train"), "bench", "--model", model, "--batch-size", str(batch),
            "--steps", str(steps), "--warmup", str(warmup), "--device", c.device]
    if depth:
        argv += ["--depth", str(depth)]
    if c.help_has([c.bin("mae-train"), "bench"], "--precision"):
        # bf16 is the goal's precision; the CPU of a dry run has no fast bf16 kernels.
        argv += ["--precision", "fp32" if c.a.dry_run else "bf16"]
    else:
        c.note_missing("mae-train bench: no --precision flag (it times fp32 steps only; the "
                       "bf16 comparison needs `--precision bf16`)")
    lines = c.run_ok(name, argv, cap)
    for x in lines:
        m = BENCH_LINE.search(x)
        if m:
            return {"precision": m.group(1), "ms_per_step": float(m.group(2)),
                    "images_per_s": float(m.group(3)), "line": x}
    raise StepFailed(f"{name}: no '... ms/step, ... img/s' line in its output")


def trainer_or_failure(c, *args, **kw):
    """The trainer's figure, or its failure recorded, so that PyTorch's figures still come."""
    try:
        return trainer_bench(c, *args, **kw)
    except StepFailed as e:
        return {"status": f"failed: {e}"}


def torch_bench(c, name, kind, model, depth, batch, steps, warmup, modes):
    """PyTorch's figures for each mode; when time runs out, the modes that finished are kept
    and the rest recorded as `timeout` (the step then ends as a timeout)."""
    args = [kind, "--model", model, "--batch-size", str(batch), "--steps", str(steps),
            "--warmup", str(warmup), "--modes", ",".join(modes), "--device", c.device]
    if depth:
        args += ["--depth", str(depth)]
    if c.a.dry_run:
        # inductor's C++ build takes minutes on a small CPU; the dry run checks the plumbing.
        args += ["--compile-backend", "aot_eager"]
    try:
        rc, lines, tail = c.run(name, [c.a.python, REFERENCE] + args)
    except Timeout as e:
        done = {}
        for _, x in e.lines:
            if x.startswith('{"partial_mode"'):
                d = json.loads(x)
                done[d["partial_mode"]] = d["result"]
        e.partial = {"modes": {m: done.get(m, {"status": f"timeout: {e}"}) for m in modes}}
        raise
    if rc != 0:
        raise StepFailed(f"{name} exited {rc}: {last_error(tail)}")
    for _, x in reversed(lines):
        if x.startswith("{") and '"modes"' in x:
            return json.loads(x)
    raise StepFailed(f"{name} printed no result")


def compare(trainer, ref):
    """Ratios of the trainer's img/s to each PyTorch mode, and of compiled to eager."""
    modes = ref.get("modes", {})
    ips = {m: r.get("images_per_s") for m, r in modes.items() if r.get("status") == "ok"}
    t = trainer.get("images_per_s")
    out = {f"trainer_vs_{m}": ratio(t, v) for m, v in ips.items()}
    same = f"eager-{trainer.get('precision')}"
    out["trainer_vs_eager_same_precision"] = ratio(t, ips.get(same))
    out["compile_vs_eager_bf16"] = ratio(ips.get("compile-bf16"), ips.get("eager-bf16"))
    return out


def step_finetune_throughput(c, rec):
    if c.a.dry_run:
        model, depth, batch, steps, warmup = "vit_tiny_patch4_28", 2, 8, 2, 1
    else:
        model, depth, batch, steps, warmup = "vit_base_patch16", None, 128, 20, 3
    rec.update(model=model, depth=depth, batch_size=batch, steps=steps)
    rec["trainer"] = trainer_or_failure(c, "trainer-bench", model, depth, batch, steps,
                                        warmup, cap=max(20.0, c.left() * 0.35))
    try:
        rec["torch"] = torch_bench(c, "torch-finetune", "finetune", model, depth, batch, steps,
                                   warmup, ["eager-bf16", "eager-fp32", "compile-bf16"])
    except Timeout as e:
        rec["torch"] = e.partial
        rec["ratios"] = compare(rec["trainer"], rec["torch"])
        raise
    rec["ratios"] = compare(rec["trainer"], rec["torch"])
    prec = rec["trainer"].get("precision")
    goal = rec["ratios"].get("trainer_vs_eager-bf16")
    rec["goal_ge_1x_eager_bf16"] = (goal >= 1.0 if prec == "bf16" and goal is not None
                                    else f"not comparable: the trainer ran {prec}")
    if not c.a.dry_run:
        rec["anchors_h200"] = ANCHORS_H200["finetune_vit_base_patch16_b128"]
    bad = [m for m, r in rec["torch"]["modes"].items() if r.get("status") != "ok"]
    if "status" in rec["trainer"]:
        rec["status"] = f"failed: mae-train bench: {rec['trainer']['status']}"
    elif bad:
        rec["status"] = "failed: PyTorch " + ", ".join(
            f"{m} ({rec['torch']['modes'][m]['status']})" for m in bad)


def step_pretrain_throughput(c, rec):
    if c.a.dry_run:
        cases = [("mae_vit_tiny_patch4_28", 2, 8), ("mae_vit_tiny_patch4_28", 1, 4)]
        steps, warmup = 2, 1
    else:
        cases = [("mae_vit_base_patch16", None, 256), ("mae_vit_large_patch16", None, 128)]
        steps, warmup = 15, 3
    rec["cases"] = []
    for i, (model, depth, batch) in enumerate(cases):
        case = {"model": model, "depth": depth, "batch_size": batch, "steps": steps}
        rec["cases"].append(case)
        share = c.left() / (2 * (len(cases) - i))
        case["trainer"] = trainer_or_failure(c, f"trainer-bench-{model}", model, depth, batch,
                                             steps, warmup, cap=max(15.0, share))
        try:
            case["torch"] = torch_bench(c, f"torch-{model}", "pretrain", model, depth, batch,
                                        steps, warmup, ["eager-bf16", "eager-fp32"])
        except Timeout as e:
            case["torch"] = e.partial
            case["ratios"] = compare(case["trainer"], case["torch"])
            raise
        case["ratios"] = compare(case["trainer"], case["torch"])
        key = f"pretrain_{model}_b{batch}"
        if key in ANCHORS_H200 and not c.a.dry_run:
            case["anchors_h200"] = ANCHORS_H200[key]
    bad = [f"{k['model']} {m}" for k in rec["cases"] for m, r in k["torch"]["modes"].items()
           if r.get("status") != "ok"]
    bad_trainer = [k["model"] for k in rec["cases"] if "status" in k["trainer"]]
    if bad_trainer:
        rec["status"] = "failed: mae-train bench " + ", ".join(bad_trainer)
    elif bad:
        rec["status"] = "failed: PyTorch " + ", ".join(bad)


def finetune_args(c, out_dir, precision):
    if c.a.dry_run:
        model = ["--model", "vit_tiny_patch4_28", "--depth", "2", "--batch-size", "16",
                 "--lr", "1e-3", "--num-workers", "2"]
    else:
        model = ["--model", "vit_base_patch16", "--input-size", "224", "--batch-size", "128",
                 "--lr", "1e-4", "--num-workers", str(max(2, min(12, (os.cpu_count() or 4) - 2)))]
    return ["finetune", "--data-path", c.a.data, "--output-dir", out_dir, "--epochs", "2",
            "--warmup-epochs", "0.2", "--layer-decay", "1.0", "--drop-path", "0.1",
            "--min-crop-scale", "0.6", "--aa", "none", "--mixup", "0", "--cutmix", "0",
            "--reprob", "0", "--smoothing", "0.1", "--balance-classes", "--clip-grad", "1.0",
            "--keep-checkpoints", "1", "--seed", "0", "--device", c.device,
            "--precision", precision] + model


def read_log(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(x) for x in f if x.strip()]
    return rows


def epoch_times(lines):
    """Monotonic arrival times of the `epoch N:` lines."""
    return [t for t, x in lines if re.match(r"epoch \d+:", x)]


def short_run(c, tag, precision, launch=False):
    out_dir = os.path.join(c.work, f"ft-{tag}")
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = [c.bin("mae-train")]
    if launch:
        backend = "gloo" if c.a.dry_run else "nccl"
        argv += ["launch", "--nproc-per-node", "1", "--"]
    argv += finetune_args(c, out_dir, precision)
    if launch:
        argv += ["--dist-backend", backend]
    t = time.monotonic()
    rc, lines, tail = c.run(f"finetune-{tag}", argv)
    run = {"precision": precision, "wall_s": round(time.monotonic() - t, 1), "output": out_dir}
    if launch:
        run["dist_backend"] = backend
    ts = epoch_times(lines)
    run["epoch_line_s"] = [round(b - a, 2) for a, b in zip([t] + ts, ts)]
    log = read_log(os.path.join(out_dir, "log.txt"))
    run["train_loss"] = [r.get("train_loss") for r in log]
    run["val_auc"] = [r.get("test_auc") for r in log]
    if rc != 0:
        run["status"] = f"failed: finetune exited {rc}: {last_error(tail)}"
    return run


def check_losses(run):
    losses = run["train_loss"]
    if len(losses) < 2:
        return f"{len(losses)} epochs logged, 2 expected"
    if not all(finite(x) for x in losses):
        return f"non-finite train loss {losses}"
    if not losses[-1] < losses[0]:
        return f"train loss did not fall: {losses}"
    return None


def step_short_finetune(c, rec):
    rec.update(data=c.a.data, runs={})
    problems = []
    for precision in ("bf16", "fp16"):
        run = short_run(c, precision, precision)
        rec["runs"][precision] = run
        if run.get("status"):
            problems.append(f"{precision}: {run['status']}")
            continue
        bad = check_losses(run)
        best = os.path.join(run["output"], "checkpoint-best.safetensors")
        metrics = os.path.join(run["output"], "test-metrics.json")
        rc, _, tail = c.run(f"eval-{precision}", [
            c.bin("mae-train"), "eval", "--resume", best, "--data-path", c.a.data, "--split",
            "test", "--device", c.device, "--output", metrics])
        if rc == 0 and os.path.exists(metrics):
            with open(metrics) as f:
                m = json.load(f)
            run["test"] = {k: m.get(k) for k in ("acc1", "auc", "loss", "n") if k in m}
            auc = m.get("auc")
            if not (finite(auc) and 0.0 <= auc <= 1.0):
                bad = bad or f"test AUC {auc} not in [0, 1]"
        else:
            bad = bad or f"eval exited {rc}: {last_error(tail)}"
        run["status"] = f"failed: {bad}" if bad else "ok"
        if bad:
            problems.append(f"{precision}: {bad}")
    if problems:
        rec["status"] = "failed: " + "; ".join(problems)


def step_launch_nccl(c, rec, plain):
    """The bf16 run of step 4 again under `launch --nproc-per-node 1` with NCCL (Gloo in the
    dry run); the second epoch's interval (train + validation + checkpoint) is compared."""
    run = short_run(c, "launch", "bf16", launch=True)
    rec["launch"] = run
    rec["plain"] = {k: plain.get(k) for k in ("wall_s", "epoch_line_s", "train_loss")}
    c.note_missing("mae-train finetune: no per-step time in its output (step 5 compares the "
                   "second epoch's interval between `epoch N:` lines instead)")
    if run.get("status"):
        rec["status"] = run["status"]
        return
    p, l_ = plain.get("epoch_line_s") or [], run["epoch_line_s"]
    if len(p) < 2 or len(l_) < 2:
        rec["status"] = "failed: fewer than 2 epoch lines to compare"
        return
    rec["epoch1_s"] = {"plain": p[1], "launch": l_[1]}
    rec["launch_vs_plain"] = ratio(l_[1], p[1])
    rec["within_3pct"] = rec["launch_vs_plain"] is not None and rec["launch_vs_plain"] <= 1.03
    bad = check_losses(run)
    if bad:
        rec["status"] = f"failed: {bad}"


def find_ort_gpu(c):
    for d in [c.a.ort_gpu, "/tmp/ortg/onnxruntime/capi"]:
        if d and os.path.exists(os.path.join(d, "libonnxruntime_providers_cuda.so")):
            libs = sorted(x for x in os.listdir(d) if x.startswith("libonnxruntime.so"))
            if libs:
                return os.path.join(d, libs[-1])
    return None


def mae_run_bench(c, name, model, backend, device, batches, iters, lib):
    out = os.path.join(c.work, f"{name}.json")
    argv = [c.bin("mae-run"), "bench", "--model", model, "--backend", backend, "--device",
            device, "--batch-size", batches, "--iterations", str(iters), "--warmup", "3",
            "--format", "json", "--output", out]
    if lib:
        argv += ["--ort-lib", lib]
    c.run_ok(name, argv)
    with open(out) as f:
        r = json.load(f)
    return {"backend": r.get("backend"), "load_ms": r.get("load_ms"),
            "batches": [{k: b[k] for k in ("batch_size", "mean_ms", "p50_ms", "images_per_s")}
                        for b in r.get("batches", [])]}


def bench_ratios(ours, theirs):
    t = {b["batch_size"]: b["images_per_s"] for b in theirs.get("batches", [])}
    return {str(b["batch_size"]): ratio(b["images_per_s"], t.get(b["batch_size"]))
            for b in ours.get("batches", [])}


def step_mae_run(c, rec, finetuned):
    gpu_lib = find_ort_gpu(c)
    cuda = bool(gpu_lib) and not c.a.dry_run
    rec["cuda_provider"] = gpu_lib if gpu_lib else "unsupported: no CUDA provider"
    if c.a.dry_run and gpu_lib:
        rec["cuda_provider"] += " (not used in the dry run)"
    lib = gpu_lib if cuda else c.a.ort_cpu
    rec["ort_lib"] = lib
    rec["device"] = "cuda" if cuda else "cpu"
    # 1. the model: step 4's checkpoint, else random weights in the upstream layout.
    ckpt, model_flag = finetuned, []
    if not (ckpt and os.path.exists(ckpt)):
        model = "vit_tiny_patch4_28" if c.a.dry_run else "vit_base_patch16"
        ckpt = os.path.join(c.work, f"{model}-random.pth")
        args = ["make-vit", ckpt, "--model", model]
        if c.a.dry_run:
            args += ["--depth", "2"]
        c.python_json("make-vit", args)
        model_flag = ["--model", model] + (["--depth", "2"] if c.a.dry_run else [])
        rec["weights"] = "random (step 4 left no checkpoint)"
    else:
        rec["weights"] = ckpt
    onnx = {}
    for prec in ("fp32", "fp16"):
        path = os.path.join(c.work, f"model.{prec}.onnx")
        extra = ["--fp16"] if prec == "fp16" else []
        c.run_ok(f"export-{prec}", [c.bin("mae-export"), "--onnx", "--checkpoint", ckpt,
                                    "--output", path] + model_flag + extra)
        onnx[prec] = path
    rec["exports"] = {k: os.path.getsize(v) for k, v in onnx.items()}
    # 2. bench: mae-run on ONNX Runtime beside ORT's own Python session, same file and card.
    if cuda:
        device, batches, iters = "cuda", "1,64,256", 20
    else:
        device, batches, iters = "cpu", ("1,8" if not c.a.dry_run else "1,4"), 5
        rec["note"] = "no CUDA provider: ONNX Runtime's CPU provider stands in for the CUDA figures"
    rec["bench"] = {}
    env_py = os.environ.copy()
    if cuda:
        env_py["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.dirname(gpu_lib))) + (
            os.pathsep + env_py["PYTHONPATH"] if env_py.get("PYTHONPATH") else "")
    for prec, path in onnx.items():
        b = {"mae_run": mae_run_bench(c, f"mae-run-bench-{prec}", path, "ort", device, batches,
                                      iters, lib)}
        rc, lines, tail = c.run(f"ort-python-{prec}", [
            c.a.python, REFERENCE, "ort", path, "--provider", device, "--batch-size", batches,
            "--iterations", str(iters)], env=env_py)
        if rc == 0:
            b["ort_python"] = json.loads([x for _, x in lines if x.startswith("{")][-1])
            b["mae_run_vs_ort_python"] = bench_ratios(b["mae_run"], b["ort_python"])
        else:
            b["ort_python"] = {"status": f"failed: rc {rc}: {last_error(tail)}"}
        rec["bench"][prec] = b
    # 3. parity: the same images through the CPU and the device, fp32.
    sub = os.path.join(c.work, "parity.npz")
    c.python_json("parity-subset", ["subset-npz", c.a.data, sub, "--splits", "test", "--n",
                                    "16" if not cuda else "64"])
    ref_csv, dev_csv = (os.path.join(c.work, f"parity-{x}.csv") for x in ("cpu", device))
    ref_backend = ["--backend", "tract"]
    c.run_ok("predict-cpu", [c.bin("mae-run"), "predict", "--model", onnx["fp32"], sub,
                             "--format", "csv", "--output", ref_csv] + ref_backend)
    c.run_ok(f"predict-{device}", [c.bin("mae-run"), "predict", "--model", onnx["fp32"], sub,
                                   "--format", "csv", "--output", dev_csv, "--backend", "ort",
                                   "--device", device, "--ort-lib", lib])
    par = c.python_json("parity-compare", ["compare-csv", ref_csv, dev_csv])
    par["reference"] = "tract (CPU)"
    par["compared"] = f"onnxruntime ({device})"
    par["within_1e-3"] = par["max_abs_diff"] <= 1e-3
    rec["parity_fp32"] = par
    problems = []
    if not par["within_1e-3"]:
        problems.append(f"fp32 parity {par['max_abs_diff']:.2e} > 1e-3")
    for prec, b in rec["bench"].items():
        if "status" in b["ort_python"]:
            problems.append(f"ORT Python {prec}: {b['ort_python']['status']}")
    if problems:
        rec["status"] = "failed: " + "; ".join(problems)
    elif not cuda:
        rec["status"] = ("unsupported: no CUDA provider (checked on the CPU provider)"
                         if not c.a.dry_run else "ok")


# -- the table ------------------------------------------------------------------------------
def fmt(v, nd=1):
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return str(v)
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def table(r):
    s = [f"# GPU check ({r['mode']}), {r['started_utc']}, {fmt(r.get('seconds'))} s",
         "", "| step | status | seconds |", "|---|---|---|"]
    for st in r["steps"]:
        s.append(f"| {st['n']}. {st['name']} | {st['status']} | {fmt(st['seconds'])} |")
    by = {st["name"]: st for st in r["steps"]}
    if "info" in by:
        sm = by["info"].get("summary", {})
        s += ["", "## 1. Machine", "",
              f"GPU {sm.get('gpu')}, CUDA {sm.get('cuda')}, cuDNN {sm.get('cudnn')}, "
              f"bf16 {sm.get('bf16')}; mae-train sees CUDA: {sm.get('mae_train_sees_cuda')}"]

    def throughput(title, rows):
        out = ["", title, "", "| model | batch | trainer img/s (precision) | PyTorch mode | "
               "PyTorch img/s | trainer ÷ PyTorch |", "|---|---|---|---|---|---|"]
        for case in rows:
            tr = case.get("trainer", {})
            modes = case.get("torch", {}).get("modes", {})
            for m, mr in modes.items():
                out.append(f"| {case['model']} | {case['batch_size']} | "
                           f"{fmt(tr.get('images_per_s'))} ({tr.get('precision')}) | {m} | "
                           f"{fmt(mr.get('images_per_s')) if mr.get('status') == 'ok' else mr.get('status')} | "
                           f"{fmt(case.get('ratios', {}).get(f'trainer_vs_{m}'), 3)} |")
            if case.get("anchors_h200"):
                out.append(f"| (H200 anchors) | | | {case['anchors_h200']} | | |")
        return out

    if "finetune_throughput" in by and "trainer" in by["finetune_throughput"]:
        st = by["finetune_throughput"]
        s += throughput("## 2. Fine-tune step throughput", [st])
        s.append(f"\ncompiled ÷ eager bf16: {fmt(st.get('ratios', {}).get('compile_vs_eager_bf16'), 3)}"
                 f"; goal ≥ 1.0× eager bf16: {st.get('goal_ge_1x_eager_bf16')}")
    if "pretrain_throughput" in by:
        s += throughput("## 3. MAE pretrain step throughput",
                        [k for k in by["pretrain_throughput"].get("cases", []) if "torch" in k])
    if "short_finetune" in by:
        s += ["", "## 4. Short fine-tune", "", "| precision | train loss per epoch | val AUC | "
              "test AUC | test acc1 | status |", "|---|---|---|---|---|---|"]
        for p, run in by["short_finetune"].get("runs", {}).items():
            t = run.get("test", {})
            s.append(f"| {p} | {', '.join(fmt(x, 4) for x in run.get('train_loss', []))} | "
                     f"{', '.join(fmt(x, 4) for x in run.get('val_auc', []))} | "
                     f"{fmt(t.get('auc'), 4)} | {fmt(t.get('acc1'), 4)} | {run.get('status')} |")
    if "launch_nccl" in by:
        st = by["launch_nccl"]
        s += ["", "## 5. launch --nproc-per-node 1", "",
              f"second epoch: plain {st.get('epoch1_s', {}).get('plain')} s, launch "
              f"({st.get('launch', {}).get('dist_backend')}) {st.get('epoch1_s', {}).get('launch')} s,"
              f" ratio {st.get('launch_vs_plain')}, within 3 %: {st.get('within_3pct')}"]
    if "mae_run_cuda" in by:
        st = by["mae_run_cuda"]
        s += ["", f"## 6. mae-run on {st.get('device')}", "",
              f"CUDA provider: {st.get('cuda_provider')}", "",
              "| export | batch | mae-run img/s | ORT Python img/s | mae-run ÷ Python |",
              "|---|---|---|---|---|"]
        for prec, b in st.get("bench", {}).items():
            py = {x["batch_size"]: x["images_per_s"]
                  for x in b.get("ort_python", {}).get("batches", [])}
            for x in b["mae_run"]["batches"]:
                s.append(f"| {prec} | {x['batch_size']} | {fmt(x['images_per_s'])} | "
                         f"{fmt(py.get(x['batch_size']))} | "
                         f"{fmt(b.get('mae_run_vs_ort_python', {}).get(str(x['batch_size'])), 3)} |")
        par = st.get("parity_fp32")
        if par:
            s.append(f"\nfp32 parity, {par['compared']} vs {par['reference']}: max |Δp| "
                     f"{par['max_abs_diff']:.2e} over {par['inputs']} images "
                     f"(within 1e-3: {par['within_1e-3']}); same label {par['same_label']}")
    if r["missing"]:
        s += ["", "## What the binaries lack", ""] + [f"- {m}" for m in r["missing"]]
    return "\n".join(s) + "\n"


def prepare_data(c):
    """The dry run's data: a small generated set, or a 128-image-per-split subset of --data;
    on the GPU, --data itself, or a generated set of PneumoniaMNIST's size without it."""
    a = c.a
    if a.data and not a.dry_run:
        return
    small = os.path.join(c.work, "data.npz")
    if a.data:
        args = ["subset-npz", a.data, small, "--splits", "train,val,test", "--n", "128"]
    else:
        args = ["synth-npz", small, "--n", "128" if a.dry_run else "4000"]
        if not a.dry_run:
            c.result["note"] = "no PneumoniaMNIST file: step 4 trained on generated data"
    rc, _, tail = c.run("data", [a.python, REFERENCE] + args)
    if rc != 0:
        sys.exit(f"cannot make the check's data ({' '.join(args)}): {last_error(tail)}")
    c.result["data"] = a.data = small


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--python", required=True)
    ap.add_argument("--data", help="MedMNIST-style .npz (default: a generated set)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--ort-gpu", help="folder of an ONNX Runtime build with the CUDA provider")
    ap.add_argument("--ort-cpu", help="libonnxruntime.so of the CPU build")
    ap.add_argument("--budgets", help="six comma-separated caps in seconds")
    ap.add_argument("--work", help="folder for checkpoints, ONNX files and data (default: "
                    "/tmp/mae-gpu-check-work, or OUT/mae-gpu-check-work in the dry run)")
    ap.add_argument("--deadline", type=float, help="seconds for the whole check")
    a = ap.parse_args()
    budgets = [float(x) for x in a.budgets.split(",")] if a.budgets else (
        DRY_BUDGETS if a.dry_run else GPU_BUDGETS)
    if len(budgets) != 6:
        sys.exit(f"--budgets: six values expected, got {len(budgets)}")
    a.deadline = a.deadline or sum(budgets) + 10
    for k in ("out", "bin", "data", "work"):
        if getattr(a, k):
            setattr(a, k, os.path.abspath(getattr(a, k)))
    c = Check(a)
    c.result["budgets_s"] = budgets
    prepare_data(c)
    c.step(1, step_info, budgets[0])
    c.step(2, step_finetune_throughput, budgets[1])
    c.step(3, step_pretrain_throughput, budgets[2])
    ft = c.step(4, step_short_finetune, budgets[3])
    plain = ft.get("runs", {}).get("bf16", {})
    c.step(5, step_launch_nccl, budgets[4], plain)
    best = os.path.join(plain["output"], "checkpoint-best.safetensors") if plain.get(
        "output") else None
    c.step(6, step_mae_run, budgets[5], best)
    c.result["complete"] = True
    c.save()
    print(f"[check] wrote {os.path.join(a.out, 'check.json')} and check.md "
          f"in {c.result['seconds']}s", flush=True)
    failed = [st for st in c.result["steps"] if st["status"].startswith(("failed", "timeout"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
