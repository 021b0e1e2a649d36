"""Side-by-side end-to-end run: one fresh engine per kv-cache dtype, same workload, same call.

Writes per-dtype logs and a summary JSON with KV capacity (vLLM's own "GPU KV cache size" log
line: the hi pool), the most tokens resident at once and the preemptions (the `mikv stats` log
line, which the mikv scheduler and, for stock dtypes, benchmarks/residency_probe.py write),
throughput, ratios to `auto`, and the greedy token match of each dtype vs `auto`. Rows are also
appended to e2e_capacity.json ({kv, workload, kv_tokens, wall_s, gen_tok_s, total_tok_s,
preemptions, p50_ms, p99_ms}; latencies come from e2e_serve_sweep.py)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from benchmarks.harness.proc import run_logged  # noqa: E402
from benchmarks.harness.stats import token_match  # noqa: E402
from mikv_vllm.stats import last_logged  # noqa: E402

KV_TOKENS = re.compile(r"GPU KV cache size: ([\d,]+) tokens")


def kv_tokens_in_log(text: str) -> int | None:
    """KV capacity in tokens, from vLLM's own "GPU KV cache size" log line."""
    m = KV_TOKENS.search(text)
    return int(m.group(1).replace(",", "")) if m else None


def run_one(kv: str, args, out_dir: str) -> dict:
    tag = f"{kv}_{args.tag}" if args.tag else kv
    result_path = os.path.join(out_dir, f"e2e_{tag}.json")
    log_path = os.path.join(out_dir, f"e2e_{tag}.log")
    cmd = [sys.executable, os.path.join(HERE, "e2e_llm.py"), "--model", args.model, "--kv", kv,
           "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--max-model-len", str(args.max_model_len),
           "--probe-prompts", str(args.probe_prompts), "--out", result_path]
    if kv == "mikv" and args.mikv_knobs:
        cmd += ["--knobs", args.mikv_knobs]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    if args.gpu_util is not None:
        cmd += ["--gpu-memory-utilization", str(args.gpu_util)]
    if args.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    for flag in ("load_format", "dtype", "tokenizer", "probe_file", "probe_tokens",
                 "attention_config", "kv_cache_memory_bytes", "workload",
                 "distributed_executor_backend"):
        if getattr(args, flag) is not None:
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.enforce_eager:
        cmd += ["--enforce-eager"]
    if args.profile_prompts:
        cmd += ["--profile-prompts", str(args.profile_prompts),
                "--profile-dir", os.path.join(out_dir, f"profile_{tag}")]
        if args.profile_window:
            cmd += ["--profile-window", *map(str, args.profile_window)]
    t0 = time.time()
    rc = run_logged(cmd, log_path, args.timeout)
    text = open(log_path).read()
    row = {"kv": kv, "rc": rc, "process_s": round(time.time() - t0, 1)}
    row.update(log_counters(text))
    if rc == 0 and os.path.exists(result_path):
        row.update(json.load(open(result_path)))
    else:
        row["error_tail"] = text[-3000:]
    return row


def log_counters(text: str) -> dict:
    """Capacity, residency and preemptions read from one engine's log."""
    stats = last_logged(text) or {}
    return {"kv_capacity_tokens": kv_tokens_in_log(text),
            "kv_tokens": stats.get("max_resident_tokens"),
            "preemptions": stats.get("preemptions_total"),
            "lo_pages_end": stats.get("lo_pages"), "demotions": stats.get("demotions_total")}


def summarize(rows: list[dict]) -> list[dict]:
    """Ratios to `auto` and greedy token match vs `auto` for every dtype that ran."""
    base = next((r for r in rows if r["kv"] == "auto" and "probe_tokens" in r), None)
    for r in rows:
        if base and "probe_tokens" in r:
            if "total_tok_s" in r and "total_tok_s" in base:
                r["total_vs_auto"] = r["total_tok_s"] / base["total_tok_s"]
                r["gen_vs_auto"] = r["gen_tok_s"] / base["gen_tok_s"]
            for key in ("kv_tokens", "kv_capacity_tokens"):
                if r.get(key) and base.get(key):
                    r[f"{key}_vs_auto"] = r[key] / base[key]
            r["greedy_vs_auto"] = token_match(base["probe_tokens"], r["probe_tokens"])
    return [{k: v for k, v in r.items() if k != "probe_tokens"} for r in rows]


