"""Quality table of mikv vs bf16 / fp8 / int4 / KIVI-2bit / H2O eviction on real models (CPU).

    python benchmarks/quality/run.py --quick                       # minutes: CI-sized smoke
    python benchmarks/quality/run.py --task perplexity             # SmolLM2 PPL sweep
    python benchmarks/quality/run.py --task line_retrieval --model Qwen2.5-Coder-0.5B-Instruct \
        --sizes 60 --trials 20 --methods bf16 kivi2 h2o@0.25 mikv@0.25 --append
    python benchmarks/quality/run.py --task greedy --probe-file .models/parts/probe_wiki.json \
        --probe-tokens 64 --recent-pages 4 --methods bf16 fp8 --hi-budgets 0.5 0.1

Rows {model, task, method, budget, kv_bytes_ratio, score, ci_low, ci_high, n, size} go to
--out (rewritten after every window / trial, so partial runs keep their numbers) plus a PNG."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchmarks.harness import kvsim, models, tasks  # noqa: E402
from benchmarks.harness.methods import (PRODUCT, Method, hi_fraction, lo_cost,  # noqa: E402
                                    parse_method, standard_methods)

QUICK_METHODS = ["bf16", "kivi2", "h2o@0.25", "mikv@0.25"]


def hi_budget_method(hi_budget: float, layout) -> Method:
    """mikv as the product's `hi_budget` knob sets it (the fraction of pages kept hi): mikv@b
    at the byte budget b whose hi fraction is `hi_budget` (or the next float above it, so the
    policy's round(hi_budget * pages) rounds .5 the same way)."""
    m = Method("mikv", hi_budget + (1 - hi_budget) * lo_cost(layout), lo="q2")
    while hi_fraction(m, layout) < hi_budget:
        m = Method("mikv", math.nextafter(m.budget, 1.0), lo="q2")
    assert hi_fraction(m, layout) - hi_budget < 1e-12
    return m


class Results:
    def __init__(self, out: str, plot: str | None, append: bool, meta: dict):
        self.out, self.plot, self.meta = out, plot, meta
        self.rows: dict[tuple, dict] = {}
        if append and os.path.exists(out):
            for r in json.load(open(out))["rows"]:
                self.rows[self._key(r)] = r

    @staticmethod
    def _key(r):
        return r["model"], r["task"], r["method"], r["budget"], r.get("size")

    def update(self, model: str, task: str, rows: dict[str, dict], **extra):
        for r in rows.values():
            row = dict(model=model, task=task, **r, **extra)
            self.rows[self._key(row)] = row
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        with open(self.out + ".tmp", "w") as f:
            json.dump(dict(meta=self.meta, rows=list(self.rows.values())), f, indent=1)
        os.replace(self.out + ".tmp", self.out)
        if self.plot:
            try:
                from plot import make_plot
                make_plot(list(self.rows.values()), self.plot)
            except ImportError as e:  # matplotlib missing: JSON still written
                print(f"plot skipped: {e}", file=sys.stderr)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SmolLM2: PPL 2x256 + tiny retrieval")
    ap.add_argument("--task",
                    choices=["perplexity", "line_retrieval", "kv_retrieval", "greedy"])
    ap.add_argument("--model", default=models.SMOLLM2)
    ap.add_argument("--methods", nargs="+", help="e.g. bf16 fp8 int4 kivi2 kivi4 h2o@0.25 "
                    "mikv@0.25 mikv_bal@0.25 mikv_fp8hi@0.25 mikv_tier@0.25 (default: all at "
                    "--budgets)")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25, 0.15])
    ap.add_argument("--hi-budgets", nargs="+", type=float, default=[],
                    help="add mikv at the product's hi_budget knob (fraction of pages kept hi; "
                    "mikv@b is a fraction of bf16 bytes)")
    ap.add_argument("--windows", type=int, default=8, help="PPL windows (articles)")
    ap.add_argument("--window", type=int, default=512, help="PPL tokens per window")
    ap.add_argument("--prefill", type=int, default=64, help="PPL tokens prefilled at full precision")
    ap.add_argument("--chunk", type=int, default=32, help="PPL tokens per decode step")
    ap.add_argument("--sizes", nargs="+", type=int, default=[60], help="lines / pairs")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--probe-file", help="greedy: JSON list of prompt token-id lists (as "
                    "benchmarks/e2e_llm.py --probe-file)")
    ap.add_argument("--probe-prompts", type=int, default=16, help="greedy: prompts used")
    ap.add_argument("--probe-tokens", type=int, default=32, help="greedy: tokens per prompt")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--recent-pages", type=int, default=PRODUCT.recent_pages)
    ap.add_argument("--sink-pages", type=int, default=PRODUCT.sink_pages)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is much faster on "
                    "a busy 2-core box: small ops thrash OpenMP; run jobs side by side instead)")
    ap.add_argument("--out", default="benchmarks/results/quality.json")
    ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    ap.add_argument("--append", action="store_true", help="keep rows already in --out")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        jobs = [("perplexity", dict(windows=2, window=256)), ("line_retrieval", dict(sizes=[8],
                                                                                  trials=2))]
        methods = [parse_method(m) for m in (a.methods or QUICK_METHODS)]
    else:
        if not a.task:
            ap.error("give --quick or --task")
        if a.task == "greedy" and not a.probe_file:
            ap.error("--task greedy needs --probe-file")
        jobs = [(a.task, {})]
        methods = ([parse_method(m) for m in a.methods] if a.methods
                   else standard_methods(tuple(a.budgets)))
    plot = a.plot or a.out.rsplit(".", 1)[0] + ".png"
    meta = dict(block_size=a.block_size, sink_pages=a.sink_pages, recent_pages=a.recent_pages,
                prefill=a.prefill, chunk=a.chunk, seed=a.seed)
    if a.task == "greedy":
        meta.update(probe_file=a.probe_file, probe_prompts=a.probe_prompts)
    res = Results(a.out, plot, a.append, meta)
    t0 = time.time()
    model, tok = models.load(a.model, attn_implementation=kvsim.ATTN_IMPL)
    layout = kvsim.layout_of(model, a.block_size)
    print(f"loaded {a.model} in {time.time() - t0:.0f}s; {layout.describe()}", flush=True)
    methods += [hi_budget_method(h, layout) for h in a.hi_budgets]
    common = dict(block_size=a.block_size, recent_pages=a.recent_pages,
                  sink_pages=a.sink_pages)
    for task, over in jobs:
        o = {**vars(a), **over}
        if task == "perplexity":
            def cb(w, rows, task=task):
                res.update(a.model, task, rows, size=o["window"])
                print(f"[{time.time() - t0:.0f}s] ppl window {w}: " + ", ".join(
                    f"{k} {r['score']:.3f} ({r['kv_bytes_ratio']:.3f})" for k, r in rows.items()),
                    flush=True)
            tasks.perplexity(model, tok, methods, o["windows"], o["window"], a.prefill, a.chunk,
                             on_window=cb, **common)
        elif task == "greedy":
            def cb(p, rows, task=task):
                res.update(a.model, task, rows, size=a.probe_tokens)
                print(f"[{time.time() - t0:.0f}s] greedy prompt {p}: " + ", ".join(
                    f"{k} {r['score']:.3f} ({r['identical_sequences']})" for k, r in rows.items()),
                    flush=True)
            prompts = json.load(open(a.probe_file))[:a.probe_prompts]
            tasks.greedy_match(model, tok, methods, prompts, a.probe_tokens, on_prompt=cb,
                               **common)
        else:
            def cb(size, t, rows, task=task):
                res.update(a.model, task, {k: r for k, r in rows.items() if r["size"] == size})
                print(f"[{time.time() - t0:.0f}s] {task} size {size} trial {t}: " + ", ".join(
                    f"{k} {r['score']:.2f}" for k, r in rows.items() if r["size"] == size),
                    flush=True)
            tasks.retrieval(model, tok, task, methods, o["sizes"], o["trials"], a.seed,
                            on_trial=cb, **common)
    print(f"done in {time.time() - t0:.0f}s -> {a.out}", flush=True)
    return dict(meta=meta, rows=list(res.rows.values()))


if __name__ == "__main__":
    main()
