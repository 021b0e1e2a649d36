"""Split decode (hi pages through vLLM's FlashAttention, lo pages through the mikv kernel,
merged by log-sum-exp) against the fused kernel and the torch reference (GPU only)."""
from __future__ import annotations

import math

import pytest
import torch

from mikv_vllm import ops, reference
from mikv_vllm.integration.attention import split_decode
from mikv_vllm.layout import PageLayout

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("rows,pages,lo_share", [
    (1, 1, 0.5), (7, 9, 0.4), (16, 140, 0.0), (16, 140, 1.0), (64, 300, 0.3), (128, 1030, 0.6)])
def test_split_page_table_kernel_matches_reference(rows, pages, lo_share):
    """csrc/split_tables.cu against the torch reference: a strided view of a wider table (as
    vLLM's, rounded up past max_model_len's pages), rows of every length including empty ones
    and ones past a chunk of the kernel's width, outputs poisoned beforehand."""
    gen = torch.Generator().manual_seed(rows * 1000 + pages)
    wide = torch.randint(0, 1 << 20, (rows, pages + 7), generator=gen, dtype=torch.int32)
    lo = torch.rand(rows, pages + 7, generator=gen) < lo_share
    wide = torch.where(lo, -1 - wide, wide)
    bs = 16
    lens = torch.randint(0, pages * bs + 1, (rows,), generator=gen, dtype=torch.int32)
    lens[0] = pages * bs  # one row uses every column
    if rows > 2:
        lens[1] = 0
    table = wide.cuda()[:, :pages]
    want = [torch.zeros(rows, pages, dtype=torch.int32), torch.zeros(rows, dtype=torch.int32),
            torch.zeros(rows, pages, dtype=torch.int32), torch.zeros(rows, dtype=torch.int32)]
    reference.split_page_table(wide[:, :pages], lens, bs, *want)
    got = [torch.full(w.shape, -7, dtype=torch.int32, device="cuda") for w in want]
    ops.split_page_table(table, lens.cuda(), bs, *got)
    for name, g, w in zip(("hi_table", "hi_lens", "lo_table", "lo_lens"), got, want):
        assert torch.equal(g.cpu(), w), name


