"""Writes the fuzz targets' seed inputs (fuzz/seeds/<target>/): small, valid files of each
format, made by the tools that make them in the world (torch.save, numpy, safetensors, PIL,
onnx) or, for DICOM, by the minimal writer of the input-layer tests. Seeded: the same files
every run.

usage: .venv/bin/python fuzz/make_seeds.py [OUT]   (default fuzz/seeds)
"""
import io
import json
import os
import struct
import sys
import zipfile

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from PIL import Image
from safetensors.numpy import save as st_save

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))
from imagefolder_tree import write_dicom  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "seeds")
rng = np.random.default_rng(0)


def put(target, name, data):
    os.makedirs(os.path.join(out, target), exist_ok=True)
    with open(os.path.join(out, target, name), "wb") as f:
        f.write(data)


# pth: torch.save archives, by path (inner folder named after the file) and via a file object.
torch.manual_seed(0)
sd = {"cls_token": torch.zeros(1, 1, 4), "blocks.0.norm1.weight": torch.ones(4),
      "head.weight": torch.randn(2, 4), "head.bias": torch.zeros(2, dtype=torch.float64)}
for name, obj in [("model", {"model": sd, "epoch": 3}), ("plain", sd),
                  ("mixed", {"model": {"a": torch.arange(6, dtype=torch.int64).reshape(2, 3)},
                             "args": {"lr": 1e-3, "names": ["x", "y"]}, "half": torch.ones(3).half()})]:
    buf = io.BytesIO()
    torch.save(obj, buf)
    put("pth", f"{name}.pth", buf.getvalue())
path = os.path.join(out, "pth", "mae_pretrain_vit_base.pth")
os.makedirs(os.path.dirname(path), exist_ok=True)
torch.save({"model": sd}, path)

# safetensors: tensors with our metadata document, and without one.
meta = {"format_version": 1, "kind": "classifier", "arch": "vit_tiny_patch4_28",
        "config": {"type": "vit", "img_size": 8, "patch_size": 4, "in_chans": 3, "num_classes": 2,
                   "embed_dim": 4, "depth": 1, "num_heads": 1, "mlp_ratio": 4.0, "qkv_bias": True,
                   "global_pool": True, "layer_norm_eps": 1e-06},
        "task": "binary", "class_names": ["normal", "pneumonia"],
        "preprocess": {"input_size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                       "crop_pct": 0.875, "interpolation": "bicubic"},
        "epoch": 1, "metrics": {"acc1": 50.0, "auc": 0.5},
        "data": {"source": "x.npz", "class_names": ["normal", "pneumonia"],
                 "train": {"images": 4, "per_class": [2, 2]}, "train_split_images": 8,
                 "val": {"images": 2, "per_class": [1, 1]}},
        "writer": "mae-train 0.1.0"}
tensors = {"head.weight": rng.standard_normal((2, 4)).astype(np.float32),
           "head.bias": np.zeros(2, np.float32), "pos_embed": np.zeros((1, 5, 4), np.float16)}
put("safetensors", "ours.safetensors", st_save(tensors, metadata={"mae": json.dumps(meta)}))
put("safetensors", "plain.safetensors", st_save({"w": np.arange(6, dtype=np.int64)}))

# npz: MedMNIST's layout, grey and RGB, stored and deflated, int and uint labels.
def npz(arrays, compressed):
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()
grey = {f"{s}_images": rng.integers(0, 256, (3, 8, 8), dtype=np.uint8) for s in ["train", "val"]}
grey.update({f"{s}_labels": rng.integers(0, 2, (3, 1)).astype(np.uint8) for s in ["train", "val"]})
put("npz", "grey.npz", npz(grey, False))
put("npz", "grey-deflated.npz", npz(grey, True))
rgb = {"test_images": rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8),
       "test_labels": rng.integers(0, 2, (2, 3)).astype(np.int64)}
put("npz", "rgb-multilabel.npz", npz(rgb, False))

# dicom: 16-bit grey with a window, 8-bit grey (MONOCHROME1), 8-bit RGB.
tmp = os.path.join(out, ".tmp.dcm")
for name, px, photometric, bits, window in [
        ("grey16.dcm", rng.integers(0, 4096, (8, 8)), "MONOCHROME2", 16, (2048, 4000)),
        ("grey8-mono1.dcm", rng.integers(0, 256, (6, 5)), "MONOCHROME1", 8, None),
        ("rgb8.dcm", rng.integers(0, 256, (4, 4, 3)), "RGB", 8, None)]:
    write_dicom(tmp, px, photometric, bits, window)
    put("dicom", name, open(tmp, "rb").read())
    put("image", name, open(tmp, "rb").read())