def load_row(kv: str, args) -> dict:
    """A row rebuilt from the files run_one left behind (for --summarize-only)."""
    tag = f"{kv}_{args.tag}" if args.tag else kv
    text = open(os.path.join(args.out_dir, f"e2e_{tag}.log")).read()
    row = {"kv": kv, "rc": 0, **log_counters(text)}
    row.update(json.load(open(os.path.join(args.out_dir, f"e2e_{tag}.json"))))
    return row


CAPACITY_KEYS = ("kv", "workload", "kv_tokens", "kv_capacity_tokens", "wall_s", "gen_tok_s",
                 "total_tok_s", "preemptions", "p50_ms", "p99_ms", "knobs", "block_size")
# kept where a run has them
EXTRA_KEYS = ("demotions", "prefix_cache_hit_rate", "seed", "slo", "p99_ttft_ms", "p99_tpot_ms",
              "goodput_req_s")


def append_capacity_rows(rows: list[dict], path: str) -> None:
    """Add this run's rows to e2e_capacity.json (rows of the same kv and workload replaced)."""
    old = json.load(open(path)) if os.path.exists(path) else []
    new = [{**{k: r.get(k) for k in CAPACITY_KEYS}, **{k: r[k] for k in EXTRA_KEYS if k in r}}
           for r in rows if "total_tok_s" in r]
    keys = {(r["kv"], r["workload"], r["knobs"]) for r in new}
    old = [r for r in old if (r["kv"], r["workload"], r.get("knobs")) not in keys]
    json.dump(old + new, open(path, "w"), indent=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(HERE, "configs", "llama-3.1-8b"))
    p.add_argument("--kv", nargs="+", default=["auto", "fp8", "mikv"])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=4096,
                   help="e.g. 33280 for 64 x (32K + 512)")
    p.add_argument("--timeout", type=int, default=240, help="seconds per dtype")
    p.add_argument("--probe-prompts", type=int, default=16, help="greedy-match prompts")
    p.add_argument("--mikv-knobs", default=None, help="JSON knobs for the mikv run")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--gpu-util", type=float, default=None,
                   help="--gpu-memory-utilization of every engine (default e2e_llm's 0.9; lower "
                        "it to put a larger GPU's pool under a smaller one's pressure)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="the same fixed KV pool for every dtype (instead of --gpu-util)")
    p.add_argument("--workload", default=None, help="the rows' workload name")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--distributed-executor-backend", default=None,
                   help="vLLM's executor for every engine: mp or ray")
    p.add_argument("--tag", default="", help="suffix of this run's file names")
    p.add_argument("--load-format", default=None, help="e.g. auto for a real model")
    p.add_argument("--dtype", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--probe-file", default=None, help="JSON token-id prompts for the probe")
    p.add_argument("--probe-tokens", type=int, default=None, help="greedy tokens per probe")
    p.add_argument("--attention-config", default=None,
                   help='JSON for every engine, e.g. \'{"flash_attn_version": 2}\' (A100 route)')
    p.add_argument("--enforce-eager", action="store_true", help="every engine eager (checks)")
    p.add_argument("--profile-prompts", type=int, default=0,
                   help="after each timed run, this many prompts under vLLM's torch profiler "
                        "(OUT/profile_<kv>_<tag>/)")
    p.add_argument("--profile-window", type=int, nargs=2, default=None, metavar=("SKIP", "STEPS"),
                   help="of the profiled run, trace STEPS engine steps after the first SKIP")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    p.add_argument("--summarize-only", action="store_true",
                   help="rebuild e2e_summary.json from the per-dtype files in --out-dir")
    args = p.parse_args()
    if args.summarize_only:
        rows = [load_row(kv, args) for kv in args.kv]
    else:
        rows = [run_one(kv, args, args.out_dir) for kv in args.kv]
    rows = summarize(rows)
    name = f"e2e_summary_{args.tag}.json" if args.tag else "e2e_summary.json"
    json.dump(rows, open(os.path.join(args.out_dir, name), "w"), indent=1)
    append_capacity_rows(rows, os.path.join(args.out_dir, "e2e_capacity.json"))
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "error_tail"}))
        if "error_tail" in r:
            print(r["error_tail"][-1500:])


if __name__ == "__main__":
    main()
