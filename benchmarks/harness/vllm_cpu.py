"""Real vLLM objects on a machine without a GPU, for the CPU tests and the scheduler benchmark.

The CUDA build of vLLM cannot infer a platform without an NVIDIA GPU (even building the
`vllm serve` parser fails: "Failed to infer device type"). Pinning vLLM's CpuPlatform before
anything imports vLLM's config machinery makes the real parser, EngineArgs and
create_engine_config work; the scheduler and KV cache manager do not depend on the platform."""
from __future__ import annotations

import torch


def pin_cpu_platform() -> None:
    """Pin vLLM's CpuPlatform where CUDA is unavailable (a no-op on a GPU machine)."""
    if not torch.cuda.is_available():
        import vllm.platforms as platforms
        from vllm.platforms.cpu import CpuPlatform

        platforms._current_platform = CpuPlatform()


def one_layer_kv_cache_config(num_blocks: int, block_size: int, num_kv_heads: int,
                              head_size: int, layer: str = "model.layers.0.self_attn.attn"):
    """A real vLLM KVCacheConfig: one full-attention layer, `num_blocks` bf16 blocks."""
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,
                                            KVCacheTensor)

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads,
                             head_size=head_size, dtype=torch.bfloat16)
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=spec.page_size_bytes * num_blocks, shared_by=[layer])],
        kv_cache_groups=[KVCacheGroupSpec([layer], spec)])
