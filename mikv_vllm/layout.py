"""Byte layout of KV pages: one hi page per vLLM block, or a pack of N lo pages in one block.

A page is one vLLM block of one layer (all KV heads, K and V). The block table keeps plain block
ids for hi pages; a lo page is written into it as a negative code naming (pack block, slot), so
the page map lives inside the table the kernels already read."""
from __future__ import annotations

from dataclasses import dataclass

SCALE_BYTES = 2  # fp16 scale per quantization group
ZERO_BYTES = 1   # int8 zero point (a whole number of steps) per quantization group


@dataclass(frozen=True)
class LoPageOffsets:
    """Byte offsets of a lo page's sections (format: mikv_vllm/quant.py, csrc/paged_decode.cu)."""
    k_codes: int
    v_codes: int
    k_scales: int
    v_scales: int
    k_zeros: int
    v_zeros: int
    end: int


@dataclass(frozen=True)
class PageLayout:
    block_size: int
    num_kv_heads: int
    head_size: int
    hi_elem_bytes: int  # 2 for bf16/fp16, 1 for fp8
    lo_bits: int = 2
    value_group_size: int = 64

    def __post_init__(self):
        # The lo format is laid out in 16 x 16 tensor-core tiles (mikv_vllm/quant.py).
        for name in ("block_size", "head_size", "value_group_size"):
            if getattr(self, name) % 16:
                raise ValueError(f"{name} {getattr(self, name)} must be a multiple of 16")
        if self.head_size % self.value_group_size:
            raise ValueError(
                f"value_group_size {self.value_group_size} must divide head_size {self.head_size}")

    @classmethod
    def from_spec(cls, spec, lo_bits: int, value_group_size: int) -> "PageLayout":
        """The layout of vLLM's KV cache spec (block size, KV heads per rank, head size, dtype):
        what the scheduler and every worker derive independently, from the same spec."""
        return cls(block_size=spec.block_size, num_kv_heads=spec.num_kv_heads,
                   head_size=spec.head_size, hi_elem_bytes=spec.dtype.itemsize,
                   lo_bits=lo_bits, value_group_size=value_group_size)

    @property
    def hi_page_bytes(self) -> int:
        return 2 * self.block_size * self.num_kv_heads * self.head_size * self.hi_elem_bytes

    @property
    def lo_offsets(self) -> LoPageOffsets:
        h, b, d = self.num_kv_heads, self.block_size, self.head_size
        codes = h * b * d * self.lo_bits // 8                                # K, then V
        k_groups = h * d                                                     # per (head, channel)
        v_groups = h * b * (d // self.value_group_size)                      # per (token, group)
        k_scales = 2 * codes
        v_scales = k_scales + k_groups * SCALE_BYTES
        k_zeros = v_scales + v_groups * SCALE_BYTES
        v_zeros = k_zeros + k_groups * ZERO_BYTES
        return LoPageOffsets(0, codes, k_scales, v_scales, k_zeros, v_zeros,
                             v_zeros + v_groups * ZERO_BYTES)

    @property
    def lo_page_bytes(self) -> int:
        return self.lo_offsets.end

    @property
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
        return (
            f"hi page {self.hi_page_bytes} B, {self.lo_bits}-bit lo page {self.lo_page_bytes} B, "
            f"{self.pack_factor} lo pages per block; per token per layer: hi "
            f"{self.bytes_per_token(lo=False):.0f} B, lo {lo:.0f} B "
            f"({bf16 / lo:.2f}x fewer than bf16, {fp8 / lo:.2f}x fewer than fp8)")


def split_kv_cache(kv_cache, head_size: int):
    """Views [blocks, block_size, kv_heads, D] of the keys and the values of a layer's cache,
    as the attention backend allocates it: [blocks, kv_heads, block_size, 2 * D] stored with
    the tokens outermost, K then V in every row (what vLLM's FlashAttention reads)."""
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)


def cache_layout(key_cache, lo_bits: int, value_group_size: int) -> PageLayout:
    """The layout of one layer's cache, read off its key view [blocks, block_size, kv_heads, D]."""
    _, block_size, num_kv_heads, head_size = key_cache.shape
    return PageLayout(block_size, num_kv_heads, head_size, key_cache.element_size(), lo_bits,
                      value_group_size)


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
