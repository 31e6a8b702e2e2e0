"""Writes a sweep's finished cells back from the `sweep.csv` it wrote: one `cell.json` per row,
in the folder the sweep gives that cell, so that a sweep resumed on a machine without the earlier
run's folders skips what was measured and runs only the rest.

    python scripts/results/restore_cells.py SWEEP_CSV SWEEP_DIR

A cell whose `cell.json` exists is left as it is. Each written one names the csv it came from
(`restored_from`, a field the sweep does not read). The sweep itself only checks that a cell's
`cell.json` exists, so a restored cell has no checkpoint and no log: its figures are the csv's.
"""
import csv
import json
import os
import sys


def cell_dir(root, row):
    # The sweep's layout: fine-tune cells in cells/{init}/n{size}/seed{seed}, linear-probe
    # cells in cells/{init}/linprobe/n{size}/seed{seed}.
    parts = [root, "cells", row["init"]]
    if row["kind"] != "finetune":
        parts.append(row["kind"])
    parts += [f"n{row['size']}", f"seed{row['seed']}"]
    return os.path.join(*parts)


def number(text, kind):
    return None if text == "" else kind(text)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, root = sys.argv[1], sys.argv[2]
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    want = {"size", "train_images", "seed", "init", "best_epoch", "val_auc", "val_acc",
            "test_auc", "test_acc", "train_seconds", "kind"}
    if rows and not want <= set(rows[0]):
        sys.exit(f"{src}: not a sweep.csv (columns {sorted(rows[0])})")
    written = kept = 0
    for line, row in enumerate(rows, start=2):
        try:
            cell = {
                "size": row["size"],
                "train_images": int(row["train_images"]),
                "seed": int(row["seed"]),
                "init": row["init"],
                "kind": row["kind"],
                "best_epoch": number(row["best_epoch"], int),
                "val_auc": number(row["val_auc"], float),
                "val_acc": float(row["val_acc"]),
                "test_auc": number(row["test_auc"], float),
                "test_acc": float(row["test_acc"]),
                "train_seconds": float(row["train_seconds"]),
                "restored_from": os.path.relpath(src, root),
            }
        except ValueError as e:
            sys.exit(f"{src}, line {line}: {e}")
        d = cell_dir(root, row)
        path = os.path.join(d, "cell.json")
        if os.path.exists(path):
            kept += 1
            continue
        os.makedirs(d, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(cell, f, indent=2)
        os.replace(path + ".tmp", path)
        written += 1
    print(f"{root}: {written} cells restored from {src}, {kept} already there")


if __name__ == "__main__":
    main()
