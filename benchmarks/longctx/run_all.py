"""The whole real-path run: every method through vLLM on the same trials, one process each, in
order of priority, until a deadline; then the report.

    python benchmarks/longctx/run_all.py --model DIR --out-dir OUT [--trials-per-cell 50] \
        [--lengths 4096 8192 16384] [--deadline-s 1500] [--methods auto mikv@0.25 ...]

Makes the trials (suite.py) if OUT has none, runs `vllm_run.py` per method, logs in
OUT/log_<method>.txt, and finally `report.py` over OUT. mikv-pressure runs once per length, in
a KV pool of a quarter of the tokens `auto` held at once on the same batch (its cells in OUT):
the same concurrency in a quarter of the memory. (A quarter of the whole batch creates no
pressure: vLLM admits a request only when its whole prompt fits, and these answers are short,
so few requests are ever decoding at once.) A method that cannot finish before the deadline is
stopped; the lengths it completed are kept."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# Priority order: the reference, the method under test, the formats it must beat, the rest.
PLAN = ["auto", "mikv@0.25", "int4_per_token_head", "turboquant_3bit_nc", "fp8",
        "turboquant_4bit_nc", "mikv-pressure", "mikv@min", "mikv@0.25-nowindow"]
SHORT = {"mikv@0.25-nowindow": 2}  # the A/B of the window scores: the two shorter lengths


def make_trials(model: str, path: str, lengths, trials: int, seed: int) -> None:
    from transformers import AutoTokenizer

    import suite
    t0 = time.time()
    tr = suite.make_trials(AutoTokenizer.from_pretrained(model), lengths=lengths, trials=trials,
                           seed=seed)
    suite.save(tr, path)
    print(f"longctx: {len(tr)} trials in {time.time() - t0:.0f}s -> {path}", flush=True)


def pressure_pool(out_dir: str, length: int) -> list[str]:
    """--pool-tokens for mikv-pressure: a quarter of auto's peak residency at `length`."""
    path = os.path.join(out_dir, "cells_auto.jsonl")
    peaks = [c["max_resident_tokens"] for c in map(json.loads, open(path))
             if c["length"] == length and c.get("max_resident_tokens")] \
        if os.path.exists(path) else []
    return ["--pool-tokens", str(peaks[-1] // 4)] if peaks else []


def run(cmd: list[str], log: str, deadline: float) -> str:
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
            return f"rc={rc}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return "stopped at the deadline"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--trials-per-cell", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=PLAN)
    ap.add_argument("--deadline-s", type=float, default=1e9, help="from now; no method starts "
                    "later than 60 s before it")
    ap.add_argument("--trials-only", action="store_true", help="make OUT/trials.jsonl and stop")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="passed on to vllm_run.py (after --extra)")
    a = ap.parse_args(argv)
    deadline = time.time() + a.deadline_s
    os.makedirs(a.out_dir, exist_ok=True)
    trials = os.path.join(a.out_dir, "trials.jsonl")
    if not os.path.exists(trials):
        make_trials(a.model, trials, a.lengths, a.trials_per_cell, a.seed)
    if a.trials_only:
        return
    for name in a.methods:
        lengths = a.lengths[:SHORT.get(name, len(a.lengths))]
        runs = [[n] for n in lengths] if name == "mikv-pressure" else [lengths]
        for group in runs:
            if time.time() > deadline - 60:
                print(f"longctx: {name} {group} not run (deadline)", flush=True)
                continue
            cmd = [sys.executable, os.path.join(HERE, "vllm_run.py"), "--model", a.model,
                   "--trials", trials, "--method", name, "--out-dir", a.out_dir,
                   "--limit", str(a.trials_per_cell), "--lengths", *map(str, group), *a.extra]
            if name == "mikv-pressure":
                cmd += pressure_pool(a.out_dir, group[0])
            t0 = time.time()
            status = run(cmd, os.path.join(a.out_dir, f"log_{name}.txt"), deadline)
            print(f"longctx: {name} {group}: {status} after {time.time() - t0:.0f}s", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, "report.py"), a.out_dir])


if __name__ == "__main__":
    main()
