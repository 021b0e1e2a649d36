"""What a middle-tier page pays for reaching 2-bit through its 4-bit copy (issue 20: the
product requantizes a 4-bit page when it moves on, its original values being gone), against
2-bit straight from the original values, and what 4-bit alone costs.

    python benchmarks/quality/requant_cost.py --model Qwen2.5-Coder-1.5B-Instruct \
        --tokens 2048 --out benchmarks/results/quality_requant_qwen15.json

Per layer every page's keys and values are round-tripped as the product stores them; the
prompt's last 64 queries attend over them (attention_probe.py): KL from exact attention and the
output's relative error, and the extra error of the two-step path."""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchmarks.quality.attention_probe import probe_parser, run_probe  # noqa: E402
from mikv_vllm.quant import roundtrip_pages  # noqa: E402

PATHS = ("4bit", "2bit_from_original", "2bit_from_4bit")


def round_trips(two, k, v):
    k4, v4 = roundtrip_pages(k, v, dataclasses.replace(two, lo_bits=4))
    return {"4bit": (k4, v4), "2bit_from_original": roundtrip_pages(k, v, two),
            "2bit_from_4bit": roundtrip_pages(k4, v4, two)}


if __name__ == "__main__":
    run_probe(probe_parser(__doc__).parse_args(), PATHS, round_trips)
