"""Per-page attention mass (slab log-sum-exps fused into the decode kernel, then page_mass)
against the torch reference."""
from __future__ import annotations

import math

import pytest
import torch

from mikv_vllm import ops, reference
from mikv_vllm.layout import PageLayout, encode_lo
from mikv_vllm.quant import quantize_page

pytestmark = pytest.mark.gpu


def mixed_case(gen, bs, heads, group, head_dim, lens):
    """A cache whose every third page is lo: (layout, k, v, raw, table, num_blocks, q)."""
    layout = PageLayout(bs, heads, head_dim, 2)
    n = layout.pack_factor
    pages = ((lens + bs - 1) // bs).tolist()
    total = sum(pages)
    num_blocks = total + total // n + 2
    kv = torch.randn(num_blocks, bs, heads, 2 * head_dim, generator=gen).to(torch.bfloat16).cuda()
    k, v = kv.split(head_dim, dim=-1)
    raw = kv.view(torch.uint8).reshape(num_blocks, -1)
    table = torch.zeros(len(pages), max(pages), dtype=torch.int32)
    code, used = total * n, 0
    for i, p in enumerate(pages):
        for j in range(p):
            table[i, j] = used
            if j % 3 == 1:  # every third page lo
                pack, slot = divmod(code, n)
                page = quantize_page(k[used].float().cpu(), v[used].float().cpu(), layout)
                raw[pack, slot * layout.lo_page_bytes:(slot + 1) * layout.lo_page_bytes] = page.cuda()
                table[i, j] = encode_lo(pack, slot, n)
                code += 1
            used += 1
    q = torch.randn(len(pages), heads * group, head_dim, generator=gen).to(torch.bfloat16).cuda()
    return layout, k, v, raw, table, num_blocks, q


@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("group,head_dim", [(4, 128), (1, 64), (8, 128), (16, 128), (2, 256)])
def test_page_mass_matches_reference(bs, splits, group, head_dim):
    gen = torch.Generator().manual_seed(splits * 100 + group + head_dim + bs)
    heads, seqs = 2, 3
    lens = torch.tensor([300, 17, 160])
    layout, k, v, raw, table, num_blocks, q = mixed_case(gen, bs, heads, group, head_dim, lens)
    table_d, lens_d = table.cuda(), lens.to(torch.int32).cuda()
    scale = 1 / math.sqrt(head_dim)
    lse = torch.full((seqs, heads * group), float("nan"), device="cuda")
    # NaN poison: page_mass must read only the slabs the decode kernel wrote.
    slab_lse = torch.full((num_blocks, ops.slabs_per_block(bs, head_dim), heads * group),
                          float("nan"), device="cuda")
    out = torch.empty_like(q)
    ops.paged_decode(out, q, k, v, table_d, lens_d, scale, 1.0, 1.0, splits, layout, lse,
                     slab_lse)
    mass = torch.zeros(num_blocks, device="cuda")
    ops.page_mass(mass, slab_lse, table_d, lens_d, lse, bs, heads, weight=1.0 / heads)
    plain = torch.empty_like(q)  # the importance output leaves attention unchanged
    ops.paged_decode(plain, q, k, v, table_d, lens_d, scale, 1.0, 1.0, splits, layout)
    assert torch.equal(plain, out)

    want = torch.zeros(num_blocks)
    k_all, v_all = reference.cache_to_float(k).cpu(), reference.cache_to_float(v).cpu()
    for i in range(seqs):
        kk, _ = reference.gather_kv(k_all, v_all, table[i], int(lens[i]), raw.cpu(), layout)
        for h in range(heads):
            qh = q[i, h * group:(h + 1) * group].float().cpu()
            probs = (qh @ kk[:, h].T * scale).softmax(-1)
            for p, m in enumerate(reference.page_mass(probs, bs).tolist()):
                if table[i, p] >= 0:
                    want[table[i, p]] += m / heads
    assert torch.isfinite(mass).all()
    assert torch.allclose(mass.cpu(), want, atol=2e-3), (mass.cpu() - want).abs().max()


def test_all_hi_masses_sum_to_one():
    gen = torch.Generator().manual_seed(7)
    bs, heads, group, d = 16, 4, 4, 128
    lens = [1000, 33, 517, 16]
    pages = [-(-n // bs) for n in lens]
    num_blocks = sum(pages) + 1
    k = torch.randn(num_blocks, bs, heads, d, generator=gen).to(torch.bfloat16).cuda()
    v = torch.randn(num_blocks, bs, heads, d, generator=gen).to(torch.bfloat16).cuda()
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 unused
    table = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    owner = torch.full((num_blocks,), -1)
    for i, p in enumerate(pages):
        for j in range(p):
            table[i, j] = perm.pop()
            owner[table[i, j]] = i
    q = torch.randn(len(lens), heads * group, d, generator=gen).to(torch.bfloat16).cuda()
    lse = torch.empty(len(lens), heads * group, device="cuda")
    slab_lse = torch.full((num_blocks, ops.slabs_per_block(bs, d), heads * group), float("nan"),
                          device="cuda")
    lens_d, table_d = torch.tensor(lens, dtype=torch.int32).cuda(), table.cuda()
    ops.paged_decode(torch.empty_like(q), q, k, v, table_d, lens_d, d ** -0.5, num_splits=3,
                     lse=lse, slab_lse=slab_lse)
    mass = torch.zeros(num_blocks, device="cuda")
    ops.page_mass(mass, slab_lse, table_d, lens_d, lse, bs, heads, weight=1.0 / heads)
    per_seq = torch.zeros(len(lens)).index_add_(0, owner[1:], mass.cpu()[1:])
    assert torch.allclose(per_seq, torch.ones(len(lens)), atol=1e-4), per_seq


def test_slab_gate_turns_the_slab_output_off():
    gen = torch.Generator().manual_seed(11)
    bs, heads, group, d, n = 16, 2, 4, 128, 300
    pages = -(-n // bs)
    k = torch.randn(pages, bs, heads, d, generator=gen).to(torch.bfloat16).cuda()
    v = torch.randn(pages, bs, heads, d, generator=gen).to(torch.bfloat16).cuda()
    table = torch.arange(pages, dtype=torch.int32).reshape(1, -1).cuda()
    lens = torch.tensor([n], dtype=torch.int32).cuda()
    q = torch.randn(1, heads * group, d, generator=gen).to(torch.bfloat16).cuda()
    lse = torch.empty(1, heads * group, device="cuda")
    shape = (pages, ops.slabs_per_block(bs, d), heads * group)
    ungated, gated = torch.full(shape, float("nan"), device="cuda"), \
        torch.full(shape, float("nan"), device="cuda")
    gate = torch.zeros(1, dtype=torch.int32, device="cuda")
    outs = [torch.empty_like(q) for _ in range(3)]
    ops.paged_decode(outs[0], q, k, v, table, lens, d ** -0.5, lse=lse, slab_lse=ungated)
    ops.paged_decode(outs[1], q, k, v, table, lens, d ** -0.5, lse=lse, slab_lse=gated,
                     slab_gate=gate)
    assert torch.isnan(gated).all()  # gate 0: nothing written
    gate.fill_(1)
    ops.paged_decode(outs[2], q, k, v, table, lens, d ** -0.5, lse=lse, slab_lse=gated,
                     slab_gate=gate)
    assert torch.equal(gated, ungated)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_split_decode_layers_measure_in_a_pass_of_their_own():
    """Under split decode a sampled layer measures in a pass of its own
    (MikvAttentionImpl._fused_decode with measure_only: the fused kernel over the meter's
    lengths, into a scratch output): a measured step gives the fused decode's masses, the
    other steps add nothing."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from mikv_vllm.integration.attention.impl import MikvAttentionImpl
    from mikv_vllm.importance import PageMassMeter

    gen = torch.Generator().manual_seed(5)
    bs, heads, group, d, splits = 16, 2, 4, 128, 3
    lens = torch.tensor([300, 17, 160])
    layout, k, v, _, table, num_blocks, q = mixed_case(gen, bs, heads, group, d, lens)
    table_d, lens_d = table.cuda(), lens.to(torch.int32).cuda()
    scale = d ** -0.5
    lse = torch.empty(len(lens), heads * group, device="cuda")
    slab_lse = torch.full((num_blocks, ops.slabs_per_block(bs, d), heads * group), float("nan"),
                          device="cuda")
    ops.paged_decode(torch.empty_like(q), q, k, v, table_d, lens_d, scale, 1.0, 1.0, splits,
                     layout, lse, slab_lse)
    want = torch.zeros(num_blocks, device="cuda")
    ops.page_mass(want, slab_lse, table_d, lens_d, lse, bs, heads, weight=1.0 / heads)

    meter = PageMassMeter(num_blocks, len(lens), heads * group, heads, 1, 1, bs, d,
                          torch.device("cuda"))
    impl = SimpleNamespace(scale=scale, layout=layout, num_kv_heads=heads)
    layer = SimpleNamespace(_k_scale_float=1.0, _v_scale_float=1.0)
    md = SimpleNamespace(num_decodes=len(lens), decode_seq_lens=lens_d,
                         decode_block_table=table_d, decode_num_splits=splits)
    measured = [meter.step() for _ in range(8)]
    assert measured == [False] * 7 + [True]
    meter.active.fill_(0)  # an unmeasured step
    MikvAttentionImpl._fused_decode(impl, layer, q, k, v, torch.empty_like(q), md, meter,
                                    measure_only=True)
    assert not meter.mass.any()
    meter.active.fill_(1)  # the measured one
    MikvAttentionImpl._fused_decode(impl, layer, q, k, v, torch.empty_like(q), md, meter,
                                    measure_only=True)
    assert want.sum() > 0
    assert torch.allclose(meter.mass, want, atol=1e-6), (meter.mass - want).abs().max()


def test_window_page_mass_never_waits_for_the_gpu():
    """The prefill observation window runs inside the forward on two layers of every prefill
    chunk: a host sync there (boolean indexing, .item()) would stall async scheduling."""
    from mikv_vllm.importance import window_page_mass

    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(12, 16, 2, 64, generator=gen).to(torch.bfloat16).cuda()
    table = torch.tensor([7, -3, 9, 1, 11, 0], dtype=torch.int32).cuda()
    query = torch.randn(6, 8, 64, generator=gen).to(torch.bfloat16).cuda()
    mass = torch.zeros(12, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        window_page_mass(mass, query, cache, table, 70, scale=0.125, weight=0.25)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mass[[0, 2, 3, 4, 5, 6, 8, 10]].abs().sum().item() == 0
