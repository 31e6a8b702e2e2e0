"""PyTorch and ONNX Runtime reference figures for scripts/gpu/check.sh, measured in the same call
and on the same card as mae-train and mae-run.

usage:
  reference.py info
  reference.py finetune --model vit_base_patch16 [--depth N] --batch-size 128 --steps 20
                        --warmup 3 --modes eager-fp32,eager-bf16,compile-bf16 [--device cuda]
  reference.py pretrain --model mae_vit_base_patch16 [--depth N] --batch-size 256 --steps 20
                        --warmup 3 --modes eager-fp32,eager-bf16 [--device cuda]
  reference.py ort MODEL.onnx --provider cuda|cpu --batch-size 1,64,256 --iterations 20
  reference.py make-vit OUT.pth --model vit_base_patch16 [--depth N] [--classes 2]
  reference.py subset-npz IN.npz OUT.npz --splits test --n 64
  reference.py compare-csv A.csv B.csv
  reference.py synth-npz OUT.npz [--n 600] [--size 28]

Each command prints one JSON object on standard output (finetune and pretrain print one line
per mode first, `{"partial_mode": ..., "result": ...}`, as each mode ends).

`finetune` times forward + backward + AdamW steps of a ViT classifier on random data: timm's
VisionTransformer when timm is importable (it uses fused scaled-dot-product attention), else the
compact ViT below, which has the same layers and upstream parameter names. `pretrain` times the
compact MAE below (He et al. 2021, arXiv:2111.06377): random masking by per-sample noise argsort,
encoder on the kept patches, decoder with mask tokens, normalised-pixel loss on masked patches.
Modes: eager-fp32, eager-bf16, eager-fp16 (autocast) and compile-bf16 (torch.compile of the
model, inductor unless --compile-backend says otherwise; its compile time is reported apart,
as warmup_s, and excluded from the figure).
"""
import argparse
import csv
import json
import math
import os
import sys
import time

# Presets as mae-train names them: size -> (width, depth, heads, decoder (width, depth, heads)).
SIZES = {
    "tiny": (192, 12, 3, (128, 2, 4)),
    "small": (384, 12, 6, (256, 4, 8)),
    "base": (768, 12, 12, (512, 8, 16)),
    "large": (1024, 24, 16, (512, 8, 16)),
    "huge": (1280, 32, 16, (512, 8, 16)),
}


def preset(name, depth=None):
    """(img, patch, width, depth, heads, decoder) of a mae-train preset name."""
    base = name[4:] if name.startswith("mae_") else name
    parts = base.split("_")  # vit, size, patchP[, img]
    if len(parts) not in (3, 4) or parts[0] != "vit" or parts[1] not in SIZES:
        raise SystemExit(f"unknown model preset {name!r}")
    patch = int(parts[2].removeprefix("patch"))
    img = int(parts[3]) if len(parts) == 4 else 224
    width, d, heads, dec = SIZES[parts[1]]
    return img, patch, width, depth or d, heads, dec


