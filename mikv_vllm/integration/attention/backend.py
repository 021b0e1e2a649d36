"""The backend class vLLM selects for `--kv-cache-dtype mikv` (registered as CUSTOM).

KV layout per layer: logical [blocks, kv_heads, block_size, 2 * D] stored as
[blocks, block_size, kv_heads, 2 * D] (K then V per row), the layout vLLM's FlashAttention
reads, so prefill runs FlashAttention on the same tensor. One block is one contiguous page,
which is what lets a block later hold a pack of 2-bit pages (`layout.split_kv_cache` gives the
K and V views)."""
from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType, MultipleOf

SUPPORTED_HEAD_SIZES = (64, 128, 256)


class MikvAttentionBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = [
        "auto", "float16", "bfloat16", "fp8", "fp8_e4m3"]
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        from mikv_vllm.integration.attention.impl import MikvAttentionImpl
        return MikvAttentionImpl

    @staticmethod
    def get_builder_cls():
        from mikv_vllm.integration.attention.metadata import MikvMetadataBuilder
        return MikvMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int, cache_dtype_str: str = "auto") -> tuple[int, ...]:
        if block_size % 16:
            raise ValueError(f"mikv: block size must be a multiple of 16, got {block_size}")
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False
                                  ) -> tuple[int, ...]:
        # Physical order: blocks, (layers,) tokens, heads, K|V.
        if include_num_layers_dimension:
            return (1, 0, 3, 2, 4)
        return (0, 2, 1, 3)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in SUPPORTED_HEAD_SIZES

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability.to_int() >= 80
