"""Lo (2/4-bit) pages on the GPU: the quantize kernel and the decode kernel over mixed page
maps (hi pages with one lo tier, or with 4-bit and 2-bit tiers side by side), against the torch
reference in mikv_vllm.quant / mikv_vllm.reference (GPU only)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from mikv_vllm import ops, reference
from mikv_vllm.layout import PageLayout
from mikv_vllm.quant import dequantize_page, quantization_error_bound, quantize_page

pytestmark = pytest.mark.gpu


def make_cache(gen, num_blocks, block_size, heads, head_dim, fp8):
    kv = torch.randn(num_blocks, block_size, heads, 2 * head_dim, generator=gen)
    kv[..., :head_dim] *= torch.rand(head_dim, generator=gen) * 4  # key channel outliers
    kv = (kv * 2).to(torch.float8_e4m3fn).view(torch.uint8) if fp8 else kv.to(torch.bfloat16)
    kv = kv.cuda()
    k, v = kv.split(head_dim, dim=-1)
    return kv, k, v


def layout_of(block_size, heads, head_dim, fp8, bits, group, mid_bits=None, key_outliers=False):
    return PageLayout(block_size=block_size, num_kv_heads=heads, head_size=head_dim,
                      hi_elem_bytes=1 if fp8 else 2, lo_bits=bits, value_group_size=group,
                      mid_bits=mid_bits, key_outliers=key_outliers)


@pytest.mark.parametrize("fp8,bits,head_dim,block_size", list(itertools.product(
    [False, True], [2, 4], [64, 128, 256], [16, 32])))
def test_quantize_kernel_matches_reference(fp8, bits, head_dim, block_size):
    check_quantize(fp8, bits, head_dim, block_size)


@pytest.mark.parametrize("fp8,bits,head_dim,block_size", [
    (False, 2, 128, 16), (True, 2, 128, 16), (False, 4, 64, 16), (False, 2, 64, 32),
    (False, 2, 256, 16), (False, 2, 128, 64), (True, 4, 256, 32)])
def test_quantize_kernel_keeps_the_references_exact_keys(fp8, bits, head_dim, block_size):
    """The kernel's greedy picks the reference's outlier keys (same ties, same fp32 gains) and
    writes their corrections in position order: the page's bytes match."""
    check_quantize(fp8, bits, head_dim, block_size, key_outliers=True)


