"""Tensor parallelism's rank logic on the CPU: two processes joined by vLLM's own distributed
setup (gloo) at TP 2. Each rank measures page mass over its own KV heads; the worker's
all-reduce must hand every rank, and so the scheduler, the sum (a rank's mass lost would rank
pages by half the model's heads)."""
from __future__ import annotations

import socket
import types

import pytest
import torch.multiprocessing as mp


def _rank(rank: int, port: int, results) -> None:
    from benchmarks.harness.vllm_cpu import pin_cpu_platform

    pin_cpu_platform()
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (init_distributed_environment,
                                                 initialize_model_parallel)

    from mikv_vllm.importance import PageMassMeter
    from mikv_vllm.integration.worker import MikvWorker

    config = VllmConfig()
    config.parallel_config.tensor_parallel_size = 2
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=2, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(tensor_model_parallel_size=2, backend="gloo")
        meter = PageMassMeter(num_blocks=6, max_rows=2, num_q_heads=4, num_kv_heads=1,
                              num_sampled_layers=2, tp_size=2, block_size=16, head_dim=64,
                              device=torch.device("cpu"))
        # rank r saw mass on blocks 3r..3r+2 only
        meter.mass[3 * rank:3 * rank + 3] = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
        reduce = MikvWorker._tp_all_reduce(types.SimpleNamespace(vllm_config=config))
        report = meter.take(reduce).result().tolist()
        results.put((rank, report, meter.mass.tolist(), meter.weight))


def test_page_mass_reports_are_summed_over_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    got = sorted(results.get(timeout=10) for _ in procs)
    for rank, report, after, weight in got:
        assert report == [1.0, 2.0, 3.0, 2.0, 4.0, 6.0], f"rank {rank} lost a rank's mass"
        assert after == [0.0] * 6              # accumulation restarts after a report
        assert weight == pytest.approx(1 / 4)  # 1 KV head x 2 ranks x 2 sampled layers


def test_one_rank_reports_without_a_collective():
    from vllm.config import VllmConfig

    from mikv_vllm.integration.worker import MikvWorker

    assert MikvWorker._tp_all_reduce(types.SimpleNamespace(vllm_config=VllmConfig())) is None
