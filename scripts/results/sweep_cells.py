"""The cells of a mae-train sweep finished so far (each cell's cell.json), as a Markdown table of
mean ± sd over seeds per kind, init and label count: a partial sweep's figures while it runs, or
a sweep's whole figures when its folder holds cells of more inits than its last command named
(cells restored from an earlier run's csv, or inits run by separate commands).

    python scripts/results/sweep_cells.py SWEEP_DIR [--csv OUT.csv] [--png OUT.png] [--title T]

--csv writes every cell as a row in sweep.csv's columns; --png draws test AUC and ACC against
labels, one line per init, fine-tuning and linear probing side by side, mean ± sd over seeds.
Both are written atomically.
"""
import argparse
import glob
import json
import os
import statistics

ORDER = ["scratch", "mae_own", "mae_mednist", "mae_mednist_then_own", "mednist_ft_600",
         "mednist_ft_6k", "mednist_ft_all"]
COLUMNS = ["size", "train_images", "seed", "init", "best_epoch", "val_auc", "val_acc",
           "test_auc", "test_acc", "train_seconds", "kind"]


def load(root):
    cells = []
    for f in glob.glob(f"{root}/cells/**/cell.json", recursive=True):
        with open(f) as fh:
            c = json.load(fh)
        c.setdefault("kind", "finetune")
        cells.append(c)
    return cells


def size_key(size):
    return (1, 0) if size == "all" else (0, int(size))


def groups(cells):
    rows = {}
    for c in cells:
        rows.setdefault((c["kind"], c["init"], c["size"]), []).append(c)
    inits = ORDER + sorted({c["init"] for c in cells} - set(ORDER))
    sizes = sorted({c["size"] for c in cells}, key=size_key)
    for kind in ["finetune", "linprobe"]:
        for size in sizes:
            for init in inits:
                if (kind, init, size) in rows:
                    yield kind, init, size, rows[(kind, init, size)]


def mean_sd(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), sd


def table(cells):
    out = ["| kind | init | labels | seeds | test AUC | test ACC |", "|---|---|---|---:|---|---|"]
    for kind, init, size, v in groups(cells):
        cols = []
        for key in ["test_auc", "test_acc"]:
            m, sd = mean_sd([c[key] for c in v])
            cols.append(f"{m:.3f}" + (f" ± {sd:.3f}" if len(v) > 1 else ""))
        out.append(f"| {kind} | {init} | {size} | {len(v)} | {cols[0]} | {cols[1]} |")
    return "\n".join(out)


def atomic(path, write):
    tmp = f"{path}.tmp{os.path.splitext(path)[1]}"
    write(tmp)
    os.replace(tmp, path)


def write_csv(cells, path):
    def fmt(c, k):
        v = c.get(k)
        if v is None:
            return ""
        if k in ("val_auc", "val_acc", "test_auc", "test_acc"):
            return f"{v:.6f}"
        if k == "train_seconds":
            return f"{v:.1f}"
        return str(v)

    order = {init: i for i, init in enumerate(ORDER)}
    cells = sorted(cells, key=lambda c: (c["seed"], size_key(c["size"]),
                                         order.get(c["init"], len(order)), c["init"], c["kind"]))
    lines = [",".join(COLUMNS)] + [",".join(fmt(c, k) for k in COLUMNS) for c in cells]
    atomic(path, lambda p: open(p, "w").write("\n".join(lines) + "\n"))


def write_png(cells, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({c["size"] for c in cells}, key=size_key)
    kinds = [k for k in ["finetune", "linprobe"] if any(c["kind"] == k for c in cells)]
    lines = {}
    for kind, init, size, v in groups(cells):
        lines.setdefault((kind, init), []).append((sizes.index(size), v))
    inits = list(dict.fromkeys(init for _, init in lines))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 8), squeeze=False)
    for col, kind in enumerate(kinds):
        for row, (key, label) in enumerate([("test_auc", "test AUC"), ("test_acc", "test ACC")]):
            ax = axes[row][col]
            for (k, init), pts in lines.items():
                if k != kind:
                    continue
                stats = [mean_sd([c[key] for c in v]) for _, v in pts]
                seeds = max(len(v) for _, v in pts)
                ax.errorbar([x for x, _ in pts], [m for m, _ in stats],
                            yerr=[sd for _, sd in stats], capsize=3, marker="o",
                            color=colours(inits.index(init) % 10),
                            label=f"{init} ({seeds} seed{'s' if seeds > 1 else ''})")
            ax.set_xticks(range(len(sizes)), [f"{s} labels" for s in sizes])
            ax.set_xlim(-0.3, len(sizes) - 0.7)
            ax.set_ylabel(label)
            ax.set_title({"finetune": "fine-tuning", "linprobe": "linear probe"}[kind])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    atomic(path, lambda p: fig.savefig(p, dpi=100, format="png"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--csv", help="write every cell as sweep.csv rows here")
    ap.add_argument("--png", help="draw test AUC and ACC against labels here")
    ap.add_argument("--title", default="", help="the plot's title")
    a = ap.parse_args()
    cells = load(a.sweep_dir)
    if not cells:
        raise SystemExit(f"{a.sweep_dir}: no finished cell (no cells/**/cell.json)")
    print(table(cells))
    if a.csv:
        write_csv(cells, a.csv)
    if a.png:
        write_png(cells, a.png, a.title or os.path.basename(os.path.normpath(a.sweep_dir)))


if __name__ == "__main__":
    main()
