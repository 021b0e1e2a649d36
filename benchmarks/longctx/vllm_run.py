"""One KV format through vLLM on the suite's trials: greedy answers, scored, one JSON line each.

    python benchmarks/longctx/vllm_run.py --model DIR --trials trials.jsonl --method mikv@0.25 \
        --out-dir OUT [--lengths 4096 8192 16384] [--limit 50]

Runs in one process with vLLM's engine core in it (VLLM_ENABLE_V1_MULTIPROCESSING=0), so that
the scheduler's own counters give each cell's KV bytes (mikv: its pages at the moment each
request left, `PageStats.left_*`; the stock formats: their pool's bytes per token) and
preemptions. All trials of a length go to `generate` at once; prefix caching is off, so every
request owns its pages (a shared page is never demoted). Writes `answers_<method>.jsonl` (a
line per trial) and `cells_<method>.jsonl` (a line per length)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import suite  # noqa: E402
from methods import head_size, methods  # noqa: E402

ANSWER_ROOM = 64  # tokens past the longest prompt (answers are at most 48)


def engine_args(m, a, max_len: int, pool_bytes: int | None) -> dict:
    kw = dict(model=a.model, tokenizer=a.model, dtype="bfloat16", kv_cache_dtype=m.kv_cache_dtype,
              max_model_len=max_len, gpu_memory_utilization=a.gpu_util, seed=0,
              enable_prefix_caching=False, enforce_eager=a.eager,
              max_num_batched_tokens=a.max_num_batched_tokens, disable_log_stats=True)
    if pool_bytes:
        kw["kv_cache_memory_bytes"] = pool_bytes
    if m.is_mikv:
        kw["additional_config"] = {"mikv": dict(m.knobs)}
    else:  # the same preemption counters for the stock formats
        kw["scheduler_cls"] = "residency_probe.ProbeAsyncScheduler"
    return kw


def pool_bytes_per_token(sched) -> float:
    cfg = sched.kv_cache_config
    block = cfg.kv_cache_groups[0].kv_cache_spec.block_size
    return sum(t.size for t in cfg.kv_cache_tensors) / (cfg.num_blocks * block)


def bf16_bytes_per_token(hf_config) -> int:
    return 2 * 2 * hf_config.num_key_value_heads * head_size(hf_config) * \
        hf_config.num_hidden_layers


def run_length(llm, sched, m, trials, hf_config) -> tuple[list[dict], dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    stats = sched.page_stats.stats
    stats.max_resident_tokens = 0  # this length's peak
    before = dict(stats.as_dict())
    prompts = [TokensPrompt(prompt_token_ids=t.prompt_ids) for t in trials]
    params = [SamplingParams(temperature=0.0, max_tokens=t.max_tokens) for t in trials]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    after = stats.as_dict()
    rows = []
    for t, o in zip(trials, outs):
        text = o.outputs[0].text
        rows.append(dict(method=m.name, key=t.key, task=t.task, length=t.length, index=t.index,
                         depth=t.depth, digest=t.digest(), prompt_tokens=len(t.prompt_ids),
                         text=text, correct=suite.score(t, text)))
    d = {k: after[k] - before[k] for k in ("left_pages", "left_lo_pages", "left_mid_pages",
                                           "preemptions_total", "demotions_total",
                                           "left_requests")}
    if m.is_mikv:
        ratio = sched.page_stats.bytes_ratio(d["left_pages"], d["left_lo_pages"],
                                             d["left_mid_pages"])
    else:
        ratio = pool_bytes_per_token(sched) / bf16_bytes_per_token(hf_config)
    cell = dict(method=m.name, kv_cache_dtype=m.kv_cache_dtype, knobs=m.knobs,
                length=trials[0].length, n=len(trials), wall_s=round(wall, 2),
                prompt_tokens=sum(len(t.prompt_ids) for t in trials), kv_bytes_ratio=ratio,
                preemptions=d["preemptions_total"], demotions=d["demotions_total"],
                max_resident_tokens=after["max_resident_tokens"],
                lo_page_share=(d["left_lo_pages"] / d["left_pages"]) if d["left_pages"] else None,
                mid_page_share=(d["left_mid_pages"] / d["left_pages"]) if d["left_pages"] else None,
                kv_pool_tokens=sched.kv_cache_config.num_blocks
                * sched.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size)
    return rows, cell


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (weights + tokenizer)")
    ap.add_argument("--trials", required=True, help="suite.py's trials.jsonl")
    ap.add_argument("--method", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--tasks", nargs="+", default=None, choices=suite.TASKS,
                    help="a shard of the suite (its files then end in _<TAG>)")
    ap.add_argument("--tag", default=None, help="suffix of this shard's answers and cells files")
    ap.add_argument("--limit", type=int, default=None, help="trials per cell")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--gpu-util", type=float, default=0.7,
                    help="leaves ~40 GiB of an H200 to the harness running beside (sim_run.py)")
    ap.add_argument("--kv-gib", type=float, default=None,
                    help="a fixed KV pool (GiB) instead of profiling: for engines sharing a GPU")
    ap.add_argument("--pool-tokens", type=int, default=None,
                    help="mikv-pressure: KV pool in tokens (default: a quarter of the batch's)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=32768,
                    help="so that a 16K prompt is prefilled in one step beside the decodes")
    ap.add_argument("--no-eager", dest="eager", action="store_false",
                    help="torch.compile and CUDA graphs (slower start, same answers)")
    a = ap.parse_args(argv)

    from transformers import AutoConfig
    from vllm import LLM

    hf_config = AutoConfig.from_pretrained(a.model)
    m = methods(hf_config.num_key_value_heads, head_size(hf_config))[a.method]
    trials = [t for t in suite.load(a.trials)
              if (a.lengths is None or t.length in a.lengths)
              and (a.tasks is None or t.task in a.tasks)
              and (a.limit is None or t.index < a.limit)]
    lengths = sorted({t.length for t in trials})
    if m.pressure and len(lengths) != 1:
        ap.error(f"{m.name}: one length per run (its pool is a quarter of that length's batch)")
    os.makedirs(a.out_dir, exist_ok=True)
    tag = f"{m.name}_{a.tag}" if a.tag else m.name
    answers = os.path.join(a.out_dir, f"answers_{tag}.jsonl")
    cells = os.path.join(a.out_dir, f"cells_{tag}.jsonl")
    batch_tokens = sum(len(t.prompt_ids) + t.max_tokens for t in trials)
    pool = (a.pool_tokens or batch_tokens // 4) * bf16_bytes_per_token(hf_config) \
        if m.pressure else int(a.kv_gib * 2**30) if a.kv_gib else None
    t0 = time.perf_counter()
    llm = LLM(**engine_args(m, a, max(lengths) + ANSWER_ROOM, pool))
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    print(f"longctx: {m.name} engine up in {time.perf_counter() - t0:.0f}s", flush=True)
    for n in lengths:
        rows, cell = run_length(llm, sched, m, [t for t in trials if t.length == n], hf_config)
        with open(answers, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(cells, "a") as f:
            f.write(json.dumps(cell) + "\n")
        acc = sum(r["correct"] for r in rows) / len(rows)
        print(f"longctx: {m.name} {n}: accuracy {acc:.3f} over {len(rows)}, bytes "
              f"{cell['kv_bytes_ratio']}, {cell['wall_s']}s, preemptions {cell['preemptions']}",
              flush=True)


if __name__ == "__main__":
    main()
