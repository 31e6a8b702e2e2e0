"""The cells of a mae-train sweep finished so far (each cell's cell.json), as a Markdown table of
mean ± sd over seeds per kind, init and label count: a partial sweep's figures while it runs.

    python scripts/results/sweep_cells.py SWEEP_DIR
"""
import json, glob, statistics, sys
root = sys.argv[1]
rows = {}
for f in glob.glob(f"{root}/cells/**/cell.json", recursive=True):
    c = json.load(open(f))
    rows.setdefault((c["kind"], c["init"], c["size"]), []).append((c["seed"], c["test_auc"], c["test_acc"]))
order = ["scratch", "mae_own", "mae_mednist", "mae_mednist_then_own", "mednist_ft_600", "mednist_ft_6k", "mednist_ft_all"]
print("| kind | init | labels | seeds | test AUC | test ACC |")
print("|---|---|---|---:|---|---|")
order += sorted({init for _, init, _ in rows} - set(order))
for kind in ["finetune", "linprobe"]:
    for size in ["100", "all"]:
        for init in order:
            v = rows.get((kind, init, size))
            if not v:
                continue
            auc = [a for _, a, _ in v]; acc = [b for _, _, b in v]
            sd = lambda x: f" ± {statistics.stdev(x):.3f}" if len(x) > 1 else ""
            print(f"| {kind} | {init} | {size} | {len(v)} | {statistics.mean(auc):.3f}{sd(auc)} | {statistics.mean(acc):.3f}{sd(acc)} |")
