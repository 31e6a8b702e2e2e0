"""One line of figures from a `mae-run bench --format json` or `ort_python.py` result file."""
import json
import sys

r = json.load(open(sys.argv[1]))
print("; ".join(
    "batch {}: {:.1f} ms/image, p99 {:.1f} ms, {:.2f} images/s".format(
        b["batch_size"], b["ms_per_image"], b["p99_ms"], b["images_per_s"])
    for b in r["batches"]))
