"""Whether clipping a lo group's range pays at equal bytes (issue 20's "a better 2-bit page"):
the stored format stays as it is (codes, an fp16 scale and an int8 zero per group), only the
quantizer changes, choosing per group the grid that round-trips it with the least squared
error among its full range and that range shrunk about its middle (CLIP_RATIOS); values
outside clamp to the ends. A kernel would read such pages unchanged.

    python benchmarks/quality/lo_clipping.py --model SmolLM2-135M-Instruct --tokens 2048 \
        --out benchmarks/results/quality_lo_clipping_smollm2.json

Per layer every page is round-tripped as the product stores it (attention_probe.py), with keys
and/or values clipped; the prompt's last 64 queries attend over the result."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchmarks.quality.attention_probe import probe_parser, run_probe  # noqa: E402
from mikv_vllm.quant import CLIP_RATIOS, roundtrip_pages  # noqa: E402
VARIANTS = ("product", "keys_clipped", "values_clipped", "both_clipped")


def round_trips(layout, k, v):
    return {name: roundtrip_pages(
        k, v, layout, k_clip=CLIP_RATIOS if name in ("keys_clipped", "both_clipped") else (),
        v_clip=CLIP_RATIOS if name in ("values_clipped", "both_clipped") else ())
        for name in VARIANTS}


if __name__ == "__main__":
    run_probe(probe_parser(__doc__).parse_args(), VARIANTS, round_trips)
