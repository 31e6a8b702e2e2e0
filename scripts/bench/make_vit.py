"""Writes a randomly initialised timm ViT as an official-style fine-tune checkpoint
({"model": state_dict}, upstream parameter names), for export benchmarks.

usage: make_vit.py OUT.pth [--model vit_base_patch16] [--classes 2] [--seed 0]
"""
import argparse

import timm
import torch

PRESETS = {
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_tiny_patch16": "vit_tiny_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
}

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--model", default="vit_base_patch16", choices=sorted(PRESETS))
ap.add_argument("--classes", type=int, default=2)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
torch.manual_seed(a.seed)
m = timm.create_model(PRESETS[a.model], pretrained=False, num_classes=a.classes,
                      global_pool="avg", fc_norm=True)
torch.save({"model": m.state_dict()}, a.out)
print(f"wrote {a.out}: {a.model}, {sum(p.numel() for p in m.parameters()):,} parameters")
