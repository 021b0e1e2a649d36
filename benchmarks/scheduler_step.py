"""CPU time per engine step of the scheduler: vLLM 0.26's Scheduler (kv `auto`) against
MikvScheduler (kv `mikv`), driven as the engine drives them (schedule -> update_from_output,
with a block-mass report every REPORT_EVERY steps as the workers send it). The scheduler runs
on the engine's critical path between GPU steps, so its extra milliseconds are a floor under
mikv's step time that no kernel can remove.

    python benchmarks/scheduler_step.py [--requests 128 --prompt 2048 --output 256]

Real vLLM objects on the CPU: EngineArgs -> VllmConfig of Llama-3.1-8B's config.json, one
full-attention layer's KVCacheConfig, Request objects. Prints and writes JSON rows {scheduler,
knobs, steps, decode_ms_p50, decode_ms_p90, report_ms_p50, total_s}."""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import numpy as np

from benchmarks.harness.vllm_cpu import one_layer_kv_cache_config, pin_cpu_platform

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 16


def make(kv: str, knobs: dict | None, num_blocks: int, max_seqs: int, chunk: int, model: str):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    from mikv_vllm.integration.scheduler import MikvScheduler

    extra = {"additional_config": {"mikv": knobs or {}}} if kv == "mikv" else {}
    config = EngineArgs(model=model, kv_cache_dtype=kv, skip_tokenizer_init=True,
                        worker_cls="vllm.v1.worker.gpu_worker.Worker", block_size=BLOCK,
                        max_num_seqs=max_seqs, max_num_batched_tokens=chunk,
                        enable_prefix_caching=True, **extra).create_engine_config()
    config.cache_config.num_gpu_blocks = num_blocks
    hf = config.model_config.hf_config
    kv_config = one_layer_kv_cache_config(num_blocks, BLOCK, hf.num_key_value_heads,
                                          hf.hidden_size // hf.num_attention_heads)
    cls = MikvScheduler if kv == "mikv" else Scheduler
    return cls(config, kv_config, StructuredOutputManager(config), block_size=BLOCK,
               log_stats=True)


def run(kv: str, knobs: dict | None, args) -> dict:
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    from mikv_vllm.importance import REPORT_EVERY
    from mikv_vllm.integration import protocol

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    per_request = -(-(args.prompt + args.output) // BLOCK)
    num_blocks = args.blocks or int(args.requests * per_request * 1.1) + 64
    sched = make(kv, knobs, num_blocks, args.requests, args.chunk, args.model)
    rng = random.Random(0)
    for i in range(args.requests):
        sched.add_request(Request(f"r{i}", [rng.randrange(1000) for _ in range(args.prompt)],
                                  SamplingParams(max_tokens=args.output, ignore_eos=True),
                                  None, block_hasher=hasher))
    decode_ms, report_ms, steps, preemptions = [], [], 0, 0
    mass = np.random.default_rng(0).random(num_blocks, dtype=np.float32) / num_blocks
    start = time.perf_counter()
    while sched.has_requests():
        t0 = time.perf_counter()
        out = sched.schedule()
        preemptions += len(getattr(out, "preempted_req_ids", None) or ())
        ids = list(out.num_scheduled_tokens)
        decoding = all(sched.requests[r].num_computed_tokens > sched.requests[r].num_prompt_tokens
                       for r in ids)
        sampled = [[5] if sched.requests[r].num_computed_tokens >= sched.requests[r].num_prompt_tokens
                   else [] for r in ids]
        runner = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                   sampled_token_ids=sampled)
        steps += 1
        report = kv == "mikv" and decoding and steps % REPORT_EVERY == 0
        if report:
            protocol.put_block_mass(runner, mass)
        sched.update_from_output(out, runner)
        ms = (time.perf_counter() - t0) * 1e3
        if decoding and ids:
            (report_ms if report else decode_ms).append(ms)
    total = time.perf_counter() - start
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {"scheduler": type(sched).__name__, "kv": kv, "knobs": knobs, "steps": steps,
            "requests": args.requests, "prompt": args.prompt, "output": args.output,
            "num_blocks": num_blocks, "preemptions": preemptions, "decode_steps": len(decode_ms),
            "decode_ms_p50": pct(decode_ms, 50), "decode_ms_p90": pct(decode_ms, 90),
            "report_steps": len(report_ms), "report_ms_p50": pct(report_ms, 50),
            "mean_decode_step_ms": statistics.fmean(decode_ms + report_ms)
            if decode_ms or report_ms else None, "total_s": total}


def main() -> None:
    pin_cpu_platform()
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(HERE, "configs", "llama-3.1-8b"))
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--output", type=int, default=256)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--blocks", type=int, default=0, help="pool size (0: everything fits hi)")
    p.add_argument("--mikv-knobs", nargs="*", default=["{}", '{"hi_budget": 0.1}'],
                   help="JSON knob sets, one mikv run each")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args()
    rows = [run("auto", None, args)] + [run("mikv", json.loads(k), args)
                                        for k in args.mikv_knobs]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        json.dump(rows, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
