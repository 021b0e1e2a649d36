"""The last two candidates for issue 20's "a better 2-bit page": a non-uniform code book, and a
few outliers kept exact (KVQuant's dense-and-sparse split).

- Code book: the stored bytes stay as they are (2-bit codes, an fp16 scale and an int8 zero per
  group), only the four levels move: {0, a, 1 - a, 1} of the group's span instead of thirds
  (`cb<a>`), or per group whichever of the two round-trips it with less squared error
  (`cbpick`: one bit per group, which the fp16 scale's unused sign bit could carry).
- Outliers: per page and KV head, about 1% of elements (`layout.key_outlier_slots`: 1%, in
  whole 16s) whose removal shrinks their group's range most keep an fp16 correction (4 more
  bytes each: correction and position), the rest quantize over what is left
  (`quant.roundtrip_with_outliers`, the product's `key_outliers` format for keys). This costs
  bytes; `--out` records how many, relative to the product's lo page.

    python benchmarks/quality/lo_codebooks_outliers.py --model SmolLM2-135M-Instruct \
        --out benchmarks/results/quality_lo_codebooks_outliers_smollm2.json

Per layer every page is round-tripped each variant's way (attention_probe.py); the prompt's last
64 queries attend over the result."""
from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchmarks.harness.methods import lo_cost  # noqa: E402
from benchmarks.quality.attention_probe import probe_parser, run_probe  # noqa: E402
from mikv_vllm.layout import key_outlier_slots  # noqa: E402
from mikv_vllm.quant import _quantize_range, roundtrip_pages, roundtrip_with_outliers  # noqa: E402


def levels_roundtrip(x: torch.Tensor, dim: int, lo: torch.Tensor, hi: torch.Tensor,
                     a: float) -> torch.Tensor:
    """x's groups on the 2-bit grid {0, a, 1 - a, 1} of the span the product stores for [lo, hi]
    (its fp16 scale and int8 zero); a = 1/3 is the product's own grid."""
    _, scale, zero = _quantize_range(x, 2, dim, lo, hi, False)
    base, span = -zero.float() * scale.float(), 3 * scale.float()
    levels = torch.tensor([0.0, a, 1 - a, 1.0], device=x.device)
    pos = ((x - base) / span).clamp(0, 1).unsqueeze(-1)
    return base + levels[(pos - levels).abs().argmin(-1)] * span


def codebook_roundtrip(x: torch.Tensor, dim: int, a: float, pick: bool) -> torch.Tensor:
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    out = levels_roundtrip(x, dim, lo, hi, a)
    if pick:
        uniform = levels_roundtrip(x, dim, lo, hi, 1 / 3)
        sse = [(y - x).square().sum(dim, keepdim=True) for y in (out, uniform)]
        out = torch.where(sse[0] > sse[1], uniform, out)
    return out


VARIANTS = ("product", "cb0.36", "cb0.4", "cbpick0.38", "keys_outliers", "values_outliers",
            "both_outliers")


def round_trips(layout, k, v):
    h, t, d = k.shape
    b, g = layout.block_size, layout.value_group_size
    kp = k.float().reshape(h, t // b, b, d)        # key groups: a channel over a page's tokens
    vp = v.float().reshape(h, t // b, b, d // g, g)  # value groups: g channels of a token
    product = roundtrip_pages(k, v, layout)

    def back(dk, dv):
        return dk.reshape(h, t, d), dv.reshape(h, t, d)

    out = {"product": product}
    for name, a, pick in (("cb0.36", 0.36, False), ("cb0.4", 0.4, False),
                          ("cbpick0.38", 0.38, True)):
        out[name] = back(codebook_roundtrip(kp, 2, a, pick), codebook_roundtrip(vp, 4, a, pick))
    count = key_outlier_slots(b, d)  # the product's count, for values as for keys
    ko, vo = roundtrip_with_outliers(kp, 2, 2, count), roundtrip_with_outliers(vp, 2, 4, count)
    out["keys_outliers"] = back(ko, product[1].reshape(vp.shape))
    out["values_outliers"] = back(product[0].reshape(kp.shape), vo)
    out["both_outliers"] = back(ko, vo)
    return out


def outlier_bytes(layout, k):
    """What the key outliers add to a lo page, over the product's lo page bytes (values' would
    add the same)."""
    extra = lo_cost(replace(layout, key_outliers=True)) / lo_cost(layout) - 1
    return {"outlier_bytes_over_lo_page": round(extra, 4),
            "lo_page_over_bf16": round(lo_cost(layout), 4)}


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    run_probe(probe_parser(__doc__).parse_args(), VARIANTS, round_trips, extra=outlier_bytes)
