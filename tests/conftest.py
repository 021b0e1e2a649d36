"""Shared setup of the mikv-vllm test suite.

On a machine without an NVIDIA GPU, vLLM's CpuPlatform is pinned *before* anything imports
vLLM's config machinery (benchmarks.harness.vllm_cpu says why). Where CUDA is available nothing is
pinned, so the GPU tests see vLLM's normal CUDA platform.

Tests marked `gpu` are skipped without CUDA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.harness.vllm_cpu import one_layer_kv_cache_config, pin_cpu_platform  # noqa: F401

HAS_CUDA = torch.cuda.is_available()

pin_cpu_platform()

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
