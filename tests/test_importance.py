"""The worker-side importance meter (CPU tensors stand in for the GPU ones: same ops)."""
from __future__ import annotations

import pytest
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


def _window_reference(query, keys, seq_len, block_size, scale):
    """Per-page mass of the window's queries over a sequence's keys [T, kv_heads, D], straight
    from the definition: each query's softmax over the keys it sees, averaged over the queries
    and the query heads of each KV head, summed over KV heads."""
    w, q_heads, _ = query.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    pages = -(-seq_len // block_size)
    out = torch.zeros(pages)
    for i in range(w):
        pos = seq_len - w + i
        for h in range(q_heads):
            s = (keys[:pos + 1, h // group].float() @ query[i, h].float()) * scale
            p = s.softmax(0)
            for t in range(pos + 1):
                out[t // block_size] += p[t] / (w * group)
    return out


def test_window_page_mass_matches_the_definition():
    from mikv_vllm.importance import window_page_mass

    torch.manual_seed(0)
    bs, kv_heads, q_heads, d, seq_len, w = 16, 2, 8, 64, 70, 6
    cache = torch.randn(12, bs, kv_heads, d, dtype=torch.bfloat16)
    table = torch.tensor([7, 3, 9, 1, 11, 0], dtype=torch.int32)  # 5 pages used, then padding
    query = torch.randn(w, q_heads, d, dtype=torch.bfloat16)
    keys = cache[table[:5].long()].flatten(0, 1)[:seq_len]
    mass = torch.zeros(12)
    window_page_mass(mass, query, cache, table, seq_len, scale=d ** -0.5, weight=0.25)
    want = _window_reference(query, keys, seq_len, bs, d ** -0.5) * 0.25
    torch.testing.assert_close(mass[table[:5].long()], want, atol=1e-5, rtol=1e-4)
    assert mass.sum().item() == pytest.approx(0.25 * kv_heads, rel=1e-5)  # 1 per KV head
    assert mass[[0, 2, 4, 5, 6, 8, 10]].abs().sum() == 0                   # other blocks


def test_window_page_mass_leaves_out_lo_pages_and_reads_fp8_keys():
    from mikv_vllm.importance import window_page_mass

    torch.manual_seed(1)
    bs, d, seq_len = 16, 64, 48
    keys = torch.randn(6, bs, 1, d)
    cache = keys.to(torch.float8_e4m3fn).view(torch.uint8)  # vLLM keeps fp8 caches as bytes
    query = torch.randn(4, 2, d)
    table = torch.tensor([2, -5, 4], dtype=torch.int32)  # page 1 is lo
    mass = torch.zeros(6)
    window_page_mass(mass, query, cache, table, seq_len, scale=0.1, weight=1.0, k_scale=2.0)
    assert mass[[0, 1, 3, 5]].sum() == 0
    # the lo page's tokens take no part: the hi pages' masses still sum to 1
    assert mass[2] + mass[4] == pytest.approx(1.0, rel=1e-5)
    deq = keys.to(torch.float8_e4m3fn).float() * 2.0
    # the same keys with the lo page cut out: each query sees the same tokens of both pages
    ref = _window_reference(query, deq[[2, 4]].flatten(0, 1), 32, bs, 0.1)
    torch.testing.assert_close(mass[[2, 4]], ref, atol=1e-5, rtol=1e-4)