@pytest.mark.parametrize("tiered", [False, True])
@pytest.mark.parametrize("fa_splits", [0, 32])
@pytest.mark.parametrize("lo_share", [0.0, 0.5, 0.9])
def test_split_decode_matches_fused_kernel(fa_splits, lo_share, tiered):
    """`tiered`: lo pages split between a 4-bit and the 2-bit tier."""
    fa = pytest.importorskip("vllm.v1.attention.backends.fa_utils")
    gen = torch.Generator().manual_seed(int(lo_share * 10) + fa_splits + tiered)
    bs, heads, group, d = 16, 8, 4, 128
    layout = PageLayout(bs, heads, d, 2, mid_bits=4 if tiered else None)
    lens = torch.tensor([3000, 17, 1, 700, 16 * 40], dtype=torch.int32)
    pages = [-(-int(x) // bs) for x in lens]
    blocks = 2 * sum(pages) + 4  # hi pages, then the 2-bit packs, then the 4-bit ones
    kv = torch.randn(blocks, bs, heads, 2 * d, generator=gen).to(torch.bfloat16).cuda()
    k, v = kv.split(d, dim=-1)
    table = torch.zeros(len(pages), max(pages) + 3, dtype=torch.int32)
    table[:, max(pages):] = 77  # entries past the pages are never read
    perm = (torch.randperm(sum(pages), generator=gen) + 1).tolist()
    src, codes = [], []
    slots = {False: 0, True: 0}
    first_pack = {False: sum(pages) + 2, True: sum(pages) + 2 + sum(pages) // 2}
    for i, p in enumerate(pages):
        for j in range(p):
            table[i, j] = perm.pop()
            if 0 < j < p - 1 and torch.rand(1, generator=gen).item() < lo_share:
                mid = tiered and torch.rand(1, generator=gen).item() < 0.5
                n = layout.tier(mid).pack_factor
                src.append(int(table[i, j]))
                codes.append(layout.lo_code(first_pack[mid] + slots[mid] // n, slots[mid] % n,
                                            mid))
                table[i, j] = -1 - codes[-1]
                slots[mid] += 1
    if src:
        ops.quantize_pages(k, v, torch.tensor(src, dtype=torch.int32).cuda(),
                           torch.tensor(codes, dtype=torch.int32).cuda(), layout)
    table_d, lens_d = table.cuda(), lens.cuda()
    q = torch.randn(len(pages), heads * group, d, generator=gen).to(torch.bfloat16).cuda()
    scale = 1 / math.sqrt(d)
    splits = 2

    fused = torch.empty_like(q)
    ops.paged_decode(fused, q, k, v, table_d, lens_d, scale, 1.0, 1.0, splits, layout)

    tables = split_decode.SplitTables(8, table.shape[1] + 5, torch.device("cuda"))
    hi_t, hi_lens, lo_t, lo_lens = tables.fill(table_d, lens_d, bs)
    assert torch.equal(hi_lens + lo_lens, lens_d)
    cu_q = torch.arange(len(pages) + 1, dtype=torch.int32, device="cuda")

    def flash_hi(hi_out):
        return fa.flash_attn_varlen_func(
            q=q, k=k, v=v, out=hi_out, cu_seqlens_q=cu_q, max_seqlen_q=1, seqused_k=hi_lens,
            max_seqlen_k=int(lens.max()), softmax_scale=scale, causal=True, block_table=hi_t,
            return_softmax_lse=True, num_splits=fa_splits,
            fa_version=fa.get_flash_attn_version())[1]
    # the lo-only table alone: every row written (a row without lo pages gives 0 and -inf)
    lo_out = torch.full_like(q, float("nan"))
    lo_lse = torch.full((len(pages), heads * group), float("nan"), device="cuda")
    ops.paged_decode(lo_out, q, k, v, lo_t, lo_lens, scale, 1.0, 1.0, splits, layout, lo_lse)
    assert torch.isfinite(lo_out).all() and not torch.isnan(lo_lse).any()
    merged = torch.full_like(q, float("nan"))
    split_decode.decode(merged, q, k, v, lo_t, lo_lens, flash_hi, scale, 1.0, 1.0, splits,
                        layout)

    assert torch.isfinite(merged).all()
    raw = kv.view(torch.uint8).reshape(blocks, -1)
    ref = reference.paged_decode(q.float().cpu(), k.cpu(), v.cpu(), table, lens, scale,
                                 cache_bytes=raw.cpu(), layout=layout)
    for got in (fused, merged):
        err = (got.float().cpu() - ref).norm() / ref.norm()
        assert err < 1e-2, err
    assert (merged.float() - fused.float()).norm() / fused.float().norm() < 1e-2


def _merge_case(seed):
    """Hi pages of five rows (one empty), queries, another part's output and its lse."""
    gen = torch.Generator().manual_seed(seed)
    bs, heads, group, d = 16, 2, 4, 128
    layout = PageLayout(bs, heads, d, 2)
    lens = torch.tensor([100, 0, 37, 512, 16], dtype=torch.int32)
    pages = [-(-int(x) // bs) for x in lens]
    # K and V halves of one cache tensor, as vLLM lays them out (lo pages are sized to it)
    kv = torch.randn(sum(pages) + 1, bs, heads, 2 * d, generator=gen).to(torch.bfloat16).cuda()
    k, v = kv.split(d, dim=-1)
    table = torch.zeros(len(pages), max(pages), dtype=torch.int32)
    ids = iter(range(1, sum(pages) + 1))
    for i, p in enumerate(pages):
        table[i, :p] = torch.tensor([next(ids) for _ in range(p)], dtype=torch.int32)
    q = torch.randn(len(pages), heads * group, d, generator=gen).to(torch.bfloat16).cuda()
    other = torch.randn(q.shape, generator=gen).to(torch.bfloat16).cuda()
    # FlashAttention's layout [heads, rows], wider than the rows as its buffers may be
    other_lse = (torch.rand(heads * group, len(pages) + 3, generator=gen) * 8 - 2).cuda()
    return layout, k, v, table.cuda(), lens.cuda(), q, 1 / math.sqrt(d), other, other_lse


def _own_part(layout, k, v, table, lens, q, scale, splits):
    own = torch.full_like(q, float("nan"))
    own_lse2 = torch.full(q.shape[:2], float("nan"), device="cuda")
    ops.paged_decode(own, q, k, v, table, lens, scale, 1.0, 1.0, splits, layout, own_lse2)
    return own, own_lse2


@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_merges_its_part_into_out(splits):
    """With merge_lse the kernel's last write combines `out` (another part's attention, with
    its natural-log lse) and its own pages' attention by softmax weight; a row with no pages in
    the table keeps `out`, and an infinite lse (an empty other part) gives the kernel's own."""
    layout, k, v, table, lens, q, scale, other, other_lse = _merge_case(7 + splits)
    own, own_lse2 = _own_part(layout, k, v, table, lens, q, scale, splits)
    other_lse[:, 2] = float("inf")
    other_lse[:3, 3] = float("-inf")
    out = other.clone()
    ops.paged_decode(out, q, k, v, table, lens, scale, 1.0, 1.0, splits, layout,
                     merge_lse=other_lse)

    expect = reference.merge_parts(other, other_lse, own, own_lse2)
    assert torch.equal(out[1], other[1])  # no pages: out untouched
    err = (out.float() - expect).norm() / expect.norm()
    assert err < 1e-2, err


@pytest.mark.parametrize("skip_empty", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
def test_captured_merge_runs_only_when_a_row_has_pages(splits, skip_empty):
    """Under a CUDA graph a merging call with skip_empty sits in a conditional node
    (csrc/graph_gate.cu), and without it launches every replay: either way replays with every
    row empty leave `out` as it was, bit for bit, and replays with pages merge them."""
    layout, k, v, table, lens, q, scale, other, other_lse = _merge_case(11 + splits)
    own, own_lse2 = _own_part(layout, k, v, table, lens, q, scale, splits)
    expect = reference.merge_parts(other, other_lse, own, own_lse2)
    lens_buf = torch.zeros_like(lens)
    out = other.clone()
    ops.paged_decode(out, q, k, v, table, lens_buf, scale, 1.0, 1.0, splits, layout,
                     merge_lse=other_lse, skip_empty=skip_empty)  # warm up, outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_decode(out, q, k, v, table, lens_buf, scale, 1.0, 1.0, splits, layout,
                         merge_lse=other_lse, skip_empty=skip_empty)
    for step_lens in (lens_buf.clone(), lens, lens_buf.clone(), lens):
        lens_buf.copy_(step_lens)
        out.copy_(other)
        graph.replay()
        torch.cuda.synchronize()
        if int(step_lens.sum()) == 0:
            assert torch.equal(out, other)
        else:
            assert torch.equal(out[1], other[1])
            err = (out.float() - expect).norm() / expect.norm()
            assert err < 1e-2, err
