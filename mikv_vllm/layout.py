"""Byte layout of KV pages: one hi page per vLLM block, or a pack of N lo pages in one block.

A page is one vLLM block of one layer (all KV heads, K and V). The block table keeps plain block
ids for hi pages; a lo page is written into it as a negative code naming (pack block, slot), so
the page map lives inside the table the kernels already read. With a middle tier (4-bit pages
that hi pages visit before the 2-bit tier) a code's MID_TIER flag says which tier's packs it
names; each tier packs its own pages (at block 16 with bf16 hi pages: 3 four-bit, 5 two-bit)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

SCALE_BYTES = 2  # fp16 scale per quantization group
ZERO_BYTES = 1   # int8 zero point (a whole number of steps) per quantization group
MID_TIER = 1 << 30  # flag of a lo code naming a middle-tier slot (csrc/paged_decode.h kMidTier)
# Exact key outliers (KVQuant's dense-and-sparse split): about this share of a page's keys per KV
# head, stored as fp16 corrections with their positions (one 32-bit word each), in whole
# tensor-core k-steps of 16 (the decode kernel adds them with one mma per step, which costs its
# lo pass more than the bytes do: the nearest 16, not the next).
KEY_OUTLIER_SHARE = 0.01
OUTLIER_WORD_BYTES = 4
# Keys of a page per KV head that csrc/quantize.cu stages at once (kMaxTileFloats).
MAX_PAGE_HEAD_ELEMS = 8192


def key_outlier_slots(block_size: int, head_size: int) -> int:
    """Key outliers per page and KV head: KEY_OUTLIER_SHARE of its keys to the nearest 16 (at
    least 16): 16 at block 16 and head size 64 or 128, 48 at head size 256."""
    return 16 * max(1, round(KEY_OUTLIER_SHARE * block_size * head_size / 16))


@dataclass(frozen=True)
class LoPageOffsets:
    """Byte offsets of a lo page's sections (format: mikv_vllm/quant.py, csrc/paged_decode.cu)."""
    k_codes: int
    v_codes: int
    k_scales: int
    v_scales: int
    k_zeros: int
    v_zeros: int
    k_outliers: int  # the exact key outliers' words (== end where the format has none)
    end: int