def torch_modules():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Attention(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dim, dim * 3)
            self.proj = nn.Linear(dim, dim)

        def forward(self, xs):
            b, n, d = xs.shape
            qkv = self.qkv(xs).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # [b, h, n, d/h] each
            xs = F.scaled_dot_product_attention(q, k, v)
            return self.proj(xs.transpose(1, 2).reshape(b, n, d))

    class Mlp(nn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1 = nn.Linear(dim, hidden)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(hidden, dim)

        def forward(self, xs):
            return self.fc2(self.act(self.fc1(xs)))

    class Block(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = Mlp(dim, dim * 4)

        def forward(self, xs):
            xs = xs + self.attn(self.norm1(xs))
            return xs + self.mlp(self.norm2(xs))

    class PatchEmbed(nn.Module):
        def __init__(self, patch, dim):
            super().__init__()
            self.proj = nn.Conv2d(3, dim, patch, patch)

        def forward(self, xs):
            return self.proj(xs).flatten(2).transpose(1, 2)  # [b, n, d]

    class ViT(nn.Module):
        """Global-pool ViT classifier with upstream parameter names."""

        def __init__(self, img, patch, dim, depth, heads, classes):
            super().__init__()
            n = (img // patch) ** 2
            self.patch_embed = PatchEmbed(patch, dim)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
            self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, classes)

        def forward(self, xs):
            xs = self.patch_embed(xs)
            xs = torch.cat([self.cls_token.expand(xs.shape[0], -1, -1), xs], 1) + self.pos_embed
            for blk in self.blocks:
                xs = blk(xs)
            return self.head(self.fc_norm(xs[:, 1:].mean(1)))

    class MAE(nn.Module):
        """Masked autoencoder: ViT encoder on the kept patches, light decoder, pixel loss."""

        def __init__(self, img, patch, dim, depth, heads, dec):
            super().__init__()
            ddim, ddepth, dheads = dec
            self.patch = patch
            n = (img // patch) ** 2
            self.patch_embed = PatchEmbed(patch, dim)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            # Fixed (not learned) position embeddings, as upstream's sin-cos tables.
            self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02, requires_grad=False)
            self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.decoder_embed = nn.Linear(dim, ddim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
            self.decoder_pos_embed = nn.Parameter(
                torch.randn(1, n + 1, ddim) * 0.02, requires_grad=False
            )
            self.decoder_blocks = nn.ModuleList(Block(ddim, dheads) for _ in range(ddepth))
            self.decoder_norm = nn.LayerNorm(ddim, eps=1e-6)
            self.decoder_pred = nn.Linear(ddim, patch * patch * 3)

        def patchify(self, imgs):
            b, c, h, w = imgs.shape
            p = self.patch
            xs = imgs.reshape(b, c, h // p, p, w // p, p)
            return xs.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

        def forward(self, imgs, mask_ratio=0.75):
            xs = self.patch_embed(imgs) + self.pos_embed[:, 1:]
            b, n, d = xs.shape
            keep = int(n * (1 - mask_ratio))
            noise = torch.rand(b, n, device=xs.device)
            shuffle = noise.argsort(1)
            restore = shuffle.argsort(1)
            kept = shuffle[:, :keep]
            xs = xs.gather(1, kept.unsqueeze(-1).expand(-1, -1, d))  # [b, keep, d]
            mask = torch.ones(b, n, device=xs.device)
            mask[:, :keep] = 0
            mask = mask.gather(1, restore)
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
            xs = torch.cat([cls, xs], 1)
            for blk in self.blocks:
                xs = blk(xs)
            xs = self.decoder_embed(self.norm(xs))
            dd = xs.shape[-1]
            tokens = torch.cat([xs[:, 1:], self.mask_token.expand(b, n - keep, -1)], 1)
            tokens = tokens.gather(1, restore.unsqueeze(-1).expand(-1, -1, dd))  # [b, n, dd]
            xs = torch.cat([xs[:, :1], tokens], 1) + self.decoder_pos_embed
            for blk in self.decoder_blocks:
                xs = blk(xs)
            pred = self.decoder_pred(self.decoder_norm(xs))[:, 1:]
            target = self.patchify(imgs)
            mean = target.mean(-1, keepdim=True)
            var = target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
            loss = ((pred.float() - target) ** 2).mean(-1)
            return (loss * mask).sum() / mask.sum()

    return ViT, MAE


def cmd_info(_a):
    import torch

    out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "cuda_version": torch.version.cuda, "cudnn_version": torch.backends.cudnn.version()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu_name=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   compute_capability=f"{p.major}.{p.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported())
    try:
        import timm
        out["timm"] = timm.__version__
    except ImportError:
        out["timm"] = None
    return out


def build_classifier(a, device):
    img, patch, dim, depth, heads, _ = preset(a.model, a.depth)
    try:
        import torch
        from timm.models.vision_transformer import VisionTransformer

        impl = "timm " + __import__("timm").__version__
        model = VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth,
                                  num_heads=heads, num_classes=1000, global_pool="avg",
                                  fc_norm=True, drop_path_rate=0.1)
        fused = getattr(model.blocks[0].attn, "fused_attn", None)
        impl += " (fused attention)" if fused else " (attention not fused)"
    except ImportError:
        import torch

        vit, _ = torch_modules()
        model = vit(img, patch, dim, depth, heads, 1000)
        impl = "compact ViT (timm absent; fused SDPA)"
    return model.to(device), impl, img


def time_steps(model, make_loss, params, device, mode, steps, warmup, backend="inductor"):
    import torch

    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode.split("-")[1]]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=fused, foreach=not fused)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    fwd = torch.compile(model, backend=backend) if mode.startswith("compile") else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = make_loss(fwd)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t = time.perf_counter()
    for _ in range(max(warmup, 1)):
        loss = step()
    sync()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    secs = time.perf_counter() - t
    return {"ms_per_step": secs / steps * 1e3, "warmup_s": first, "loss": float(loss.detach())}


def run_modes(a, build):
    """Times each mode with a fresh model; a failing mode is recorded, not fatal."""
    import torch

    device = torch.device(a.device)
    torch.manual_seed(0)
    # libtorch's defaults (no TF32 matmuls), as mae-train runs: fp32 is compared like for like.
    out = {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "model": a.model, "depth": a.depth, "compile_backend": a.compile_backend, "batch_size": a.batch_size, "steps": a.steps,
           "warmup": a.warmup, "device": str(device), "torch": torch.__version__, "modes": {}}
    if device.type == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    for mode in a.modes.split(","):
        try:
            model, make_loss, impl = build(device)
            r = time_steps(model, make_loss, [p for p in model.parameters() if p.requires_grad],
                           device, mode, a.steps, a.warmup, a.compile_backend)
            r["images_per_s"] = a.batch_size / r["ms_per_step"] * 1e3
            r["impl"] = impl
            r["status"] = "ok"
            if not math.isfinite(r["loss"]):
                r["status"] = f"failed: non-finite loss {r['loss']}"
        except Exception as e:  # noqa: BLE001 - one mode's failure must not hide the others
            r = {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        out["modes"][mode] = r
        # One line per mode as it ends, so a caller that runs out of time keeps the rest.
        print(json.dumps({"partial_mode": mode, "result": r}), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def cmd_finetune(a):
    import torch

    def build(device):
        model, impl, img = build_classifier(a, device)
        xs = torch.randn(a.batch_size, 3, img, img, device=device)
        ys = torch.randint(0, 1000, (a.batch_size,), device=device)
        return model, lambda m: torch.nn.functional.cross_entropy(m(xs), ys), impl

    return run_modes(a, build)


def cmd_pretrain(a):
    import torch

    def build(device):
        img, patch, dim, depth, heads, dec = preset(a.model, a.depth)
        _, mae = torch_modules()
        model = mae(img, patch, dim, depth, heads, dec).to(device)
        xs = torch.randn(a.batch_size, 3, img, img, device=device)
        return model, lambda m: m(xs), "compact MAE (fused SDPA)"

    return run_modes(a, build)


def cmd_ort(a):
    import numpy as np

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if a.threads:
        so.intra_op_num_threads = a.threads
    providers = ["CUDAExecutionProvider"] if a.provider == "cuda" else ["CPUExecutionProvider"]
    t0 = time.perf_counter()
    sess = ort.InferenceSession(a.model, so, providers=providers)
    load_ms = (time.perf_counter() - t0) * 1e3
    used = sess.get_providers()
    if a.provider == "cuda" and "CUDAExecutionProvider" not in used:
        raise SystemExit(f"the CUDA provider did not load (providers: {used})")
    inp = sess.get_inputs()[0]
    _, c, h, w = inp.shape
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    rng = np.random.default_rng(0)
    out = {"runtime": f"onnxruntime {ort.__version__} (Python)", "file": ort.__file__,
           "providers": used, "load_ms": load_ms, "batches": []}
    for b in [int(x) for x in a.batch_size.split(",")]:
        x = rng.standard_normal((b, c, h, w)).astype(dtype)
        for _ in range(a.warmup):
            sess.run(None, {inp.name: x})
        ms = []
        for _ in range(a.iterations):
            t = time.perf_counter()
            sess.run(None, {inp.name: x})
            ms.append((time.perf_counter() - t) * 1e3)
        ms = np.sort(np.array(ms))
        mean = float(ms.mean())
        out["batches"].append({"batch_size": b, "iterations": a.iterations, "mean_ms": mean,
                               "p50_ms": float(np.percentile(ms, 50)),
                               "images_per_s": 1e3 * b / mean})
    return out


def cmd_make_vit(a):
    import torch

    img, patch, dim, depth, heads, _ = preset(a.model, a.depth)
    vit, _ = torch_modules()
    torch.manual_seed(a.seed)
    model = vit(img, patch, dim, depth, heads, a.classes)
    tmp = a.out + ".tmp"
    torch.save({"model": model.state_dict()}, tmp)
    os.replace(tmp, a.out)
    return {"wrote": a.out, "model": a.model, "depth": depth, "classes": a.classes}


def cmd_subset_npz(a):
    """At most --n images of each split named by --splits (MedMNIST key layout), as many of
    each class as there are (files sorted by class would otherwise give one class only)."""
    import numpy as np

    arrays = {}
    with np.load(a.inp) as z:
        for split in a.splits.split(","):
            if f"{split}_images" not in z or f"{split}_labels" not in z:
                raise SystemExit(f"{a.inp}: no {split}_images / {split}_labels arrays")
            labels = z[f"{split}_labels"]
            first = labels.reshape(len(labels), -1)[:, 0]
            groups = [np.flatnonzero(first == k) for k in np.unique(first)]
            # Round-robin over the classes, in file order within each.
            order = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
            pick = np.sort(np.array(order[: a.n], dtype=np.int64))
            arrays[f"{split}_images"] = z[f"{split}_images"][pick]
            arrays[f"{split}_labels"] = labels[pick]
    tmp = a.out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, a.out)
    return {"wrote": a.out, "per_split": {
        k[: -len("_images")]: int(len(v)) for k, v in arrays.items() if k.endswith("_images")}}


def read_probs(path):
    """Rows of a `mae-run predict --format csv` file: input -> probabilities (`p_*` columns)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    cols = [k for k in rows[0] if k.startswith("p_")]
    if not cols:
        raise SystemExit(f"{path}: no probability columns in {list(rows[0])}")
    return {r["input"]: [float(r[k]) for k in cols] for r in rows}


def cmd_compare_csv(a):
    pa, pb = read_probs(a.a), read_probs(a.b)
    if pa.keys() != pb.keys():
        raise SystemExit(f"{a.a} and {a.b} list different inputs")
    diffs = {k: max(abs(x - y) for x, y in zip(pa[k], pb[k])) for k in pa}
    worst = max(diffs, key=diffs.get)
    argmax = lambda ps: max(range(len(ps)), key=ps.__getitem__)  # noqa: E731
    same = sum(argmax(pa[k]) == argmax(pb[k]) for k in pa)
    return {"inputs": len(pa), "max_abs_diff": diffs[worst], "worst_input": worst,
            "same_label": same}


def cmd_synth_npz(a):
    """A MedMNIST-shaped two-class set (28x28 grey): class 1 has a bright disc somewhere, so a
    model can learn it in a few steps. For when no PneumoniaMNIST file is at hand."""
    import numpy as np

    rng = np.random.default_rng(a.seed)
    yy, xx = np.mgrid[: a.size, : a.size]
    arrays = {}
    for split, n in (("train", a.n), ("val", a.n // 4), ("test", a.n // 4)):
        labels = (np.arange(n) % 2).astype(np.uint8)
        imgs = rng.normal(90, 25, (n, a.size, a.size))
        for i in np.flatnonzero(labels):
            cy, cx = rng.integers(a.size // 4, 3 * a.size // 4, 2)
            imgs[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= (a.size // 6) ** 2] += 110
        arrays[f"{split}_images"] = np.clip(imgs, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    tmp = a.out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, a.out)
    return {"wrote": a.out, "train": a.n, "size": a.size}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info")
    for name in ("finetune", "pretrain"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--depth", type=int)
        p.add_argument("--batch-size", type=int, required=True)
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--modes", default="eager-fp32,eager-bf16")
        p.add_argument("--device", default="cuda")
        p.add_argument("--compile-backend", default="inductor",
                       help="torch.compile backend of compile-* modes (aot_eager: a quick check)")
    p = sub.add_parser("ort")
    p.add_argument("model")
    p.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--batch-size", default="1,64,256")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int)
    p = sub.add_parser("make-vit")
    p.add_argument("out")
    p.add_argument("--model", default="vit_base_patch16")
    p.add_argument("--depth", type=int)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("subset-npz")
    p.add_argument("inp")
    p.add_argument("out")
    p.add_argument("--splits", default="test", help="comma-separated, e.g. train,val,test")
    p.add_argument("--n", type=int, default=64)
    p = sub.add_parser("compare-csv")
    p.add_argument("a")
    p.add_argument("b")
    p = sub.add_parser("synth-npz")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    fn = {"synth-npz": cmd_synth_npz, "info": cmd_info, "finetune": cmd_finetune, "pretrain": cmd_pretrain, "ort": cmd_ort,
          "make-vit": cmd_make_vit, "subset-npz": cmd_subset_npz,
          "compare-csv": cmd_compare_csv}[a.cmd]
    print(json.dumps(fn(a)))


if __name__ == "__main__":
    main()
