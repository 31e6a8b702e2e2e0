"""PyTorch's side of the training-step benchmark: a timm VisionTransformer built like mae-train's
preset (same widths, depth, heads, patch, input, classes, mean-pooled head, drop path 0.1),
cross-entropy on random images and labels, backward, AdamW with upstream's layer-decayed
groups (weight decay 0.05 on weights, none on biases, norms and tokens). Prints JSON in the
form of `mae-train bench --json`.

usage: train_step.py PRESET --batch-size B [--steps N] [--warmup W]
"""
import argparse
import json
import time

import torch
import timm.models.vision_transformer as vt

PRESETS = {  # embed_dim, depth, heads, patch, input
    "vit_tiny_patch4_28": (192, 12, 3, 4, 28),
    "vit_tiny_patch16": (192, 12, 3, 16, 224),
    "vit_small_patch16": (384, 12, 6, 16, 224),
    "vit_base_patch16": (768, 12, 12, 16, 224),
}
ap = argparse.ArgumentParser()
ap.add_argument("preset", choices=sorted(PRESETS))
ap.add_argument("--batch-size", type=int, required=True)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--warmup", type=int, default=2)
a = ap.parse_args()
d, depth, heads, p, s = PRESETS[a.preset]
torch.manual_seed(0)
model = vt.VisionTransformer(img_size=s, patch_size=p, embed_dim=d, depth=depth, num_heads=heads,
                             num_classes=1000, global_pool="avg", drop_path_rate=0.1)
model.train()
decay = [q for n, q in model.named_parameters() if q.ndim > 1 and "token" not in n and "pos_embed" not in n]
no_decay = [q for n, q in model.named_parameters() if not (q.ndim > 1 and "token" not in n and "pos_embed" not in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=1e-4, betas=(0.9, 0.999))
xs = torch.randn(a.batch_size, 3, s, s)
ys = torch.randint(1000, (a.batch_size,))


def step():
    t = time.perf_counter()
    opt.zero_grad(set_to_none=False)
    torch.nn.functional.cross_entropy(model(xs), ys).backward()
    opt.step()
    return time.perf_counter() - t


for _ in range(a.warmup):
    step()
times = [step() for _ in range(a.steps)]
srt = sorted(times)
print(json.dumps({
    "model": a.preset, "framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
    "parameters": sum(q.numel() for q in model.parameters()), "batch_size": a.batch_size,
    "steps": a.steps, "mean_ms": 1e3 * sum(times) / len(times), "median_ms": 1e3 * srt[len(srt) // 2],
    "min_ms": 1e3 * srt[0], "step_ms": [1e3 * t for t in times],
    "images_per_s": a.batch_size * len(times) / sum(times)}, indent=2))
