"""Arrival-rate sweep through `vllm serve` and vLLM's own OpenAI-protocol load generator
(`vllm bench serve`), one fresh server per kv-cache dtype, side by side in one call.

Dummy weights of a real architecture (benchmarks/configs/llama-3.1-8b) with any tokenizer
whose ids fit its vocabulary (e.g. SmolLM2's, see benchmarks/models/). Writes per-run JSON from
`vllm bench serve` and a summary with rows {kv, workload, kv_tokens, wall_s, gen_tok_s,
total_tok_s, preemptions, p50_ms, p99_ms (end-to-end per request), p99_ttft_ms, p99_tpot_ms,
goodput_req_s}. Goodput is vLLM's: requests per second that met every `--slo` (time to first
token, time per output token), the number an operator sizes a fleet by;
`benchmarks/goodput_table.py` tabulates it.

Each rate gets its own prompts (`vllm bench serve --seed`): with one seed for all, a later rate
replays the earlier rate's prompts and a server whose pool still holds them answers from its
prefix cache (fp8's did: 49.6% hits over two runs, nearly all of the second's, so its "2x
auto" at the unbounded rate of 2026-12-02 was that, not decode speed). The prefix-cache hit
rate of each run is recorded beside it."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

# this folder is on sys.path when run as a script; e2e_compare puts the checkout there too
from e2e_compare import append_capacity_rows, log_counters
from benchmarks.harness.server import running_server

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
COUNTERS = ("num_preemptions", "prefix_cache_queries", "prefix_cache_hits")


def counters(url: str) -> dict[str, float]:
    """vLLM's Prometheus counters in COUNTERS (summed over label sets; 0 where absent)."""
    try:
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    except OSError:
        text = ""
    return {name: sum(float(v) for v in re.findall(
        rf"^vllm:{name}_total(?:\{{[^}}]*\}})? ([\d.e+]+)$", text, re.M)) for name in COUNTERS}


def bench_args(rate: str, seed: int, name: str, a) -> list[str]:
    """`vllm bench serve`'s arguments for one run at `rate`, its result saved as `name`."""
    return ["--backend", "vllm", "--model", a.model, "--tokenizer", a.tokenizer,
            "--port", str(a.port), "--dataset-name", "random",
            "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
            "--num-prompts", str(a.num_prompts), "--request-rate", str(rate), "--ignore-eos",
            "--seed", str(seed),
            "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99",
            "--goodput", *a.slo,
            "--save-result", "--result-dir", a.out_dir, "--result-filename", name]


def bench_one(kv: str, rate: str, seed: int, url: str, server_log: str, a) -> dict:
    """One `vllm bench serve` run at `rate` against the running server -> a capacity row."""
    name = f"bench_{kv}_rate{rate}.json"
    before = counters(url)
    with open(os.path.join(a.out_dir, f"bench_{kv}.log"), "a") as log:
        subprocess.run(CLI + ["bench", "serve", *bench_args(rate, seed, name, a)], check=True,
                       timeout=a.bench_timeout, stdout=log, stderr=subprocess.STDOUT)
    r = json.load(open(os.path.join(a.out_dir, name)))
    time.sleep(2.5)  # one more `mikv stats` line after the run went idle
    after = counters(url)
    delta = {k: after[k] - before[k] for k in COUNTERS}
    return {
        "kv": kv, "workload": f"serve {a.num_prompts}x({a.input_len}+{a.output_len}) "
                              f"at {rate} req/s, " + (
                                  f"{a.kv_cache_memory_bytes / 2**30:g} GiB KV pool"
                                  if a.kv_cache_memory_bytes else f"gpu util {a.gpu_util}"),
        "knobs": a.mikv_knobs if kv == "mikv" else None, "block_size": a.block_size,
        **log_counters(open(server_log).read()),  # kv_tokens: most resident so far
        "wall_s": r.get("duration"), "gen_tok_s": r.get("output_throughput"),
        "total_tok_s": r.get("total_token_throughput"),
        "preemptions": delta["num_preemptions"], "seed": seed,
        "prefix_cache_hit_rate": (delta["prefix_cache_hits"] / delta["prefix_cache_queries"]
                                  if delta["prefix_cache_queries"] else None),
        "p50_ms": r.get("p50_e2el_ms"), "p99_ms": r.get("p99_e2el_ms"),
        "rate": rate, "slo": " ".join(a.slo), "p99_ttft_ms": r.get("p99_ttft_ms"),
        "p99_tpot_ms": r.get("p99_tpot_ms"), "goodput_req_s": r.get("request_goodput"),
        "requests_per_s": r.get("request_throughput"), "completed": r.get("completed")}


def sweep_one(kv: str, a) -> list[dict]:
    url = f"http://127.0.0.1:{a.port}"
    log_path = os.path.join(a.out_dir, f"serve_{kv}.log")
    extra = ["--scheduler-cls", "residency_probe.ProbeAsyncScheduler"]  # same counters as mikv
    if kv == "mikv":
        extra = ["--additional-config", json.dumps({"mikv": json.loads(a.mikv_knobs or "{}")})]
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = CLI + ["serve", a.model, "--tokenizer", a.tokenizer, "--load-format", "dummy",
                 "--kv-cache-dtype", kv, "--port", str(a.port), "--max-model-len",
                 str(a.input_len + a.output_len + 64), "--gpu-memory-utilization", str(a.gpu_util), *extra]
    if a.block_size:
        cmd += ["--block-size", str(a.block_size)]
    if a.kv_cache_memory_bytes:
        cmd += ["--kv-cache-memory-bytes", str(a.kv_cache_memory_bytes)]
    rows = []
    try:
        with running_server(cmd, log_path, url, a.start_timeout, env):
            for i, rate in enumerate(a.rates):
                rows.append(bench_one(kv, rate, a.seed + i, url, log_path, a))
                print(json.dumps(rows[-1]), flush=True)
    except Exception as e:  # keep the other dtypes' rows
        rows.append({"kv": kv, "error": repr(e), "log_tail": open(log_path).read()[-2000:]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(HERE, "configs", "llama-3.1-8b"))
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--kv", nargs="+", default=["auto", "fp8", "int4_per_token_head", "mikv"])
    p.add_argument("--rates", nargs="+", default=["2", "8", "32", "inf"])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--gpu-util", type=float, default=0.9,
                   help="--gpu-memory-utilization of every server (lower it to put a larger "
                        "GPU's KV pool under the same pressure as a smaller one's)")
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--bench-timeout", type=float, default=600)
    p.add_argument("--mikv-knobs", default=None, help="JSON knobs for the mikv server")
    p.add_argument("--block-size", type=int, default=None, help="--block-size of every server")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="the same KV pool for every server (instead of --gpu-util's share)")
    p.add_argument("--slo", nargs="+", default=["ttft:5000", "tpot:100"],
                   help="goodput's objectives, vllm bench serve's KEY:MS pairs (default: the "
                        "first token within 5 s, then at least 10 tokens/s)")
    p.add_argument("--seed", type=int, default=1,
                   help="prompts of the i-th rate: seed + i (the same for every kv dtype)")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    rows = [row for kv in a.kv for row in sweep_one(kv, a)]
    json.dump(rows, open(os.path.join(a.out_dir, "e2e_serve_summary.json"), "w"), indent=1)
    append_capacity_rows(rows, os.path.join(a.out_dir, "e2e_capacity.json"))


if __name__ == "__main__":
    main()
