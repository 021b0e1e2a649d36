"""What the lo page's int8 zero points cost attention, against fp16 zero points (issue 20's
"a better 2-bit page", measured before any kernel changes).

    python benchmarks/quality/lo_zero_points.py --model Qwen2.5-Coder-1.5B-Instruct \
        --tokens 2048 --out benchmarks/results/quality_lo_zero_points.json

A real model prefills Wikipedia text at full precision; per layer, every key page is
round-tripped through 2-bit with one (scale, zero) per channel as the product stores it (zero
in int8 steps: the grid is shifted by up to half a step, and a channel far from zero gets a
coarser step) and with an fp16 zero (the grid starts exactly at the page's minimum). The
prompt's last 64 queries then attend over the quantized keys (values exact); rows: the KL
divergence of their attention from the exact one, the relative error of the attention
output, and the share of key groups whose step the int8 zero made coarser."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchmarks.harness import kvsim, models  # noqa: E402
from benchmarks.quality.attention_probe import (QUERIES, attention_error,  # noqa: E402
                                                mean_over_layers, prefill_wiki)
from mikv_vllm.quant import roundtrip_pages  # noqa: E402


def coarser_share(k: torch.Tensor, bits: int) -> float:
    lo, hi = k.amin(2), k.amax(2)
    grown = torch.maximum((-lo).clamp_min(0) / 126, lo.clamp_min(0) / 127) \
        > (hi - lo) / ((1 << bits) - 1)
    return float(grown.float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=models.QWEN15)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model, kv, queries, tokens = prefill_wiki(a.model, a.tokens)
    layout = kvsim.layout_of(model, a.block_size, lo_bits=a.bits)
    rows = []
    for layer in sorted(queries):
        k, v = kv[layer]
        h, t, d = k.shape
        t -= t % a.block_size
        pages = k[:, :t].reshape(h, t // a.block_size, a.block_size, d)
        q, scaling = queries[layer]
        row = {"layer": layer, "coarser_step_share": coarser_share(pages, a.bits)}
        for name, k_zero_fp16 in (("int8_zero", False), ("fp16_zero", True)):
            lo_k, _ = roundtrip_pages(k[:, :t], v[:, :t], layout, k_zero_fp16=k_zero_fp16)
            row[name] = attention_error(q, scaling, k[:, :t], v[:, :t], lo_k, v[:, :t])
        rows.append(row)
        print(json.dumps(row), flush=True)
    mean = mean_over_layers(rows, ("int8_zero", "fp16_zero"))
    result = {"model": a.model, "tokens": tokens, "bits": a.bits, "block_size": a.block_size,
              "queries": QUERIES, "mean_over_layers": mean, "layers": rows}
    json.dump(result, open(a.out, "w"), indent=1)
    print(json.dumps(mean))


if __name__ == "__main__":
    main()
