"""The `mikv` knobs: read from `additional_config["mikv"]`, validated strictly at startup.

Every rejection is a `MikvConfigError` whose message is one line that names the knob and the
accepted values, so a bad `--additional-config` fails before any model or kernel is touched."""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, fields
from typing import Any

ADDITIONAL_CONFIG_KEY = "mikv"
KV_CACHE_DTYPE = "mikv"
MAX_PREFILL_WINDOW = 512  # query tokens; the window's scores are a [heads, window, prompt] tensor


class MikvConfigError(ValueError):
    """A one-line reason why vLLM cannot start with `--kv-cache-dtype mikv`."""


@dataclass(frozen=True)
class MikvConfig:
    # Defaults chosen with the quality harness (benchmarks/results/QUALITY.md, "Policy knobs").
    # Precision of hi pages: "bf16" = the model's 16-bit dtype, "fp8" = e4m3 with vLLM's scales.
    # bf16: exact while nothing is demoted, and runs on sm80; fp8 (sm90) buys more hi pages
    # per byte under a budget.
    hi_dtype: str = "bf16"
    # Bits per element of demoted (lo) pages: 2 or 4, or [4, 2] to demote by degrees: the
    # coldest hi pages go to 4-bit first, and 4-bit pages go on to 2-bit only when that no
    # longer frees enough (at equal bytes 3-12x less perplexity loss than hi/2-bit alone,
    # benchmarks/results/QUALITY.md "Tiers").
    lo_bits: int | tuple[int, ...] = 2
    # First pages of every request that always stay hi (attention sinks): 0 costs +2.5 PPL,
    # a second page buys 0.03.
    sink_pages: int = 1
    # Last pages of every request that always stay hi (the recent window): at equal bytes 4
    # beats 2 (+0.74 vs +0.82 PPL at 0.30 of bf16's bytes).
    recent_pages: int = 4
    # Fraction of a request's pages allowed to stay hi; None demotes only under memory pressure.
    hi_budget: float | None = None
    # Fraction of bf16's KV bytes a request's pages may take (instead of hi_budget), met by the
    # mix that loses least: with lo_bits [4, 2] the coldest hi pages go to 4-bit, and 4-bit
    # pages on to 2-bit only where all-4-bit would not fit. Sink and recent pages count hi.
    kv_budget: float | None = None
    # Query tokens at the end of a prefill whose attention over the prompt scores its pages
    # before their first demotion (SnapKV's observation window: the question at the end of a
    # prompt points at the pages the answer needs); 0 leaves pages unscored until decode
    # attention is measured, and the oldest go first.
    prefill_window: int = 32
    # Channels per value quantization group (keys are grouped per channel over a page).
    value_group_size: int = 64
    # Lo pages keep ~1% of their keys exact (per page and KV head, the ones that stretch a key
    # channel's range most, as fp16 corrections): at equal bytes half the perplexity loss of
    # plain 2-bit pages (QUALITY.md "Code books and exact outliers"); at block 16 a lo page
    # still packs as many to a block. Costs decode time on lo pages (README's knob table).
    key_outliers: bool = False
    # Decode hi pages with vLLM's FlashAttention and only lo pages with the mikv kernel, merged
    # by log-sum-exp (mikv_vllm/integration/attention/split_decode.py). None: on where vLLM runs
    # FlashAttention 3 (Hopper), where it wins while many pages are hi (README's knob table has
    # the timings); off elsewhere (FA2 on sm80 is untested).
    split_decode: bool | None = None

    @classmethod
    def of(cls, vllm_config) -> "MikvConfig":
        """The engine's knobs (validated once at startup into additional_config), parsed once
        per process whoever asks: the scheduler, the worker, the attention backend."""
        raw = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
        return _parsed(json.dumps(raw, sort_keys=True))

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "MikvConfig":
        raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> "MikvConfig":
        if not isinstance(raw, dict):
            raise MikvConfigError(
                f"mikv: additional_config['mikv'] must be a JSON object, got {type(raw).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise MikvConfigError(
                f"mikv: unknown knob {unknown[0]!r} (known: {', '.join(known)})")
        for name, value in raw.items():
            _check_type(name, value, _TYPES[name])
        raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        cfg = cls(**raw)
        cfg._check_values()
        return cfg

    def _check_values(self) -> None:
        if self.hi_dtype not in ("bf16", "fp8"):
            raise MikvConfigError(f"mikv: hi_dtype must be 'bf16' or 'fp8', got {self.hi_dtype!r}")
        tiers = self.lo_bits if isinstance(self.lo_bits, tuple) else (self.lo_bits,)
        if self.lo_bits not in (2, 4, (4, 2)) or not all(type(b) is int for b in tiers):
            raise MikvConfigError(
                f"mikv: lo_bits must be 2, 4 or [4, 2] (4-bit, then 2-bit), got "
                f"{list(self.lo_bits) if isinstance(self.lo_bits, tuple) else self.lo_bits!r}")
        if self.sink_pages < 0:
            raise MikvConfigError(f"mikv: sink_pages must be >= 0, got {self.sink_pages}")
        if self.recent_pages < 1:
            raise MikvConfigError(
                f"mikv: recent_pages must be >= 1 (the page being written stays hi), "
                f"got {self.recent_pages}")
        if self.hi_budget is not None and not 0.0 < self.hi_budget <= 1.0:
            raise MikvConfigError(f"mikv: hi_budget must be in (0, 1], got {self.hi_budget}")
        if self.kv_budget is not None and not 0.0 < self.kv_budget <= 1.0:
            raise MikvConfigError(f"mikv: kv_budget must be in (0, 1], got {self.kv_budget}")
        if self.kv_budget is not None and self.hi_budget is not None:
            raise MikvConfigError("mikv: set hi_budget (a share of pages) or kv_budget (a share "
                                  "of bf16's bytes), not both")
        if not 0 <= self.prefill_window <= MAX_PREFILL_WINDOW:
            raise MikvConfigError(f"mikv: prefill_window must be in [0, {MAX_PREFILL_WINDOW}], "
                                  f"got {self.prefill_window}")
        if self.value_group_size not in (32, 64, 128):
            raise MikvConfigError(
                f"mikv: value_group_size must be 32, 64 or 128, got {self.value_group_size}")

    def as_dict(self) -> dict:
        """The knobs as JSON values (what additional_config carries to every process)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @property
    def final_bits(self) -> int:
        """Bits of the last lo tier (where pages end up under the most pressure)."""
        return self.lo_bits[-1] if isinstance(self.lo_bits, tuple) else self.lo_bits

    @property
    def mid_bits(self) -> int | None:
        """Bits of the middle tier hi pages visit first, or None (one lo tier)."""
        return self.lo_bits[0] if isinstance(self.lo_bits, tuple) else None

    def lo_format(self) -> dict:
        """The lo page format's fields of `PageLayout` that these knobs set (the scheduler, every
        worker and the startup check build their layouts from the same ones)."""
        return dict(lo_bits=self.final_bits, value_group_size=self.value_group_size,
                    mid_bits=self.mid_bits, key_outliers=self.key_outliers)

    @property
    def vllm_kv_cache_dtype(self) -> str:
        """The legal vLLM kv-cache dtype that stores this config's hi pages."""
        return "fp8" if self.hi_dtype == "fp8" else "auto"


# Accepted JSON types per knob (bool is not an int here, and floats accept ints).
_TYPES: dict[str, tuple[type, ...]] = {
    "hi_dtype": (str,),
    "lo_bits": (int, list, tuple),
    "sink_pages": (int,),
    "recent_pages": (int,),
    "hi_budget": (float, int, type(None)),
    "kv_budget": (float, int, type(None)),
    "prefill_window": (int,),
    "value_group_size": (int,),
    "key_outliers": (bool,),
    "split_decode": (bool, type(None)),
}


def _check_type(name: str, value: Any, accepted: tuple[type, ...]) -> None:
    ok = isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in accepted)
        raise MikvConfigError(
            f"mikv: knob {name!r} must be {names}, got {type(value).__name__} {value!r}")


@functools.lru_cache(maxsize=8)
def _parsed(raw_json: str) -> MikvConfig:
    return MikvConfig.from_dict(json.loads(raw_json))
