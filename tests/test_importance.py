"""The worker-side importance meter (CPU tensors stand in for the GPU ones: same ops)."""
from __future__ import annotations

import torch

from mikv_vllm.importance import REPORT_EVERY, PageMassMeter, sampled_layers


def test_sampled_layers_are_two_inner_layers():
    assert sampled_layers(32) == [10, 21]
    assert sampled_layers(2) == [0, 1]
    assert sampled_layers(1) == [0]


def test_page_mass_sees_lengths_only_on_measured_steps():
    meter = PageMassMeter(num_blocks=10, max_rows=4, num_q_heads=8, num_kv_heads=2,
                          num_sampled_layers=2, tp_size=2, block_size=16, head_dim=128,
                          device=torch.device("cpu"))
    assert meter.weight == 1 / 8
    # one log-sum-exp per slab of 8 rows (1024 / head_dim) and query head, per block
    assert meter.slab_lse.shape == (10, 2, 8)
    lens = torch.tensor([5, 17, 0], dtype=torch.int32)
    measured = []
    for step in range(1, 3 * REPORT_EVERY + 1):
        if meter.step():
            measured.append(step)
            assert meter.lengths(lens).tolist() == [5, 17, 0]
        else:
            assert meter.lengths(lens).tolist() == [0, 0, 0]
    assert measured == [REPORT_EVERY, 2 * REPORT_EVERY, 3 * REPORT_EVERY]
    # the lengths live in the persistent buffer a captured CUDA graph reads
    assert meter.lengths(lens).data_ptr() == meter.seq_lens.data_ptr()
