"""Shared setup of the mikv-vllm test suite.

On a machine without an NVIDIA GPU, the CUDA build of vLLM cannot infer a platform and even
building the `vllm serve` parser fails ("Failed to infer device type"). Pinning vLLM's
CpuPlatform *before* anything imports vLLM's config machinery makes the real parser, EngineArgs
and create_engine_config work here. Where CUDA is available nothing is pinned, so the GPU tests
see vLLM's normal CUDA platform.

Tests marked `gpu` are skipped without CUDA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    import vllm.platforms as _platforms
    from vllm.platforms.cpu import CpuPlatform

    _platforms._current_platform = CpuPlatform()

GPU_SKIP_REASON = "needs an NVIDIA GPU and the built mikv CUDA kernels"
FIXTURES = Path(__file__).parent / "fixtures"
GPU_WORKER = "vllm.v1.worker.gpu_worker.Worker"  # what vLLM picks on a CUDA machine


def pytest_configure(config):
    # Declared in pyproject.toml too; repeated so that runs with another ini file (-c) and
    # --strict-markers still know it.
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU and the built CUDA kernels")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    """A 2-layer Llama (head_dim 64, 8 query heads, 2 KV heads): config.json only."""
    return str(FIXTURES / "tiny-llama")


@pytest.fixture(scope="session")
def serve_parser():
    """The real `vllm serve` argument parser (loads the general plugins, as `vllm serve` does)."""
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


@pytest.fixture
def parse_serve(serve_parser, tiny_llama):
    """parse_serve(*argv, model=tiny_llama) -> the argparse Namespace `vllm serve` would get on a
    GPU machine: this CPU machine's vLLM platform would pick its CPU worker, so the GPU worker is
    named unless argv names one."""
    def parse(*argv: str, model: str | None = None):
        worker = [] if "--worker-cls" in argv else ["--worker-cls", GPU_WORKER]
        return serve_parser.parse_args(["--model", model or tiny_llama, *worker, *argv])
    return parse


@pytest.fixture
def serve_engine_config(parse_serve):
    """serve_engine_config(*argv, model=...) -> (AsyncEngineArgs, VllmConfig) built exactly as
    `vllm serve` builds them: parser -> AsyncEngineArgs.from_cli_args -> create_engine_config."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    def build(*argv: str, model: str | None = None):
        engine_args = AsyncEngineArgs.from_cli_args(parse_serve(*argv, model=model))
        return engine_args, engine_args.create_engine_config()
    return build


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
