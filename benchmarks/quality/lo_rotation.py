"""Whether rotating keys or values before 2-bit quantization pays at equal bytes (issue 20's
"a better 2-bit page": vLLM's int4_per_token_head and KVLinC rotate with a Hadamard matrix).

    python benchmarks/quality/lo_rotation.py --model SmolLM2-135M-Instruct --tokens 2048 \
        --out benchmarks/results/quality_lo_rotation_smollm2.json

A rotation is free in bytes and leaves attention exact (q . k = (qH) . (kH) for orthogonal
H; values rotate back after P V), so only its effect on quantization error counts. Per layer
every page is round-tripped as the product stores it (keys: one scale and zero per channel over
the page's tokens; values: per token and group of 64 channels), with keys and/or values
multiplied by a normalized Hadamard matrix first and by its transpose after; the prompt's last
64 queries attend over the result (attention_probe.py)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchmarks.harness.methods import hadamard  # noqa: E402
from benchmarks.quality.attention_probe import probe_parser, run_probe  # noqa: E402
from mikv_vllm.quant import roundtrip_pages  # noqa: E402

VARIANTS = ("product", "keys_rotated", "values_rotated", "both_rotated")


def round_trips(layout, k, v):
    h = hadamard(k.shape[-1])
    out = {}
    for name in VARIANTS:
        rot_k = name in ("keys_rotated", "both_rotated")
        rot_v = name in ("values_rotated", "both_rotated")
        lk, lv = roundtrip_pages(k @ h if rot_k else k, v @ h if rot_v else v, layout)
        out[name] = (lk @ h.T if rot_k else lk, lv @ h.T if rot_v else lv)
    return out


if __name__ == "__main__":
    run_probe(probe_parser(__doc__).parse_args(), VARIANTS, round_trips)