os.remove(tmp)

# image: every format the input layer decodes, small.
def enc(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()
colour = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
grey_img = Image.fromarray(rng.integers(0, 256, (5, 4), dtype=np.uint8))
put("image", "rgb.png", enc(colour, "PNG"))
put("image", "grey16.png", enc(Image.fromarray(rng.integers(0, 65535, (4, 4)).astype(np.uint16)), "PNG"))
put("image", "rgba.png", enc(colour.convert("RGBA"), "PNG"))
put("image", "rgb.jpg", enc(colour, "JPEG", quality=90))
put("image", "grey.jpg", enc(grey_img, "JPEG"))
put("image", "rgb.bmp", enc(colour, "BMP"))
put("image", "rgb.tif", enc(colour, "TIFF"))
put("image", "grey16.tif", enc(Image.fromarray(rng.integers(0, 65535, (4, 4)).astype(np.uint16)), "TIFF"))
put("image", "rgb.webp", enc(colour, "WEBP", lossless=True))
put("image", "rgb.ppm", enc(colour, "PPM"))
put("image", "grey.pgm", enc(grey_img, "PPM"))

# http: /v1/predict multipart and raw uploads, /v2 infer requests (JSON, and JSON + binary).
png = enc(colour, "PNG")
form = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
        b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--XyZ\r\nContent-Disposition: form-data; "
        b"name=\"b\"\r\n\r\nxyz\r\n--XyZ--\r\n")
put("http", "multipart", b"multipart/form-data; boundary=XyZ\n" + form)
put("http", "raw-png", b"image/png\n" + png)
infer = {"id": "1", "inputs": [{"name": "pixel_values", "shape": [1, 3, 2, 2], "datatype": "FP32",
                                "data": [0.5] * 12}],
         "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}
put("http", "v2-json", b"application/json\n" + json.dumps(infer).encode())
images = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}]}
put("http", "v2-bytes", b"application/json\n" + json.dumps(images).encode())
head = json.dumps({"inputs": [{"name": "pixel_values", "shape": [1, 3, 2, 2], "datatype": "FP32",
                               "parameters": {"binary_data_size": 48}}]}).encode()
put("http", "v2-binary", str(len(head)).encode() + b"\n" + head + struct.pack("<12f", *([0.25] * 12)))

# onnx_meta: a tiny graph with the full mae.* metadata, and one with none.
x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])
y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])
w = helper.make_tensor("w", TensorProto.FLOAT, [192, 2], rng.standard_normal(384).astype(np.float32).tolist())
graph = helper.make_graph([helper.make_node("Flatten", ["pixel_values"], ["f"]),
                           helper.make_node("MatMul", ["f", "w"], ["logits"])], "g", [x], [y], [w])
props = {"mae.format_version": "1", "mae.output": "logits", "mae.task": "binary",
         "mae.class_names": json.dumps(["normal", "pneumonia"]), "mae.input_name": "pixel_values",
         "mae.input_size": "8", "mae.mean": "[0.5,0.5,0.5]", "mae.std": "[0.5,0.5,0.5]",
         "mae.crop_pct": "0.875", "mae.interpolation": "bicubic", "mae.arch": "vit_tiny_patch4_28",
         "mae.model_config": json.dumps(meta["config"]), "mae.precision": "fp32",
         "mae.checkpoint_file": "c.safetensors", "mae.checkpoint_sha256": "00" * 32,
         "mae.exporter_version": "mae-export 0.1.0", "mae.metrics": "{}", "mae.threshold": "0.4",
         "mae.data": json.dumps(meta["data"])}
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
helper.set_model_props(model, props)
put("onnx_meta", "ours.onnx", model.SerializeToString())
bare = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
put("onnx_meta", "bare.onnx", bare.SerializeToString())
for t in sorted(os.listdir(out)):
    files = os.listdir(os.path.join(out, t))
    print(f"{t}: {len(files)} seeds, {sum(os.path.getsize(os.path.join(out, t, f)) for f in files)} bytes")
