"""One engine, one kv-cache dtype: a greedy token probe, then offline throughput.

Run once per dtype in a fresh process (e2e_compare.py does that) so that every dtype gets the
whole GPU. Dummy weights of a real architecture give real shapes and timings, not real text;
with `--load-format auto`, a real model (e.g. the SmolLM2 GGUF) and `--probe-file` (token ids
of real text, made by benchmarks/models/prepare_smollm2.py) the probe compares real greedy
continuations, and `--num-prompts 0` skips the throughput part."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="directory with a config.json")
    p.add_argument("--kv", required=True, help="--kv-cache-dtype value")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--probe-prompts", type=int, default=16)
    p.add_argument("--probe-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="a fixed KV pool for every dtype (instead of a share of the GPU)")
    p.add_argument("--workload", default=None, help="the rows' workload name (default NxIN+OUT)")
    p.add_argument("--knobs", default=None, help="mikv knobs as JSON, e.g. '{\"hi_budget\": 0.1}'")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--distributed-executor-backend", default=None, help="mp or ray")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--probe-file", default=None, help="JSON list of prompt token-id lists")
    p.add_argument("--attention-config", default=None,
                   help='vLLM\'s attention config as JSON, e.g. \'{"flash_attn_version": 2}\'')
    p.add_argument("--enforce-eager", action="store_true",
                   help="no torch.compile or CUDA graphs: starts in seconds, for checks")
    p.add_argument("--profile-prompts", type=int, default=0,
                   help="after the timed run, this many new prompts of the same shape under "
                        "vLLM's torch profiler (traces and CUDA time table in --profile-dir)")
    p.add_argument("--profile-dir", default=None)
    p.add_argument("--profile-window", type=int, nargs=2, default=None,
                   metavar=("SKIP", "STEPS"),
                   help="trace only STEPS engine steps, SKIP steps into the profiled run (a "
                        "steady state of a long run, in a trace of a manageable size)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    extra = {}
    if a.kv == "mikv":
        extra["additional_config"] = {"mikv": json.loads(a.knobs or "{}")}
    else:  # the same resident-token and preemption log line as mikv's scheduler
        sys.path.insert(0, HERE)
        os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
        extra["scheduler_cls"] = "residency_probe.ProbeAsyncScheduler"
    if a.block_size:
        extra["block_size"] = a.block_size
    if a.tokenizer:
        extra["tokenizer"] = a.tokenizer
    if a.attention_config:
        extra["attention_config"] = json.loads(a.attention_config)
    if a.kv_cache_memory_bytes:
        extra["kv_cache_memory_bytes"] = a.kv_cache_memory_bytes
    if a.distributed_executor_backend:
        extra["distributed_executor_backend"] = a.distributed_executor_backend
    if a.profile_prompts:
        # Created with the engine, started only around the profiled run: the timed run is not
        # traced. No stacks: they would slow the Python side that is being compared.
        extra["profiler_config"] = {"profiler": "torch", "torch_profiler_with_stack": False,
                                    "torch_profiler_dir": os.path.abspath(a.profile_dir)}
        if a.profile_window:
            extra["profiler_config"].update(delay_iterations=a.profile_window[0],
                                            max_iterations=a.profile_window[1])

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=a.model, load_format=a.load_format, skip_tokenizer_init=not a.tokenizer,
              kv_cache_dtype=a.kv, gpu_memory_utilization=a.gpu_memory_utilization,
              max_model_len=a.max_model_len, dtype=a.dtype, seed=0,
              tensor_parallel_size=a.tensor_parallel_size, enforce_eager=a.enforce_eager, **extra)
    rng = random.Random(1234)

    def random_prompt(length: int) -> TokensPrompt:
        return TokensPrompt(prompt_token_ids=[rng.randrange(32000) for _ in range(length)])

    if a.probe_file:
        probe = [TokensPrompt(prompt_token_ids=ids)
                 for ids in json.load(open(a.probe_file))[:a.probe_prompts]]
    else:
        probe = [random_prompt(rng.randrange(50, 1500)) for _ in range(a.probe_prompts)]
    greedy = SamplingParams(temperature=0.0, max_tokens=a.probe_tokens, ignore_eos=True,
                            detokenize=False)
    probe_out = [list(o.outputs[0].token_ids) for o in llm.generate(probe, greedy)] if probe else []

    result = {"kv": a.kv, "knobs": a.knobs, "block_size": a.block_size,
              "tensor_parallel_size": a.tensor_parallel_size,
              "attention_config": a.attention_config, "probe_tokens": probe_out}
    if not a.num_prompts:
        json.dump(result, open(a.out, "w"))
        return
    prompts = [random_prompt(a.input_len) for _ in range(a.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True,
                            detokenize=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    total = gen + sum(len(o.prompt_token_ids) for o in outs)
    result.update(workload=a.workload or f"{a.num_prompts}x({a.input_len}+{a.output_len})",
                  kv_cache_memory_bytes=a.kv_cache_memory_bytes, wall_s=wall,
                  gen_tok_s=gen / wall, total_tok_s=total / wall)
    if a.profile_prompts:  # new prompts: the prefix cache would skip the timed run's prefills
        prompts = [random_prompt(a.input_len) for _ in range(a.profile_prompts)]
        llm.start_profile()
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        result["profiled_wall_s"] = time.perf_counter() - t0
        llm.stop_profile()
    json.dump(result, open(a.out, "w"))


if __name__ == "__main__":
    main()