def check_quantize(fp8, bits, head_dim, block_size, key_outliers=False):
    gen = torch.Generator().manual_seed(head_dim * 10 + block_size + bits + fp8 + key_outliers)
    heads = 4
    layout = layout_of(block_size, heads, head_dim, fp8, bits, min(64, head_dim),
                       key_outliers=key_outliers)
    n = layout.pack_factor
    kv, k, v = make_cache(gen, 12, block_size, heads, head_dim, fp8)
    k_scale, v_scale = (0.5, 0.25) if fp8 else (1.0, 1.0)
    src = torch.tensor([3, 7, 1, 9, 4][:n + 1], dtype=torch.int32)
    dst = torch.tensor([10 * n + i for i in range(min(n, len(src)))] +
                       [11 * n + i for i in range(len(src) - min(n, len(src)))], dtype=torch.int32)
    before = kv.view(torch.uint8).reshape(12, -1).clone()
    kv.view(torch.uint8).reshape(12, -1)[10:].fill_(0xFF)  # poison the pack blocks
    ops.quantize_pages(k, v, src.cuda(), dst.cuda(), layout, k_scale, v_scale)
    torch.cuda.synchronize()
    raw = kv.view(torch.uint8).reshape(12, -1)
    assert torch.equal(raw[:10], before[:10]), "blocks outside the packs changed"
    k_all = reference.cache_to_float(k, k_scale).cpu()
    v_all = reference.cache_to_float(v, v_scale).cpu()
    for s, code in zip(src.tolist(), dst.tolist()):
        block, slot = divmod(code, n)
        got = raw[block, slot * layout.lo_page_bytes:(slot + 1) * layout.lo_page_bytes].cpu()
        want = quantize_page(k_all[s], v_all[s], layout)
        # Bit-exact but for rare fp32 rounding ties (seen: 1 byte of ~20K on the H100 with
        # fp8 hi pages, 4-bit, head_dim 256); every value must still round-trip in bound.
        mismatch = (got != want).float().mean().item()
        assert mismatch <= 1e-3, f"{mismatch:.2%} of the lo page bytes differ from the reference"
        k_rt, v_rt = dequantize_page(got, layout)
        k_bound = quantization_error_bound(k_all[s].amax(0) - k_all[s].amin(0), bits,
                                           k_all[s].amin(0))
        assert ((k_rt - k_all[s]).abs() <= k_bound).all()
        g = layout.value_group_size
        vg = v_all[s].reshape(block_size, heads, head_dim // g, g)
        v_bound = quantization_error_bound(vg.amax(-1) - vg.amin(-1), bits,
                                           vg.amin(-1)).unsqueeze(-1)
        v_err = (v_rt - v_all[s]).abs().reshape(block_size, heads, head_dim // g, g)
        assert (v_err <= v_bound).all()


@pytest.mark.parametrize("fp8,head_dim,block_size,key_outliers", [
    (False, 128, 16, False), (False, 64, 32, False), (False, 256, 16, False),
    (False, 128, 64, False), (False, 128, 16, True), (False, 64, 32, True)])
def test_quantize_kernel_moves_pages_between_tiers(fp8, head_dim, block_size, key_outliers):
    """(A 4-bit page never packs twice into an fp8 block: tiers go with bf16 hi pages.)
    Hi pages into 4-bit slots, then those on into 2-bit slots (requantized from the 4-bit
    codes) with more hi pages into 4-bit in the same launch: the bytes the reference writes,
    and nothing outside the packs touched."""
    gen = torch.Generator().manual_seed(head_dim + block_size + fp8)
    heads, blocks = 2, 16
    layout = layout_of(block_size, heads, head_dim, fp8, 2, min(64, head_dim), mid_bits=4,
                       key_outliers=key_outliers)
    mid = layout.mid
    kv, k, v = make_cache(gen, blocks, block_size, heads, head_dim, fp8)
    k_scale, v_scale = (0.5, 0.25) if fp8 else (1.0, 1.0)
    raw = kv.view(torch.uint8).reshape(blocks, -1)
    raw[12:].fill_(0xFF)  # poison the pack blocks: 12, 13 (4-bit), 14 (2-bit)
    want = raw.cpu()
    k_cpu, v_cpu = k.cpu(), v.cpu()
    first = (torch.tensor([3, 7, 1, 9][:mid.pack_factor + 1], dtype=torch.int32),
             torch.tensor([layout.lo_code(12 + i // mid.pack_factor, i % mid.pack_factor, True)
                           for i in range(min(4, mid.pack_factor + 1))], dtype=torch.int32))
    moved = first[1][:2]
    second = (torch.cat([-1 - moved, torch.tensor([5], dtype=torch.int32)]),
              torch.cat([torch.tensor([layout.lo_code(14, 0), layout.lo_code(14, 1)],
                                      dtype=torch.int32),
                         torch.tensor([layout.lo_code(13, mid.pack_factor - 1, True)],
                                      dtype=torch.int32)]))
    for src, dst in (first, second):
        before = raw.clone()
        ops.quantize_pages(k, v, src.cuda(), dst.cuda(), layout, k_scale, v_scale)
        torch.cuda.synchronize()
        reference.quantize_pages(want, k_cpu, v_cpu, src, dst, layout, k_scale, v_scale)
        got = raw.cpu()
        assert torch.equal(got[:12], before[:12].cpu()), "blocks outside the packs changed"
        for code in dst.tolist():
            slot_got, tier = reference.lo_slot(got, -1 - code, layout)
            slot_want, _ = reference.lo_slot(want, -1 - code, layout)
            mismatch = (slot_got != slot_want).float().mean().item()
            assert mismatch <= 1e-3, f"{mismatch:.2%} of a {tier.lo_bits}-bit page's bytes differ"
            want_slot = reference.lo_slot(want, -1 - code, layout)[0]
            want_slot.copy_(slot_got)  # carry the kernel's bytes forward (fp32 ties)


CASES = list(itertools.product(
    [False, True],        # fp8 hi pages
    [2, 4],               # lo bits
    [1.0, 0.25, 0.1, 0.0],  # hi fraction
    [(4, 128), (8, 128), (1, 64), (6, 256)],  # (GQA group, head_dim)
))


@pytest.mark.parametrize("fp8,bits,hi_fraction,gqa_dim", CASES)
def test_mixed_decode_matches_reference(fp8, bits, hi_fraction, gqa_dim):
    check_mixed_decode(fp8, bits, hi_fraction, *gqa_dim, block_size=16)


@pytest.mark.parametrize("fp8,bits,group,head_dim,block_size", [
    (False, 2, 4, 128, 32), (False, 4, 16, 128, 32), (False, 2, 2, 64, 32),
    (True, 2, 6, 256, 32), (False, 2, 4, 128, 64), (True, 2, 3, 64, 64)])
def test_mixed_decode_with_several_tiles_per_page(fp8, bits, group, head_dim, block_size):
    """Blocks of 32 and 64 tokens: a lo page is 2 or 4 16-token tensor-core tiles; GQA 16 runs
    in two head chunks."""
    check_mixed_decode(fp8, bits, 0.25, group, head_dim, block_size=block_size)


@pytest.mark.parametrize("hi_fraction,gqa_dim,block_size", [
    (0.25, (4, 128), 16), (0.0, (8, 128), 16), (0.1, (1, 64), 32), (0.25, (6, 256), 32),
    (1.0, (4, 128), 16), (0.0, (2, 64), 64), (0.5, (16, 128), 16)])
def test_decode_over_two_lo_tiers(hi_fraction, gqa_dim, block_size):
    """Hi, 4-bit and 2-bit pages in one table: the kernel's two lo passes and its hi pass
    merge into the reference's attention."""
    check_mixed_decode(False, 2, hi_fraction, *gqa_dim, block_size=block_size, mid_bits=4)


@pytest.mark.parametrize("fp8,bits,hi_fraction,gqa_dim,block_size,mid_bits", [
    (False, 2, 0.0, (4, 128), 16, None), (True, 2, 0.25, (8, 128), 16, None),
    (False, 4, 0.1, (1, 64), 16, None), (False, 2, 0.25, (6, 256), 16, None),
    (False, 2, 0.0, (16, 128), 32, None), (False, 2, 0.1, (2, 64), 64, None),
    (False, 2, 0.25, (4, 128), 16, 4), (False, 2, 0.0, (8, 128), 32, 4)])
def test_mixed_decode_with_exact_key_outliers(fp8, bits, hi_fraction, gqa_dim, block_size,
                                              mid_bits):
    """Lo pages that keep exact keys: the kernel's extra mma per 16 of them adds each
    correction to its token's scores for every head, in one tier or two, any block size."""
    check_mixed_decode(fp8, bits, hi_fraction, *gqa_dim, block_size=block_size,
                       mid_bits=mid_bits, key_outliers=True)


def check_mixed_decode(fp8, bits, hi_fraction, group, head_dim, block_size, mid_bits=None,
                       key_outliers=False):
    heads, num_seqs = 2, 4
    gen = torch.Generator().manual_seed(int(hi_fraction * 100) + bits + group + fp8)
    layout = layout_of(block_size, heads, head_dim, fp8, bits, 64 if head_dim >= 64 else 32,
                       mid_bits, key_outliers)
    lens = torch.randint(1, 600, (num_seqs,), generator=gen)
    lens[0] = 600
    pages = ((lens + block_size - 1) // block_size).tolist()
    total = sum(pages)
    num_blocks = 2 * total + 4  # hi pages in blocks [0, total); each tier's packs after them
    kv, k, v = make_cache(gen, num_blocks, block_size, heads, head_dim, fp8)
    k_scale, v_scale = (0.5, 0.25) if fp8 else (1.0, 1.0)
    raw = kv.view(torch.uint8).reshape(num_blocks, -1)
    k_all = reference.cache_to_float(k, k_scale).cpu()
    v_all = reference.cache_to_float(v, v_scale).cpu()
    table = torch.zeros(num_seqs, max(pages), dtype=torch.int32)
    perm = torch.randperm(total, generator=gen)
    tiers = [False] if mid_bits is None else [False, True]  # the 2-bit tier, the middle one
    next_slot = {False: 0, True: 0}
    first_pack = {False: total, True: total + total // 2 + 2}
    used = 0
    for i, p in enumerate(pages):
        for j in range(p):
            block = int(perm[used])
            used += 1
            if torch.rand(1, generator=gen).item() < hi_fraction:
                table[i, j] = block
                continue
            mid = tiers[int(torch.randint(len(tiers), (1,), generator=gen))]
            tier = layout.tier(mid)
            pack, slot = divmod(next_slot[mid], tier.pack_factor)
            next_slot[mid] += 1
            code = layout.lo_code(first_pack[mid] + pack, slot, mid)
            dst, _ = reference.lo_slot(raw, -1 - code, layout)
            dst.copy_(quantize_page(k_all[block], v_all[block], tier).cuda())
            table[i, j] = -1 - code
    table, lens = table.cuda(), lens.to(torch.int32).cuda()
    q = torch.randn(num_seqs, heads * group, head_dim, generator=gen).to(torch.bfloat16).cuda()
    scale = 1.0 / math.sqrt(head_dim)
    ref = reference.paged_decode(q.cpu(), k.cpu(), v.cpu(), table.cpu(), lens.cpu(), scale,
                                 k_scale, v_scale, raw.cpu(), layout)
    for splits in (1, 4):
        out = torch.full_like(q, float("nan"))
        ops.paged_decode(out, q, k, v, table, lens, scale, k_scale, v_scale, splits, layout)
        torch.cuda.synchronize()
        assert not out.isnan().any()
        err = (out.float().cpu() - ref).norm() / ref.norm()
        assert err < 1e-2, f"relative error {err:.3e} with {splits} splits"
