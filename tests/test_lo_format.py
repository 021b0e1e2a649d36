"""The lo page format (mikv_vllm.quant) and the reference attention over mixed page maps."""
from __future__ import annotations

import math

import pytest
import torch

from mikv_vllm import quant, reference
from mikv_vllm.layout import PageLayout, encode_lo
from mikv_vllm.quant import (_pack, _unpack, dequantize_page, quantization_error_bound,
                             quantize_page)


def layout(bits=2, block_size=16, heads=2, head_dim=64, group=32):
    return PageLayout(block_size=block_size, num_kv_heads=heads, head_size=head_dim,
                      hi_elem_bytes=2, lo_bits=bits, value_group_size=group)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=gen, dtype=torch.uint8)
    packed = _pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(_unpack(packed, bits).to(torch.uint8), codes)
    # element 0 sits in the low bits of byte 0
    one = torch.zeros(1, 8 // bits, dtype=torch.uint8)
    one[0, 0] = 1
    assert _pack(one, bits).item() == 1


@pytest.mark.parametrize("bits,group,head_dim", [(2, 32, 64), (2, 64, 128), (4, 64, 128),
                                                 (2, 128, 256)])
def test_round_trip_error_within_the_format_bound(bits, group, head_dim):
    lay = layout(bits=bits, head_dim=head_dim, group=group)
    gen = torch.Generator().manual_seed(bits * head_dim + group)
    k = torch.randn(16, 2, head_dim, generator=gen) * torch.rand(head_dim, generator=gen) * 5
    v = torch.randn(16, 2, head_dim, generator=gen)
    page = quantize_page(k, v, lay)
    assert page.dtype == torch.uint8 and page.numel() == lay.lo_page_bytes
    k2, v2 = dequantize_page(page, lay)
    k_bound = quantization_error_bound(k.amax(0) - k.amin(0), bits)             # per channel
    assert ((k - k2).abs() <= k_bound).all()
    vg = v.reshape(16, 2, head_dim // group, group)
    v_bound = quantization_error_bound(vg.amax(-1) - vg.amin(-1), bits)        # per group
    err = (v - v2).abs().reshape(16, 2, head_dim // group, group)
    assert (err <= v_bound.unsqueeze(-1)).all()


def test_constant_groups_do_not_divide_by_zero():
    lay = layout()
    k = torch.full((16, 2, 64), 3.0)
    v = torch.zeros(16, 2, 64)
    k2, v2 = dequantize_page(quantize_page(k, v, lay), lay)
    # a constant 3.0 is 127 steps of an fp16 scale: exact up to the scale's fp16 rounding
    assert torch.allclose(k2, k, rtol=2.0 ** -10) and torch.allclose(v2, v)


def test_outlier_balancing_round_trips():
    lay = layout()
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(16, 2, 64, generator=gen)
    k[..., 3] *= 40  # an outlier channel
    v = torch.randn(16, 2, 64, generator=gen)
    balance = torch.rand(2, 64, generator=gen) + 0.5
    k2, _ = dequantize_page(quantize_page(k, v, lay, balance), lay, balance)
    assert (k - k2).abs().max() < (k.amax(0) - k.amin(0)).max() / 3


def test_offsets_describe_the_bytes():
    lay = layout(bits=2, block_size=32, heads=1, head_dim=128, group=64)
    o = lay.lo_offsets
    assert (o.v_codes, o.k_scales, o.v_scales, o.k_zeros, o.v_zeros, o.end) == (
        1024, 2048, 2304, 2432, 2560, 2624)
    assert o.end == lay.lo_page_bytes


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="expected K and V"):
        quantize_page(torch.zeros(8, 2, 64), torch.zeros(8, 2, 64), layout())


@pytest.mark.parametrize("bits", [2, 4])
def test_reference_decode_over_mixed_pages(bits):
    """Lo entries in the table read the dequantized slot: the same as attention over the
    round-tripped K/V of those pages."""
    lay = layout(bits=bits)
    gen = torch.Generator().manual_seed(11 + bits)
    blocks, n = 10, lay.pack_factor
    kv = torch.randn(blocks, 16, 2, 128, generator=gen).to(torch.bfloat16)
    k_cache, v_cache = kv.split(64, dim=-1)
    raw = kv.view(torch.uint8).reshape(blocks, -1)
    pages = [4, 0, 6, 2]          # hi blocks of one sequence's 4 pages
    table = torch.tensor([pages], dtype=torch.int32)
    k_ref = [k_cache[b].float() for b in pages]
    v_ref = [v_cache[b].float() for b in pages]
    for idx, slot in ((1, 0), (3, 1)):    # demote pages 1 and 3 into pack block 9
        b = pages[idx]
        page = quantize_page(k_cache[b].float(), v_cache[b].float(), lay)
        raw[9, slot * lay.lo_page_bytes:(slot + 1) * lay.lo_page_bytes] = page
        table[0, idx] = encode_lo(9, slot, n)
        k_ref[idx], v_ref[idx] = dequantize_page(page, lay)
    q = torch.randn(1, 8, 64, generator=gen)
    seq_len = 60
    out = reference.paged_decode(q, k_cache, v_cache, table, torch.tensor([seq_len]),
                                 0.125, cache_bytes=raw, layout=lay)
    want = reference.attention(q, torch.cat(k_ref)[:seq_len], torch.cat(v_ref)[:seq_len], 0.125,
                               causal=False)
    assert torch.allclose(out, want, atol=1e-5)
    with pytest.raises(ValueError, match="lo page"):
        reference.paged_decode(q, k_cache, v_cache, table, torch.tensor([seq_len]), 0.125)


def test_page_mass_sums_to_one():
    gen = torch.Generator().manual_seed(2)
    probs = torch.rand(4, 70, generator=gen).softmax(-1)
    mass = reference.page_mass(probs, 16)
    assert mass.shape == (5,)
    assert math.isclose(mass.sum().item(), 1.0, rel_tol=1e-5)
    assert torch.allclose(mass[0], probs[:, :16].sum(-1).mean())


def test_e4m3_scales_round_up_and_keep_the_error_bounded():
    """The harness's 1-byte-scale experiment: scales rounded up to float8-e4m3 values still
    span each group (codes in range) and cost at most 1/8 of a step more error."""
    from mikv_vllm.quant import e4m3_up

    s = torch.rand(1000) * 20 + 1e-3
    up = e4m3_up(s)
    assert (up >= s).all() and (up <= s * 1.125 + 2.0 ** -9).all()
    assert torch.equal(up.to(torch.float8_e4m3fn).float(), up)  # exactly representable
    layout = PageLayout(16, 2, 64, 2, 2, 64)
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(16, 2, 64, generator=gen) * 3
    v = torch.randn(16, 2, 64, generator=gen)
    dk, dv = dequantize_page(quantize_page(k, v, layout, e4m3_scales=True), layout)
    k_step = (k.amax(0) - k.amin(0)) / 3
    assert ((dk - k).abs() <= k_step * 0.5625 + 1e-3).all()
    v_step = (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True)) / 3
    assert ((dv - v).abs() <= v_step * 0.5625 + 1e-3).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_codes_and_params_sit_where_the_kernel_fragments_read_them(bits):
    """One nonzero code / parameter at a chosen (token, channel): its bits land in lane
    4g + j's run, pair and half as the quant.py docstring (and csrc/paged_decode.cu) say."""
    lay = layout(bits=bits, block_size=32, heads=2, head_dim=64, group=32)
    h, b, d = lay.num_kv_heads, lay.block_size, lay.head_size
    o = lay.lo_offsets
    lane_bytes = d * bits // 16
    # K: head 1, tile 1, g = 3, j = 2, chunk 2, r = 3 (token +8, channels +8), element 1.
    k_codes = torch.zeros(h, b, d, dtype=torch.uint8)
    k_codes[1, 16 + 3 + 8, 16 * 2 + 2 * 2 + 8 + 1] = 1
    packed = quant._pack_codes(k_codes, "k", bits)
    word, i = quant.pair_slot(2, 3, d, bits)
    run = (1 * (b // 16) + 1) * 32 + 4 * 3 + 2       # (head 1, tile 1, lane 14)
    base = run * lane_bytes + 4 * word
    value = int.from_bytes(bytes(packed[base:base + 4].tolist()), "little")
    assert value == 1 << (16 + i * bits) and int(packed.ne(0).sum()) == 1
    # V: head 0, tile 0, g = 5, j = 1, m-tile 3, r = 2 (tokens +8), element 0.
    v_codes = torch.zeros(h, b, d, dtype=torch.uint8)
    v_codes[0, 2 * 1 + 8, 16 * 3 + 5] = 1
    packed = quant._pack_codes(v_codes, "v", bits)
    word, i = quant.pair_slot(3, 2, d, bits)
    base = (4 * 5 + 1) * lane_bytes + 4 * word
    assert int.from_bytes(bytes(packed[base:base + 4].tolist()), "little") == 1 << (i * bits)
    # Scales and zero points: all-distinct values, codes 0, so each dequantized element is
    # -zero * scale; check one K and one V position of each.
    page = torch.zeros(lay.lo_page_bytes, dtype=torch.uint8)
    kz = -(torch.arange(h * d) % 100 + 1).to(torch.int8)           # value = (0 - zero) * scale
    vz = -(torch.arange(h * b * (d // 32)) % 100 + 1).to(torch.int8)
    ks = torch.arange(h * d).to(torch.float16) / 64 + 1
    vs = torch.arange(h * b * (d // 32)).to(torch.float16) / 64 + 1
    page[o.k_scales:o.v_scales] = ks.view(torch.uint8)
    page[o.v_scales:o.k_zeros] = vs.view(torch.uint8)
    page[o.k_zeros:o.v_zeros] = kz.view(torch.uint8)
    page[o.v_zeros:o.end] = vz.view(torch.uint8)
    k, v = quant.dequantize_page(page, lay)
    # (head 1, channel 16c + 2j + 8 half + e) at [1, j, c, half, e]
    jj, c, half, e = 3, 1, 1, 0
    flat = (((1 * 4 + jj) * (d // 16) + c) * 2 + half) * 2 + e
    assert k[0, 1, 16 * c + 2 * jj + 8 * half + e] == -kz[flat].float() * ks[flat].float()
    # (head 0, token 16T + 2j + 8 half + e, group 1) at [0, T, 1, j, half, e]
    t_, jj, half, e = 1, 2, 0, 1
    flat = (((t_ * (d // 32) + 1) * 4 + jj) * 2 + half) * 2 + e
    assert v[16 * t_ + 2 * jj + 8 * half + e, 0, 40] == -vz[flat].float() * vs[flat].float()


def test_zero_points_are_whole_steps_in_int8():
    """Zero points are int8 numbers of steps; a channel whose offset is far larger than its
    range gets a coarser step instead, and stays within half of it."""
    lay = layout(head_dim=64, group=32)
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(16, 2, 64, generator=gen) + torch.randn(64, generator=gen) * 40
    k[:, :, 5] += 1000.0                                   # offset 1000, range ~4
    v = torch.randn(16, 2, 64, generator=gen)
    codes, scale, zero = quant._quantize_groups(k.float(), 2, 0)
    assert zero.dtype == torch.int8
    k2, _ = dequantize_page(quantize_page(k, v, lay), lay)
    bound = quantization_error_bound(k.amax(0) - k.amin(0), 2, k.amin(0))
    assert ((k - k2).abs() <= bound).all()
    assert (k - k2)[:, :, 5].abs().max() > 1.0             # the offset channel got coarser


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("bits", [2, 4])
def test_pair_slots_fill_each_lane_run_once_and_zero_point_partners_share_a_slot(d, bits):
    """The kernel's a_fragment unpacks registers r = 0, 1 (one zero point) and r = 2, 3 (the
    other) with one fma constant per slot: partners must share the slot, and every (word,
    slot) of a lane's run must hold exactly one pair."""
    words, slots = d * bits // 64, 16 // bits
    seen = set()
    for chunk in range(d // 16):
        placed = [quant.pair_slot(chunk, r, d, bits) for r in range(4)]
        assert placed[0][1] == placed[1][1] and placed[2][1] == placed[3][1]
        for word, slot in placed:
            assert 0 <= word < words and 0 <= slot < slots
            seen.add((word, slot))
    assert len(seen) == words * slots


@pytest.mark.parametrize("head_size,group,bits,heads", [(128, 64, 2, 2), (64, 32, 4, 3),
                                                         (128, 128, 2, 1)])
def test_roundtrip_pages_is_the_stored_pages_arithmetic(head_size, group, bits, heads):
    """The harness's many-pages round trip equals quantize_page -> dequantize_page, page by
    page, to the bit."""
    from mikv_vllm.quant import roundtrip_pages

    torch.manual_seed(head_size + bits)
    lay = PageLayout(16, heads, head_size, 2, bits, group)
    k = torch.randn(heads, 48, head_size) * 3 + 1
    v = torch.randn(heads, 48, head_size)
    dk, dv = roundtrip_pages(k, v, lay)
    for p in range(3):
        r = slice(16 * p, 16 * p + 16)
        page = quantize_page(k[:, r].permute(1, 0, 2), v[:, r].permute(1, 0, 2), lay)
        ek, ev = dequantize_page(page, lay)
        assert torch.equal(ek.permute(1, 0, 2), dk[:, r])
        assert torch.equal(ev.permute(1, 0, 2), dv[:, r])


@pytest.mark.parametrize("bits,block_size,head_dim", [(2, 16, 128), (4, 16, 64), (2, 32, 128),
                                                      (2, 16, 256)])
def test_exact_key_outliers_are_stored_after_the_zeros_in_position_order(bits, block_size,
                                                                         head_dim):
    """With key_outliers a page ends in one 32-bit word per exact key and head (position
    t * D + c, its fp16 correction above), positions ascending and distinct; the picked keys
    come back to the correction's fp16 rounding, the rest within the bound of what remains of
    their channel, and never worse than without outliers."""
    lay = PageLayout(block_size, 2, head_dim, 2, bits, 64, key_outliers=True)
    plain = PageLayout(block_size, 2, head_dim, 2, bits, 64)
    slots = lay.outlier_slots
    assert slots % 16 == 0 and abs(slots - 0.01 * block_size * head_dim) <= 8
    assert lay.lo_offsets.k_outliers == plain.lo_page_bytes
    assert lay.lo_page_bytes == plain.lo_page_bytes + 2 * slots * 4
    gen = torch.Generator().manual_seed(bits + block_size + head_dim)
    k = torch.randn(block_size, 2, head_dim, generator=gen) * torch.rand(head_dim, generator=gen) * 4
    k[3, 1, 7] = 60.0
    v = torch.randn(block_size, 2, head_dim, generator=gen)
    page = quantize_page(k, v, lay)
    words = page[lay.lo_offsets.k_outliers:].view(torch.int32).reshape(2, slots)
    pos = words & 0xFFFF
    assert (pos[:, 1:] > pos[:, :-1]).all(), "positions ascend, each once"
    assert 3 * head_dim + 7 in pos[1].tolist()
    k2, v2 = dequantize_page(page, lay)
    _, v_plain = dequantize_page(quantize_page(k, v, plain), plain)
    assert torch.equal(v2, v_plain), "values are untouched"
    kept = torch.zeros(2, block_size * head_dim, dtype=torch.bool).scatter_(1, pos.long(), True)
    kept = kept.reshape(2, block_size, head_dim).transpose(0, 1)
    err = (k2 - k).abs()
    assert (err[kept] <= k[kept].abs() * 2.0 ** -10 + 1e-3).all()
    rest = torch.where(kept, float("nan"), k)
    lo, hi = rest.nan_to_num(float("inf")).amin(0), rest.nan_to_num(float("-inf")).amax(0)
    assert (err[~kept] <= quantization_error_bound(hi - lo, bits, lo).expand_as(err)[~kept]).all()
    k_plain, _ = dequantize_page(quantize_page(k, v, plain), plain)
    assert err.square().sum() < (k_plain - k).square().sum()


def test_outlier_picks_take_the_first_of_ties():
    """The greedy's ties (what csrc/quantize.cu reproduces): between equal gains the first
    channel, within a channel the first token of an extreme."""
    x = torch.zeros(1, 1, 16, 4)
    x[0, 0, 5, 1] = 3.0  # channels 1 and 3: one spike each, equal gains
    x[0, 0, 2, 3] = 3.0
    picks = [quant.select_outliers(x, 2, n).nonzero()[:, 2:].tolist() for n in (1, 2, 3, 4)]
    assert picks[0] == [[5, 1]]
    assert picks[1] == [[2, 3], [5, 1]]
    assert picks[2] == [[0, 0], [2, 3], [5, 1]]  # all gains 0: channel 0, its first token
    assert picks[3] == [[0, 0], [1, 0], [2, 3], [5, 1]]
