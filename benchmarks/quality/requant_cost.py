"""What a middle-tier page pays for reaching 2-bit through its 4-bit copy (issue 20: the
product requantizes a 4-bit page when it moves on, its original values being gone), against
2-bit straight from the original values, and what 4-bit alone costs.

    python benchmarks/quality/requant_cost.py --model Qwen2.5-Coder-1.5B-Instruct \
        --tokens 2048 --out benchmarks/results/quality_requant_qwen15.json

Per layer every page's keys and values are round-tripped as the product stores them; the
prompt's last 64 queries attend over them (attention_probe.py): KL from exact attention and the
output's relative error, and the extra error of the two-step path."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchmarks.harness import kvsim, models  # noqa: E402
from benchmarks.quality.attention_probe import (QUERIES, attention_error,  # noqa: E402
                                                mean_over_layers, prefill_wiki)
from mikv_vllm.quant import roundtrip_pages  # noqa: E402

PATHS = ("4bit", "2bit_from_original", "2bit_from_4bit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=models.QWEN15)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model, kv, queries, tokens = prefill_wiki(a.model, a.tokens)
    two = kvsim.layout_of(model, a.block_size, lo_bits=2)
    four = dataclasses.replace(two, lo_bits=4)
    rows = []
    for layer in sorted(queries):
        k, v = kv[layer]
        t = k.shape[1] - k.shape[1] % a.block_size
        k, v = k[:, :t], v[:, :t]
        q, scaling = queries[layer]
        k4, v4 = roundtrip_pages(k, v, four)
        trips = {"4bit": (k4, v4), "2bit_from_original": roundtrip_pages(k, v, two),
                 "2bit_from_4bit": roundtrip_pages(k4, v4, two)}
        row = {"layer": layer, **{name: attention_error(q, scaling, k, v, *trips[name])
                                  for name in PATHS}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    mean = mean_over_layers(rows, PATHS)
    result = {"model": a.model, "tokens": tokens, "block_size": a.block_size, "queries": QUERIES,
              "mean_over_layers": mean, "layers": rows}
    json.dump(result, open(a.out, "w"), indent=1)
    print(json.dumps(mean))


if __name__ == "__main__":
    main()
