"""The methods compared, what each one stores, and its KV bytes relative to bf16.

Every method is a page-level storage rule over the same model:
  bf16   all pages exact (the reference; the harness runs in fp32, so "bf16" = unrounded)
  fp8    every token round-tripped through float8_e4m3fn, per-tensor scale 1.0 (vLLM default)
  int4   every (token, head) vector symmetric int4 with one fp16 scale (vLLM int4_per_token_head)
  kivi2  every full page 2-bit (the lo format), the page being written stays hi
  kivi4  the same at 4 bits (the lo format with lo_bits 4)
  h2o    policy-ranked pages *evicted* (masked out), hi fraction = byte budget
  mikv   policy-ranked pages demoted to 2-bit (quant.quantize_page -> dequantize_page), optional
         key-channel outlier balancing, hi pages bf16 or fp8
  mikv_tier  two lo tiers (issue 20's design): the coldest hi pages go to 4-bit first, the
         coldest 4-bit pages to 2-bit (requantized from their 4-bit copy) only where all-4-bit
         would not fit the budget (policy.DemotionPolicy.tier_limits)
  mikv_kz16 / mikv_rotv / mikv_vclip / mikv_kout  candidate lo formats: keys with fp16 zero
         points, values rotated by a Hadamard matrix before quantization, value groups' ranges
         clipped where that round-trips them better (quant.CLIP_RATIOS; these two free in
         bytes), the product's exact key outliers (the key_outliers knob; with _tier too)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mikv_vllm.config import MikvConfig
from mikv_vllm.layout import PageLayout
from mikv_vllm.policy import DemotionPolicy

FP8_MAX = 448.0
PRODUCT = MikvConfig()  # the harness's policy defaults are the plugin's


@dataclass(frozen=True)
class Method:
    name: str                     # bf16 | fp8 | int4 | kivi2 | h2o | mikv
    budget: float | None = None   # target fraction of bf16 KV bytes (budgeted methods)
    hi: str = "bf16"              # storage of tokens not demoted: bf16 | fp8 | int4
    lo: str | None = None         # demoted pages: "q2" | "q4" (lo page format) | "evict" | None
    mid: str | None = None        # a tier between hi and lo: "q4" (tiered mikv) | None
    balance: bool = False         # MiKV key-channel outlier balancing of lo pages
    all_lo: bool = False          # KIVI: every full page lo, no policy
    scale8: bool = False          # lo scales as 1-byte float8-e4m3 (zeros stay fp16)
    k_zero16: bool = False        # lo keys with fp16 zero points (quant.roundtrip_fp16_zero)
    rotate_v: bool = False        # lo values rotated (hadamard) before quantization, back after
    clip_v: bool = False          # lo value groups' ranges clipped (quant.CLIP_RATIOS)
    k_outliers: bool = False      # lo pages with exact key outliers (PageLayout.key_outliers)

    @property
    def label(self) -> str:
        if self.name != "mikv":
            return self.name
        return ("mikv" + ("_bal" if self.balance else "") + ("_fp8hi" if self.hi == "fp8" else "")
                + ("_s8" if self.scale8 else "") + ("_kz16" if self.k_zero16 else "")
                + ("_rotv" if self.rotate_v else "") + ("_vclip" if self.clip_v else "")
                + ("_kout" if self.k_outliers else "") + ("_tier" if self.mid else ""))

    @property
    def lo_bits(self) -> int:
        return 4 if self.lo == "q4" else 2


def standard_methods(budgets=(0.5, 0.25, 0.15)) -> list[Method]:
    out = [Method("bf16"), Method("fp8", hi="fp8"), Method("int4", hi="int4"),
           Method("kivi2", lo="q2", all_lo=True)]
    for b in budgets:
        out += [Method("h2o", b, lo="evict"),
                Method("mikv", b, lo="q2"),
                Method("mikv", b, lo="q2", balance=True),
                Method("mikv", b, hi="fp8", lo="q2"),
                Method("mikv", b, hi="fp8", lo="q2", balance=True)]
    return out


def parse_method(spec: str) -> Method:
    """'bf16', 'kivi2', 'kivi4', 'h2o@0.25', 'mikv@0.25', 'mikv_bal_fp8hi@0.15',
    'mikv_tier@0.25', ..."""
    name, _, b = spec.partition("@")
    budget = float(b) if b else None
    if name in ("bf16", "fp8", "int4"):
        return Method(name, hi=name)
    if name in ("kivi2", "kivi4"):
        return Method(name, lo="q" + name[-1], all_lo=True)
    if budget is None:
        raise ValueError(f"method {spec!r} needs a budget, e.g. {name}@0.25")
    if name == "h2o":
        return Method("h2o", budget, lo="evict")
    if name.startswith("mikv"):
        flags = set(name.split("_")[1:])
        if flags - {"bal", "fp8hi", "s8", "kz16", "rotv", "vclip", "kout", "tier"}:
            raise ValueError(f"unknown mikv flags in {spec!r} (known: _bal, _fp8hi, _s8, "
                             "_kz16, _rotv, _vclip, _kout, _tier)")
        if "tier" in flags and flags & {"bal", "s8", "kz16", "rotv"}:
            raise ValueError(f"{spec!r}: _tier does not combine with _bal, _s8, _kz16 or _rotv")
        if flags & {"kz16", "rotv", "vclip", "kout"} and "bal" in flags:
            raise ValueError(f"{spec!r}: _kz16, _rotv, _vclip and _kout do not combine with _bal")
        if {"kz16", "kout"} <= flags:
            raise ValueError(f"{spec!r}: _kz16 and _kout are two key formats")
        return Method("mikv", budget, hi="fp8" if "fp8hi" in flags else "bf16", lo="q2",
                      balance="bal" in flags, scale8="s8" in flags, k_zero16="kz16" in flags,
                      rotate_v="rotv" in flags, clip_v="vclip" in flags,
                      k_outliers="kout" in flags,
                      mid="q4" if "tier" in flags else None)
    raise ValueError(f"unknown method {spec!r}")


# ---- bytes per token, as fractions of bf16 (per layer and KV head all equal) ----

def hi_cost(method: Method, head_dim: int) -> float:
    if method.hi == "fp8":
        return 0.5
    if method.hi == "int4":
        return (head_dim // 2 + 2) / (2 * head_dim)  # int4 codes + one fp16 scale, per K or V
    return 1.0


def lo_cost(layout: PageLayout, scale8: bool = False, k_zero16: bool = False) -> float:
    """Stored bytes of a lo page over the bf16 bytes of the same tokens (PageLayout counts;
    with `scale8`, every fp16 scale counted as one byte; with `k_zero16`, every key zero point
    as two)."""
    o = layout.lo_offsets
    saved = (o.k_zeros - o.k_scales) // 2 if scale8 else 0  # one byte of each fp16 scale
    extra = o.v_zeros - o.k_zeros if k_zero16 else 0        # one more byte per key zero point
    return (layout.lo_page_bytes - saved + extra) / layout.bf16_page_bytes


def method_lo_cost(method: Method, layout: PageLayout) -> float:
    """lo_cost of the lo format `method` stores (its key outliers' words counted)."""
    return lo_cost(replace(layout, key_outliers=method.k_outliers), method.scale8,
                   method.k_zero16)


def hi_fraction(method: Method, layout: PageLayout) -> float | None:
    """f with f * hi + (1 - f) * lo = budget (lo = 0 for eviction), clipped to [0, 1]."""
    if method.budget is None or method.lo is None or method.all_lo or method.mid:
        return None
    h = hi_cost(method, layout.head_size)
    lo = 0.0 if method.lo == "evict" else method_lo_cost(method, layout)
    return min(1.0, max(0.0, (method.budget - lo) / (h - lo)))


def make_policy(method: Method, layout: PageLayout, sink_pages: int = PRODUCT.sink_pages,
                recent_pages: int = PRODUCT.recent_pages) -> DemotionPolicy | None:
    if method.mid:  # tiered: limits per step (DemotionPolicy.tier_limits), no hi_budget
        return DemotionPolicy(sink_pages=sink_pages, recent_pages=recent_pages)
    f = hi_fraction(method, layout)
    if f is None:
        return None
    # hi_budget must be > 0 for the config; a tiny value keeps only sinks and recent pages.
    return DemotionPolicy(sink_pages=sink_pages, recent_pages=recent_pages,
                          hi_budget=max(f, 1e-6))


# ---- storage round trips of hi tokens ----

def fp8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def int4_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 per vector (last dim), fp16 scale = absmax / 7."""
    scale = (x.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-8).half().float()
    return (x / scale).round().clamp(-8, 7) * scale


def hi_roundtrip(method: Method, x: torch.Tensor) -> torch.Tensor:
    if method.hi == "fp8":
        return fp8_roundtrip(x)
    if method.hi == "int4":
        return int4_roundtrip(x)
    return x


def hadamard(d: int) -> torch.Tensor:
    """The normalized d x d Hadamard matrix (d a power of two): orthogonal and symmetric."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / d ** 0.5
