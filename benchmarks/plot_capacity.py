"""PNG of e2e_capacity.json: resident KV tokens and total throughput of every kv dtype, per
workload, as ratios to `auto` (or to the workload's first row where auto did not run; the
numbers are printed on the bars).

    python benchmarks/plot_capacity.py benchmarks/results/<run>/e2e_capacity.json [--match S ...]

--match keeps the workloads whose label contains one of the strings (the top-level file holds
every lease's rows; a plot of all of them is unreadable)."""
from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--match", nargs="*", default=None)
    args = p.parse_args()
    path = args.path
    rows = [r for r in json.load(open(path)) if r.get("total_tok_s")
            and (not args.match or any(m in r["workload"] for m in args.match))]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(2, len(workloads), figsize=(5 * len(workloads), 7), squeeze=False)
    for col, workload in enumerate(workloads):
        these = [r for r in rows if r["workload"] == workload]
        # Ratios to auto, or to the workload's first row where auto did not run beside it.
        base = next((r for r in these if r["kv"] == "auto"), these[0])
        labels = [r["kv"] + (f"\n{r['knobs']}" if r.get("knobs") else "")
                  + (f"\n{r['variant']}" if r.get("variant") else "") for r in these]
        for row, (key, title) in enumerate([("kv_tokens", "max resident KV tokens"),
                                            ("total_tok_s", "total tok/s")]):
            ax = axes[row][col]
            values = [r.get(key) or 0 for r in these]
            ratio = [v / base[key] if base and base.get(key) else 0 for v in values]
            bars = ax.bar(range(len(these)), ratio, color="tab:blue")
            for b, v in zip(bars, values):
                ax.annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xticks(range(len(these)), labels, fontsize=7)
            device = these[0].get("device", "")
            ax.set_title(f"{workload.replace(', ', chr(10))}\n{device}: {title} (x {base['kv']})",
                         fontsize=8)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
