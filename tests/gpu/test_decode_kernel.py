"""The CUDA paged decode kernel against the torch reference (GPU only)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from mikv_vllm import ops, reference

pytestmark = pytest.mark.gpu

POISON = float("nan")


def make_case(gen, *, num_seqs, num_kv_heads, group, head_dim, block_size, max_len, fp8,
              dtype=torch.bfloat16, split_layout=True):
    """Random caches in vLLM's layout (K|V per row), shuffled block tables, random lengths."""
    dev = "cuda"
    lens = torch.randint(1, max_len + 1, (num_seqs,), generator=gen)
    lens[0] = max_len  # the longest case is always present
    lens[-1] = 1       # and the shortest
    pages = (lens + block_size - 1) // block_size
    num_blocks = int(pages.sum()) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(num_seqs, int(pages.max()) + 2, dtype=torch.int32)
    used = 0
    for i, p in enumerate(pages.tolist()):
        table[i, :p] = perm[used:used + p].to(torch.int32)
        used += p
    kv = torch.randn(num_blocks, block_size, num_kv_heads, 2 * head_dim, generator=gen)
    if fp8:
        kv = (kv * 2).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        kv = kv.to(dtype)
    kv = kv.to(dev)
    k_cache, v_cache = kv.split(head_dim, dim=-1)
    q = torch.randn(num_seqs, num_kv_heads * group, head_dim, generator=gen).to(dtype).to(dev)
    return q, k_cache, v_cache, table.to(dev), lens.to(torch.int32).to(dev)


CASES = list(itertools.product(
    [False, True],         # fp8 cache
    [1, 4, 6, 8, 16],      # GQA group
    [64, 128, 256],        # head_dim
    [16, 32, 64],          # block size
))


@pytest.mark.parametrize("fp8,group,head_dim,block_size", CASES)
def test_decode_matches_reference(fp8, group, head_dim, block_size):
    gen = torch.Generator().manual_seed(hash((fp8, group, head_dim, block_size)) % 2**31)
    num_kv_heads = 2 if group < 16 else 1
    q, kc, vc, table, lens = make_case(gen, num_seqs=5, num_kv_heads=num_kv_heads, group=group,
                                       head_dim=head_dim, block_size=block_size,
                                       max_len=700, fp8=fp8)
    scale = 1.0 / math.sqrt(head_dim)
    k_scale, v_scale = (0.5, 0.25) if fp8 else (1.0, 1.0)
    ref = reference.paged_decode(q, kc, vc, table, lens, scale, k_scale, v_scale)
    for splits in (1, 3, 8):
        out = torch.full_like(q, POISON)
        ops.paged_decode(out, q, kc, vc, table, lens, scale, k_scale, v_scale, splits)
        torch.cuda.synchronize()
        assert not out.isnan().any(), f"unwritten outputs with {splits} splits"
        err = (out.float() - ref).norm() / ref.norm()
        assert err < 1e-2, f"relative error {err:.3e} with {splits} splits"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_context_and_fp16(dtype):
    gen = torch.Generator().manual_seed(7)
    q, kc, vc, table, lens = make_case(gen, num_seqs=3, num_kv_heads=8, group=4, head_dim=128,
                                       block_size=16, max_len=20000, fp8=False, dtype=dtype)
    ref = reference.paged_decode(q, kc, vc, table, lens, 0.088)
    out = torch.full_like(q, POISON)
    ops.paged_decode(out, q, kc, vc, table, lens, 0.088, 1.0, 1.0,
                     ops.decode_num_splits(3, 8, 4, 132))
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 1e-2


def test_zero_length_rows_give_zeros():
    """CUDA-graph padding rows have seq_len 0: they must be written (zeros), never NaN."""
    gen = torch.Generator().manual_seed(3)
    q, kc, vc, table, lens = make_case(gen, num_seqs=4, num_kv_heads=2, group=4, head_dim=128,
                                       block_size=16, max_len=100, fp8=False)
    lens[2] = 0
    for splits in (1, 4):
        out = torch.full_like(q, POISON)
        ops.paged_decode(out, q, kc, vc, table, lens, 0.1, 1.0, 1.0, splits)
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        assert not out.isnan().any()


def test_graph_capture_replays_with_new_lengths():
    """Captured once, replayed with longer sequences and a new table: still exact."""
    gen = torch.Generator().manual_seed(11)
    q, kc, vc, table, lens = make_case(gen, num_seqs=8, num_kv_heads=2, group=4, head_dim=128,
                                       block_size=16, max_len=900, fp8=False)
    out = torch.empty_like(q)
    short = torch.ones_like(lens)
    lens_buf = short.clone()
    splits = ops.decode_num_splits(8, 2, 4, torch.cuda.get_device_properties(0).multi_processor_count)
    ops.paged_decode(out, q, kc, vc, table, lens_buf, 0.1, 1.0, 1.0, splits)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_decode(out, q, kc, vc, table, lens_buf, 0.1, 1.0, 1.0, splits)
    lens_buf.copy_(lens)
    out.fill_(POISON)
    graph.replay()
    torch.cuda.synchronize()
    ref = reference.paged_decode(q, kc, vc, table, lens, 0.1)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 1e-2


def test_matches_flash_attention_decode():
    """All-hi pages: same result as vLLM's FlashAttention decode on the same cache."""
    fa = pytest.importorskip("vllm.v1.attention.backends.fa_utils")
    gen = torch.Generator().manual_seed(5)
    q, kc, vc, table, lens = make_case(gen, num_seqs=6, num_kv_heads=8, group=4, head_dim=128,
                                       block_size=16, max_len=3000, fp8=False)
    ours = torch.empty_like(q)
    ops.paged_decode(ours, q, kc, vc, table, lens, 0.088, 1.0, 1.0, 2)
    theirs = torch.empty_like(q)
    cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device="cuda")
    fa.flash_attn_varlen_func(q=q, k=kc, v=vc, out=theirs, cu_seqlens_q=cu_q, max_seqlen_q=1,
                              seqused_k=lens, max_seqlen_k=int(lens.max()), softmax_scale=0.088,
                              causal=True, block_table=table,
                              fa_version=fa.get_flash_attn_version())
    err = (ours.float() - theirs.float()).norm() / theirs.float().norm()
    assert err < 1e-2


def test_occupancy_sizes_the_grid():
    """decode_ctas_per_sm reads the kernel's occupancy: at least the launch bound's 3 CTAs per SM
    where D <= 128 and <= 4 heads share a CTA, fewer where a CTA holds 8 heads."""
    assert ops.decode_ctas_per_sm(128, 4, False) >= 3
    assert ops.decode_ctas_per_sm(128, 4, True, 4) >= 3
    assert 1 <= ops.decode_ctas_per_sm(128, 8, False) < ops.decode_ctas_per_sm(128, 4, False)
    assert ops.decode_ctas_per_sm(256, 16, True) >= 1
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.decode_ctas_per_sm(96, 4, False)
