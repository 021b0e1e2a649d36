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

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchmarks.quality.attention_probe import probe_parser, run_probe  # noqa: E402
from mikv_vllm.quant import roundtrip_pages  # noqa: E402

VARIANTS = ("int8_zero", "fp16_zero")


def coarser_share(k: torch.Tensor, bits: int) -> float:
    lo, hi = k.amin(2), k.amax(2)
    grown = torch.maximum((-lo).clamp_min(0) / 126, lo.clamp_min(0) / 127) \
        > (hi - lo) / ((1 << bits) - 1)
    return float(grown.float().mean())


def round_trips(layout, k, v):
    """Keys only (values exact): zero points in int8 steps as stored, or fp16."""
    return {name: (roundtrip_pages(k, v, layout, k_zero_fp16=fp16)[0], v)
            for name, fp16 in (("int8_zero", False), ("fp16_zero", True))}


def key_pages(layout, k):
    h, t, d = k.shape
    pages = k.reshape(h, t // layout.block_size, layout.block_size, d)
    return {"coarser_step_share": coarser_share(pages, layout.lo_bits)}


if __name__ == "__main__":
    ap = probe_parser(__doc__)
    ap.add_argument("--bits", type=int, default=2)
    a = ap.parse_args()
    run_probe(a, VARIANTS, round_trips, lo_bits=a.bits, extra=key_pages)
