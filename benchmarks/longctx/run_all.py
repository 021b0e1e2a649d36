"""The whole real-path run: every method through vLLM on the same trials, one process each, in
order of priority, until a deadline; then the report.

    python benchmarks/longctx/run_all.py --model DIR --out-dir OUT [--trials-per-cell 50] \
        [--lengths 4096 8192 16384] [--deadline-s 1500] [--methods auto mikv@0.25 ...] \
        [--parallel 3 --kv-gib 24]

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
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..")]  # suite.py, and the repo for benchmarks.*

import suite  # noqa: E402
from methods import PRESSURE  # noqa: E402

# Priority order: the reference, the method under test, the formats it must beat, the rest.
PLAN = ["auto", "mikv@0.25", "int4_per_token_head", "turboquant_3bit_nc", "fp8",
        "turboquant_4bit_nc", "mikv-pressure", "mikv@min", "mikv@0.25-nowindow",
        "mikv-tier@0.25", "mikv-tier@0.35", "mikv@0.35", "mikv-tier-pressure",
        "mikv-kout-tier@0.25", "mikv-kout-tier@0.35", "mikv-tier@0.5"]
SHORT = {"mikv@0.25-nowindow": 2}  # the A/B of the window scores: the two shorter lengths


def make_trials(model: str, path: str, lengths, trials: int, seed: int) -> None:
    from transformers import AutoTokenizer

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


class Jobs:
    """Method runs (one vLLM process each), up to `parallel` at once on the one GPU: engine
    start-up is mostly CPU work, so runs overlap it with each other's answering. mikv-pressure
    waits for auto, whose peak residency sizes its pool."""

    def __init__(self, parallel: int, deadline: float):
        self.parallel, self.deadline = parallel, deadline
        self.pending: list[tuple[str, list[int], list[str], str]] = []
        self.running: dict[subprocess.Popen, tuple[str, list[int], float, object]] = {}

    def add(self, name: str, group: list[int], cmd: list[str], log: str) -> None:
        self.pending.append((name, group, cmd, log))

    def _ready(self, name: str) -> bool:
        """One run per method (or shard of it) at a time: they append to the same files."""
        running = [n for n, *_ in self.running.values()]
        waits = "auto" in [n.split("#")[0] for n in running + [n for n, *_ in self.pending]]
        return name not in running and not (name in PRESSURE and waits)

    def _reap(self) -> None:
        for proc, (name, group, t0, f) in list(self.running.items()):
            if proc.poll() is not None or time.time() > self.deadline:
                status = f"rc={proc.returncode}" if proc.returncode is not None \
                    else "stopped at the deadline"
                if proc.returncode is None:
                    proc.kill()
                    proc.wait()
                f.close()
                del self.running[proc]
                print(f"longctx: {name} {group}: {status} after {time.time() - t0:.0f}s",
                      flush=True)

    def run(self, extra_for) -> None:
        """Runs everything; `extra_for(name, group)` gives arguments decided at start time."""
        while self.pending or self.running:
            self._reap()
            while self.pending and len(self.running) < self.parallel:
                if time.time() > self.deadline - 60:
                    for name, group, *_ in self.pending:
                        print(f"longctx: {name} {group} not run (deadline)", flush=True)
                    self.pending.clear()
                    break
                job = next((j for j in self.pending if self._ready(j[0])), None)
                if job is None:
                    break
                self.pending.remove(job)
                name, group, cmd, log = job
                f = open(log, "a")
                proc = subprocess.Popen(cmd + extra_for(name, group), stdout=f,
                                        stderr=subprocess.STDOUT)
                self.running[proc] = (name, group, time.time(), f)
            time.sleep(2)


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
    ap.add_argument("--parallel", type=int, default=1,
                    help="methods run at once on the GPU (needs --kv-gib: each engine then "
                    "gets a fixed pool instead of profiling memory that the others are using)")
    ap.add_argument("--kv-gib", type=float, default=None,
                    help="each engine's KV pool in GiB (mikv-pressure keeps its own)")
    ap.add_argument("--gpu-util", type=float, default=0.2,
                    help="with --kv-gib: the free share of the GPU each engine needs to start")
    ap.add_argument("--shards", type=int, default=1,
                    help="split each method's tasks over this many engines at once (the "
                    "pressure runs excepted: their pool is sized for the whole batch)")
    ap.add_argument("--trials-only", action="store_true", help="make OUT/trials.jsonl and stop")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="passed on to vllm_run.py (after --extra)")
    a = ap.parse_args(argv)
    if a.parallel > 1 and not a.kv_gib:
        ap.error("--parallel needs --kv-gib")
    deadline = time.time() + a.deadline_s
    os.makedirs(a.out_dir, exist_ok=True)
    trials = os.path.join(a.out_dir, "trials.jsonl")
    if not os.path.exists(trials):
        make_trials(a.model, trials, a.lengths, a.trials_per_cell, a.seed)
    if a.trials_only:
        return
    jobs = Jobs(a.parallel, deadline)
    shared = ["--gpu-util", str(a.gpu_util)] if a.kv_gib else []  # engines sharing the GPU
    for name in a.methods:
        lengths = a.lengths[:SHORT.get(name, len(a.lengths))]
        pressure = name in PRESSURE
        shards = 1 if pressure else a.shards
        for group in [[n] for n in lengths] if pressure else [lengths]:
            for k in range(shards):
                cmd = [sys.executable, os.path.join(HERE, "vllm_run.py"), "--model", a.model,
                       "--trials", trials, "--method", name, "--out-dir", a.out_dir,
                       "--limit", str(a.trials_per_cell), "--lengths", *map(str, group),
                       *a.extra]
                if shards > 1:
                    cmd += ["--tasks", *suite.TASKS[k::shards], "--tag", f"shard{k}"]
                if a.kv_gib and not pressure:
                    cmd += ["--kv-gib", str(a.kv_gib)]
                job = f"{name}#{k}" if shards > 1 else name
                jobs.add(job, group, cmd + shared, os.path.join(a.out_dir, f"log_{job}.txt"))
    jobs.run(lambda name, group: pressure_pool(a.out_dir, group[0])
             if name in PRESSURE else [])
    subprocess.run([sys.executable, os.path.join(HERE, "report.py"), a.out_dir])


if __name__ == "__main__":
    main()
