"""The KV formats the long-context suite compares, as vLLM engine settings.

Every method is one `--kv-cache-dtype` (mikv with its knobs). mikv's byte budgets become its
`hi_budget` knob (the fraction of a request's pages kept hi) through the page layout: a lo page
costs `lo` of a bf16 page, so b = h + (1 - h) * lo. With 2-bit pages at block 16 and head_dim
128, lo = 0.184: no hi_budget reaches 0.15 of bf16's bytes, and `mikv@min` keeps only the sink
and recent pages hi (the least mikv can store). The tiered rows (`mikv-tier@B`: lo_bits [4, 2])
use the `kv_budget` knob, which takes the byte budget itself; `mikv@0.35` does too, as their
one-tier twin at the same bytes. `mikv-kout-tier@B` adds `key_outliers` (lo pages keep their
largest keys exact), judged here against the tier rows at the same budget."""
from __future__ import annotations

from dataclasses import dataclass, field

from mikv_vllm.layout import PageLayout

BLOCK = 16
TIERS = {"lo_bits": [4, 2]}
KOUT_TIERS = {**TIERS, "key_outliers": True}
# Methods run under memory pressure (no budget; run_all.py sizes their pool).
PRESSURE = ("mikv-pressure", "mikv-tier-pressure")


@dataclass(frozen=True)
class Method:
    name: str
    kv_cache_dtype: str
    knobs: dict = field(default_factory=dict)   # mikv knobs (additional_config["mikv"])
    # mikv under memory pressure: a KV pool of a quarter of the tokens the batch keeps
    # resident (run_all.py), no hi_budget: the scheduler demotes by measured importance.
    pressure: bool = False

    @property
    def is_mikv(self) -> bool:
        return self.kv_cache_dtype == "mikv"


def head_size(config) -> int:
    """A Hugging Face config's attention head size."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def lo_page_ratio(num_kv_heads: int, head_size: int, lo_bits: int = 2) -> float:
    """A lo page's bytes over a bf16 page's (mikv's default value groups of 64 channels)."""
    lay = PageLayout(BLOCK, num_kv_heads, head_size, 2, lo_bits, min(64, head_size))
    return lay.lo_page_bytes / lay.hi_page_bytes


def hi_budget_for(byte_budget: float, lo: float) -> float:
    """The hi_budget knob that stores `byte_budget` of bf16's bytes (pages that must stay hi
    aside)."""
    if not lo < byte_budget <= 1:
        raise ValueError(f"mikv cannot store {byte_budget} of bf16's bytes (a lo page is {lo:.3f})")
    return round((byte_budget - lo) / (1 - lo), 4)


def methods(num_kv_heads: int, head_size: int) -> dict[str, Method]:
    lo = lo_page_ratio(num_kv_heads, head_size)
    quarter = hi_budget_for(0.25, lo)
    out = [Method(kv, kv) for kv in ("auto", "fp8", "int4_per_token_head",
                                       "turboquant_4bit_nc", "turboquant_3bit_nc")]
    out += [Method("mikv@0.25", "mikv", {"hi_budget": quarter}),
            Method("mikv@0.25-nowindow", "mikv", {"hi_budget": quarter, "prefill_window": 0}),
            Method("mikv@min", "mikv", {"hi_budget": 0.001}),
            Method("mikv-pressure", "mikv", pressure=True),
            Method("mikv@0.35", "mikv", {"kv_budget": 0.35}),
            Method("mikv-tier@0.35", "mikv", {**TIERS, "kv_budget": 0.35}),
            Method("mikv-tier@0.25", "mikv", {**TIERS, "kv_budget": 0.25}),
            Method("mikv-tier@0.5", "mikv", {**TIERS, "kv_budget": 0.5}),
            Method("mikv-kout-tier@0.25", "mikv", {**KOUT_TIERS, "kv_budget": 0.25}),
            Method("mikv-kout-tier@0.35", "mikv", {**KOUT_TIERS, "kv_budget": 0.35}),
            Method("mikv-tier-pressure", "mikv", TIERS, pressure=True)]
    assert {m.name for m in out if m.pressure} == set(PRESSURE)
    return {m.name: m for m in out}
