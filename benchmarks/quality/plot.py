"""Score vs KV bytes (fraction of bf16) per method: one panel per (model, task, size).

    python benchmarks/quality/plot.py benchmarks/results/quality.json [out.png]
    python benchmarks/quality/plot.py --merge quality.json part1.json part2.json  (+ .png)"""
from __future__ import annotations

import json
import sys


def make_plot(rows: list[dict], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["task"], r.get("size")) for r in rows}, key=str)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (model, task, size) in zip(axes[0], panels):
        sel = [r for r in rows if (r["model"], r["task"], r.get("size")) == (model, task, size)]
        for method in sorted({r["method"] for r in sel}):
            pts = sorted((r for r in sel if r["method"] == method),
                         key=lambda r: r["kv_bytes_ratio"])
            x = [r["kv_bytes_ratio"] for r in pts]
            y = [r["score"] for r in pts]
            err = [[max(0, r["score"] - r["ci_low"]) for r in pts],
                   [max(0, r["ci_high"] - r["score"]) for r in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        ax.set_xlabel("KV bytes / bf16 bytes")
        ax.set_ylabel("perplexity (lower is better)" if task == "perplexity" else "accuracy")
        ax.set_title(f"{model}\n{task}" + (f" ({size})" if size else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def merge(out: str, parts: list[str]) -> None:
    import os
    rows, meta = [], {}
    for p in parts:
        if os.path.exists(p):
            d = json.load(open(p))
            rows += d["rows"]
            meta[os.path.basename(p)] = d.get("meta", {})
    with open(out + ".tmp", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    os.replace(out + ".tmp", out)
    make_plot(rows, out.rsplit(".", 1)[0] + ".png")


if __name__ == "__main__":
    if sys.argv[1] == "--merge":
        merge(sys.argv[2], sys.argv[3:])
        sys.exit(0)
    src = sys.argv[1]
    make_plot(json.load(open(src))["rows"], sys.argv[2] if len(sys.argv) > 2
              else src.rsplit(".", 1)[0] + ".png")