@dataclass(frozen=True)
class PageLayout:
    block_size: int
    num_kv_heads: int
    head_size: int
    hi_elem_bytes: int  # 2 for bf16/fp16, 1 for fp8
    lo_bits: int = 2
    value_group_size: int = 64
    mid_bits: int | None = None  # the middle tier's bits (4, before 2-bit lo pages), or none
    key_outliers: bool = False  # lo pages keep their worst keys exact (`key_outlier_slots`)

    def __post_init__(self):
        if self.mid_bits is not None and (self.mid_bits, self.lo_bits) != (4, 2):
            raise ValueError(f"a middle tier must be 4-bit pages before 2-bit ones, got "
                             f"{self.mid_bits}-bit before {self.lo_bits}-bit")
        # The lo format is laid out in 16 x 16 tensor-core tiles (mikv_vllm/quant.py).
        for name in ("block_size", "head_size", "value_group_size"):
            if getattr(self, name) % 16:
                raise ValueError(f"{name} {getattr(self, name)} must be a multiple of 16")
        if self.head_size % self.value_group_size:
            raise ValueError(
                f"value_group_size {self.value_group_size} must divide head_size {self.head_size}")

    @classmethod
    def from_spec(cls, spec, **lo_format) -> "PageLayout":
        """The layout of vLLM's KV cache spec (block size, KV heads per rank, head size, dtype)
        with the lo format's fields (`MikvConfig.lo_format`): what the scheduler and every
        worker derive independently, from the same spec."""
        return cls(block_size=spec.block_size, num_kv_heads=spec.num_kv_heads,
                   head_size=spec.head_size, hi_elem_bytes=spec.dtype.itemsize, **lo_format)

    @property
    def outlier_slots(self) -> int:
        """Exact key outliers per lo page and KV head (0 without them)."""
        return key_outlier_slots(self.block_size, self.head_size) if self.key_outliers else 0

    # Cached: the scheduler asks these for every page it moves (a frozen dataclass keeps them).
    @cached_property
    def mid(self) -> "PageLayout | None":
        """The middle tier's pages as a single-tier layout (lo_bits = mid_bits), or None."""
        if self.mid_bits is None:
            return None
        return replace(self, lo_bits=self.mid_bits, mid_bits=None)

    @cached_property
    def last(self) -> "PageLayout":
        """The last lo tier's single-tier layout."""
        return self if self.mid_bits is None else replace(self, mid_bits=None)

    def tier(self, mid: bool) -> "PageLayout":
        """The single-tier layout of the middle (`mid`) or the last lo tier."""
        if mid and self.mid is None:
            raise ValueError("this layout has no middle tier")
        return self.mid if mid else self.last

    def lo_code(self, pack_block: int, slot: int, mid: bool = False) -> int:
        """The code of slot `slot` of pack `pack_block` of a tier (table entry -(1 + code)):
        `encode_lo`'s, flagged MID_TIER for the middle tier."""
        return (MID_TIER if mid else 0) - 1 - encode_lo(pack_block, slot,
                                                         self.tier(mid).pack_factor)

    def locate(self, entry: int) -> tuple[int, int, "PageLayout"]:
        """(pack block, slot, the tier's single-tier layout) of a lo page's table entry."""
        if entry >= 0:
            raise ValueError(f"table entry {entry} names a hi page")
        code = -entry - 1
        tier = self.tier(bool(code & MID_TIER))
        return (*decode_entry(-1 - (code & ~MID_TIER), tier.pack_factor), tier)

    @property
    def bf16_page_bytes(self) -> int:
        """A page's bytes in bf16: what byte budgets and ratios count against."""
        return self.hi_page_bytes * 2 // self.hi_elem_bytes

    def unpackable(self) -> "PageLayout | None":
        """The first lo tier whose page does not fit twice in a block (a pack of one frees
        nothing), or None."""
        return next((t for t in filter(None, (self.mid, self.last)) if t.pack_factor < 2), None)

    @property
    def hi_page_bytes(self) -> int:
        return 2 * self.block_size * self.num_kv_heads * self.head_size * self.hi_elem_bytes

    @cached_property
    def lo_offsets(self) -> LoPageOffsets:
        h, b, d = self.num_kv_heads, self.block_size, self.head_size
        codes = h * b * d * self.lo_bits // 8                                # K, then V
        k_groups = h * d                                                     # per (head, channel)
        v_groups = h * b * (d // self.value_group_size)                      # per (token, group)
        k_scales = 2 * codes
        v_scales = k_scales + k_groups * SCALE_BYTES
        k_zeros = v_scales + v_groups * SCALE_BYTES
        v_zeros = k_zeros + k_groups * ZERO_BYTES
        k_outliers = v_zeros + v_groups * ZERO_BYTES
        return LoPageOffsets(0, codes, k_scales, v_scales, k_zeros, v_zeros, k_outliers,
                             k_outliers + h * self.outlier_slots * OUTLIER_WORD_BYTES)

    @property
    def lo_page_bytes(self) -> int:
        return self.lo_offsets.end

    @cached_property
    def pack_factor(self) -> int:
        """Lo pages that fit in one block (N): demoting N pages frees N - 1 blocks."""
        return self.hi_page_bytes // self.lo_page_bytes

    def bytes_per_token(self, lo: bool) -> float:
        page = self.hi_page_bytes / self.pack_factor if lo else self.hi_page_bytes
        return page / self.block_size

    def describe(self) -> str:
        bf16 = 4 * self.num_kv_heads * self.head_size
        fp8 = bf16 / 2
        lo = self.bytes_per_token(lo=True)
        mid = self.mid
        outliers = (f" with {self.outlier_slots} exact keys per head" if self.key_outliers
                    else "")
        mid_text = "" if mid is None else (
            f", {mid.lo_bits}-bit mid page {mid.lo_page_bytes} B ({mid.pack_factor} per block, "
            f"{mid.bytes_per_token(lo=True):.0f} B per token per layer)")
        return (
            f"hi page {self.hi_page_bytes} B, {self.lo_bits}-bit lo page{outliers} "
            f"{self.lo_page_bytes} B, "
            f"{self.pack_factor} lo pages per block{mid_text}; per token per layer: hi "
            f"{self.bytes_per_token(lo=False):.0f} B, lo {lo:.0f} B "
            f"({bf16 / lo:.2f}x fewer than bf16, {fp8 / lo:.2f}x fewer than fp8)")


def split_kv_cache(kv_cache, head_size: int):
    """Views [blocks, block_size, kv_heads, D] of the keys and the values of a layer's cache,
    as the attention backend allocates it: [blocks, kv_heads, block_size, 2 * D] stored with
    the tokens outermost, K then V in every row (what vLLM's FlashAttention reads)."""
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)


def encode_lo(pack_block: int, slot: int, pack_factor: int) -> int:
    """Block-table code of a lo page: -(1 + pack_block * N + slot), always negative."""
    if not 0 <= slot < pack_factor:
        raise ValueError(f"slot {slot} outside a pack of {pack_factor}")
    return -(1 + pack_block * pack_factor + slot)


def decode_entry(entry: int, pack_factor: int) -> tuple[int, int]:
    """(block id, slot) of a block-table entry; slot -1 means a hi page."""
    if entry >= 0:
        return entry, -1
    code = -entry - 1
    return code // pack_factor, code % pack_factor
