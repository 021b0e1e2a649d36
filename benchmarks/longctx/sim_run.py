"""The suite's trials through the quality harness (benchmarks/harness, transformers in fp32 on the
CPU or a GPU), on vLLM's timeline, for comparison with the real path.

    python benchmarks/longctx/sim_run.py --model-dir HF_DIR --trials trials.jsonl \
        --lengths 4096 --limit 10 --out-dir OUT [--methods auto fp8 mikv@0.25 ...]

vLLM's timeline: the whole prompt is prefilled at full precision (with mikv, the prompt's last
`prefill_window` tokens score its pages on the two sampled layers), the first answer token
comes from that prefill, the second from a decode step over the pages as prefilled, and from
the third on the pages are as the method stores them (mikv: demoted to its budget, ranked by
the window scores; the prefill's output is back only then under async scheduling). Decode
attention is measured one step in importance.REPORT_EVERY. Stored formats are the harness's
(methods.py there): its int4 is symmetric per token and head without vLLM's rotation, and the
first answer token of fp8 / int4 is computed exactly here but from the stored cache in vLLM.
turboquant and memory pressure have no harness counterpart. Writes
answers_sim_<method>.jsonl (path "sim")."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

import torch  # noqa: E402

import suite  # noqa: E402
from methods import head_size, lo_page_ratio, methods  # noqa: E402
from mikv_vllm.config import MikvConfig  # noqa: E402
from benchmarks.harness import kvsim  # noqa: E402
from benchmarks.harness.methods import Method  # noqa: E402
from mikv_vllm.importance import REPORT_EVERY  # noqa: E402

SIMULATED = {"auto": Method("bf16"), "fp8": Method("fp8", hi="fp8"),
             "int4_per_token_head": Method("int4", hi="int4")}


def sim_method(m, lo: float) -> tuple[Method, MikvConfig] | None:
    """The harness's Method for a suite method (None: no counterpart), and the mikv knobs."""
    if m.name in SIMULATED:
        return SIMULATED[m.name], MikvConfig()
    if not m.is_mikv or m.pressure:
        return None
    cfg = MikvConfig.from_dict(m.knobs)
    h = cfg.hi_budget
    return Method("mikv", h + (1 - h) * lo, lo="q2"), cfg


def answer(model, method: Method, cfg: MikvConfig, pre, max_tokens: int, eos: set[int]):
    """Greedy answer ids and the KV bytes ratio of the last step."""
    sim = kvsim.KVSim(model, method, pre, 16, sink_pages=cfg.sink_pages,
                      recent_pages=cfg.recent_pages, measure_every=REPORT_EVERY,
                      window_scores=cfg.prefill_window > 0)
    logits, out = pre.logits[-1], []
    for _ in range(max_tokens):
        nxt = int(logits.argmax())
        if nxt in eos:
            break
        out.append(nxt)
        logits = sim.step([nxt], last_only=True)[-1]
    return out, (sim.ratios[-1] if sim.ratios else 1.0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-dir", required=True,
                    help="HF folder (benchmarks/models/gguf_to_hf.py)")
    ap.add_argument("--trials", required=True)
    ap.add_argument("--methods", nargs="+",
                    default=["auto", "fp8", "int4_per_token_head", "mikv@0.25",
                             "mikv@0.25-nowindow", "mikv@min"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--limit", type=int, default=10, help="trials per cell")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32,
                                                 attn_implementation=kvsim.ATTN_IMPL)
    model = model.to(a.device).eval()
    cfg = model.config
    table = methods(cfg.num_key_value_heads, head_size(cfg))
    lo = lo_page_ratio(cfg.num_key_value_heads, head_size(cfg))
    chosen = {name: sim_method(table[name], lo) for name in a.methods}
    skipped = [n for n, s in chosen.items() if s is None]
    if skipped:
        print(f"no harness counterpart (not run): {skipped}", flush=True)
    chosen = {n: s for n, s in chosen.items() if s is not None}
    window = max(c.prefill_window for _, c in chosen.values())
    eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} - {None}
    trials = [t for t in suite.load(a.trials) if t.length in a.lengths and t.index < a.limit]
    os.makedirs(a.out_dir, exist_ok=True)
    done = set()
    for name in chosen:  # resume: trials already answered are skipped
        path = os.path.join(a.out_dir, f"answers_sim_{name}.jsonl")
        if os.path.exists(path):
            done |= {(name, json.loads(line)["key"]) for line in open(path) if line.strip()}
    t0 = time.time()
    for i, t in enumerate(trials):
        todo = [n for n in chosen if (n, t.key) not in done]
        if not todo:
            continue
        pre = kvsim.prefill(model, t.prompt_ids, last_only=True, window=window)
        for name in todo:
            method, mcfg = chosen[name]
            ids, ratio = answer(model, method, mcfg, pre, t.max_tokens, eos)
            text = tok.decode(ids)
            row = dict(method=name, key=t.key, task=t.task, length=t.length, index=t.index,
                       depth=t.depth, digest=t.digest(), text=text,
                       correct=suite.score(t, text), kv_bytes_ratio=round(ratio, 4), path="sim")
            with open(os.path.join(a.out_dir, f"answers_sim_{name}.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"[{time.time() - t0:.0f}s] {i + 1}/{len(trials)} {t.key}", flush=True)


if __name__ == "__main__":
    main()
