"""The suite's table: accuracy per (path, method, task, length) with Wilson intervals, the
KV bytes each method stored, the agreement of the CPU harness with vLLM, and the plot.

    python benchmarks/longctx/report.py RUN_DIR [RUN_DIR ...] [--json longctx.json]

RUN_DIR holds answers_<method>.jsonl (vllm_run.py: path "vllm"; sim_run.py: path "sim") and,
for vLLM, cells_<method>.jsonl (bytes per cell). Rows {model, task, length, method,
kv_bytes_ratio, score, ci_low, ci_high, n, path}; task "all" pools a cell's six tasks (equal
trials each, so its score is their mean). The agreement lists, per method and length, how often
the harness and vLLM score the same trial the same."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from benchmarks.harness.stats import wilson  # noqa: E402

MODEL = "Qwen2.5-Coder-1.5B-Instruct"


def read_jsonl(pattern: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


def load(run_dirs: list[str]) -> tuple[list[dict], dict]:
    answers, bytes_of = [], {}
    for d in run_dirs:
        for r in read_jsonl(os.path.join(d, "answers_*.jsonl")):
            r.setdefault("path", "vllm")
            answers.append(r)
        for c in read_jsonl(os.path.join(d, "cells_*.jsonl")):
            bytes_of[("vllm", c["method"], c["length"])] = c["kv_bytes_ratio"]
    sim_bytes = defaultdict(list)  # the harness writes each trial's bytes with its answer
    for r in answers:
        if r["path"] == "sim":
            sim_bytes[(r["method"], r["length"])].append(r["kv_bytes_ratio"])
    for (m, n), v in sim_bytes.items():
        bytes_of[("sim", m, n)] = sum(v) / len(v)
    return answers, bytes_of


def rows(answers: list[dict], bytes_of: dict, model: str = MODEL) -> list[dict]:
    groups = defaultdict(list)
    for r in answers:
        groups[(r["path"], r["method"], r["task"], r["length"])].append(bool(r["correct"]))
        groups[(r["path"], r["method"], "all", r["length"])].append(bool(r["correct"]))
    out = []
    for (path, method, task, length), hits in sorted(groups.items()):
        lo, hi = wilson(sum(hits), len(hits))
        ratio = bytes_of.get((path, method, length))
        out.append(dict(model=model, task=task, length=length, method=method,
                        kv_bytes_ratio=None if ratio is None else round(ratio, 4),
                        score=round(sum(hits) / len(hits), 4), ci_low=round(lo, 4),
                        ci_high=round(hi, 4), n=len(hits), path=path))
    return out


def agreement(answers: list[dict]) -> list[dict]:
    """Per (method, length): trials both paths ran, how often they agree, both accuracies with
    their intervals, and whether the intervals are apart."""
    by = defaultdict(dict)
    for r in answers:
        by[(r["method"], r["length"], r["key"])][r["path"]] = bool(r["correct"])
    cells = defaultdict(list)
    for (method, length, _), paths in by.items():
        if "sim" in paths and "vllm" in paths:
            cells[(method, length)].append((paths["vllm"], paths["sim"]))
    out = []
    for (method, length), pairs in sorted(cells.items()):
        n = len(pairs)
        v, s = sum(a for a, _ in pairs), sum(b for _, b in pairs)
        vi, si = wilson(v, n), wilson(s, n)
        out.append(dict(method=method, length=length, n=n, vllm=round(v / n, 4),
                        sim=round(s / n, 4), agree=round(sum(a == b for a, b in pairs) / n, 4),
                        vllm_ci=[round(x, 4) for x in vi], sim_ci=[round(x, 4) for x in si],
                        apart=vi[1] < si[0] or si[1] < vi[0]))
    return out


def paired_rows(answers: list[dict], bytes_of: dict, methods: list[str],
                model: str = MODEL) -> list[dict]:
    """vLLM rows of `methods` in the quality harness's row format (benchmarks/results/
    quality.json: task "longctx", size = context length), each with its paired difference to
    auto over the same trials (normal approximation, 95%)."""
    by = defaultdict(dict)
    for r in answers:
        if r["path"] == "vllm":
            by[(r["method"], r["length"])][r["key"]] = bool(r["correct"])
    out = []
    for method in methods:
        for (m, length), hits in sorted(by.items()):
            base = by.get(("auto", length), {})
            keys = [k for k in hits if k in base]
            if m != method or not keys:
                continue
            d = [int(hits[k]) - int(base[k]) for k in keys]
            n, mean = len(d), sum(d) / len(d)
            se = (sum((x - mean) ** 2 for x in d) / max(n - 1, 1) / n) ** 0.5
            lo, hi = wilson(sum(hits[k] for k in keys), n)
            ratio = bytes_of.get(("vllm", m, length))
            out.append(dict(model=model, task="longctx", method=m, budget=None,
                            score=round(sum(hits[k] for k in keys) / n, 4), ci_low=round(lo, 4),
                            ci_high=round(hi, 4), n=n,
                            kv_bytes_ratio=None if ratio is None else round(ratio, 4),
                            delta_vs_bf16=round(mean, 4), delta_ci_low=round(mean - 1.96 * se, 4),
                            delta_ci_high=round(mean + 1.96 * se, 4), size=length))
    return out


def plot(table: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = [r for r in table if r["path"] == "vllm"]
    tasks = ["all"] + sorted({r["task"] for r in real} - {"all"})
    methods = sorted({r["method"] for r in real} - {"auto"}) + ["auto"]  # the reference on top
    cols = 4
    fig, axes = plt.subplots(-(-len(tasks) // cols), cols, figsize=(4.2 * cols, 3.4 * -(
        -len(tasks) // cols)), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for m in methods:
            pts = sorted((r["length"], r["score"], r["ci_low"], r["ci_high"], r["kv_bytes_ratio"])
                         for r in real if r["task"] == task and r["method"] == m)
            if not pts:
                continue
            x = [p[0] for p in pts]
            b = pts[-1][4]
            ax.errorbar(x, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts],
                                                      [p[3] - p[1] for p in pts]],
                        marker="o", capsize=2, lw=2.2 if m.startswith("mikv") else 1.2,
                        ls="-" if m.startswith("mikv") else "--",
                        color="black" if m == "auto" else None,
                        label=f"{m} ({b:.2f} B)" if b is not None else m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["length"] for r in real}))
        ax.set_xticklabels([f"{n // 1024}K" for n in sorted({r["length"] for r in real})])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("mean of the six tasks" if task == "all" else task)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("exact match")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{MODEL} through vLLM 0.26: accuracy vs context length "
                 "(B: KV bytes over bf16's)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--json", default=None, help="default: first RUN_DIR/longctx.json")
    ap.add_argument("--png", default=None, help="default: the JSON's path with .png")
    ap.add_argument("--quality-json", default=None,
                    help="also put --quality-methods' rows (paired with auto) into this JSON of "
                    "the quality harness (its rows of task longctx replaced)")
    ap.add_argument("--quality-methods", nargs="+", default=[])
    a = ap.parse_args(argv)
    answers, bytes_of = load(a.run_dirs)
    if a.quality_json:
        doc = json.load(open(a.quality_json))
        doc["rows"] = [r for r in doc["rows"] if r["task"] != "longctx"] + paired_rows(
            answers, bytes_of, a.quality_methods)
        with open(a.quality_json, "w") as f:
            json.dump(doc, f, indent=1)
    table = rows(answers, bytes_of)
    out = a.json or os.path.join(a.run_dirs[0], "longctx.json")
    with open(out, "w") as f:
        json.dump(table, f, indent=1)
    agree = agreement(answers)
    if agree:
        with open(out.rsplit(".", 1)[0] + "_agreement.json", "w") as f:
            json.dump(agree, f, indent=1)
    try:
        plot(table, a.png or out.rsplit(".", 1)[0] + ".png")
    except ImportError as e:
        print(f"plot skipped: {e}")
    for r in table:
        if r["task"] == "all":
            print(f"{r['path']:4} {r['method']:22} {r['length']:6} bytes {r['kv_bytes_ratio']} "
                  f"score {r['score']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] n={r['n']}")
    for g in agree:
        print(f"agree {g['method']:22} {g['length']:6} n={g['n']} vllm {g['vllm']:.2f} sim "
              f"{g['sim']:.2f} agree {g['agree']:.2f}{' APART' if g['apart'] else ''}")


if __name__ == "__main__":
    main()
