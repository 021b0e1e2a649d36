"""mikv_vllm.reference (the ground truth of the CUDA kernels) against attention written out by
hand: contiguous K/V per sequence, one query head at a time, torch.softmax."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from mikv_vllm import reference

GARBAGE = 1e4  # written past every sequence's end: a reference that reads it fails loudly


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    visible: int | None = None) -> torch.Tensor:
    """q [Hq, D] against k/v [T, Hkv, D] (query head h reads KV head h // group), fp32."""
    hq, hkv = q.shape[0], k.shape[1]
    group = hq // hkv
    t = k.shape[0] if visible is None else visible
    out = torch.empty(hq, v.shape[-1])
    for h in range(hq):
        kh, vh = k[:t, h // group].float(), v[:t, h // group].float()
        probs = torch.softmax((kh @ q[h].float()) * scale, dim=0)
        out[h] = probs @ vh
    return out


def make_paged_case(seed: int, *, num_seqs: int, num_kv_heads: int, group: int, head_dim: int,
                    block_size: int, fp8: bool, k_scale: float = 1.0, v_scale: float = 1.0):
    """Per-sequence K/V scattered into a paged cache in vLLM's layout ([blocks, block, heads,
    2D] split into K and V views) through a shuffled block table."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 5 * block_size, (num_seqs,), generator=gen)
    lens[0], lens[1] = 1, block_size          # length 1 and an exact page
    lens[2] = 3 * block_size + 1               # one token into a new page
    pages = [-(-int(n) // block_size) for n in lens]
    num_blocks = sum(pages) + 4
    perm = torch.randperm(num_blocks, generator=gen)
    max_pages = max(pages) + 2
    # Unused table entries point at real blocks holding other data.
    table = perm[torch.randint(0, num_blocks, (num_seqs, max_pages), generator=gen)]
    table = table.to(torch.int32)
    kv = torch.full((num_blocks, block_size, num_kv_heads, 2 * head_dim), GARBAGE)
    ks, vs, used = [], [], 0
    for i, (n, p) in enumerate(zip(lens.tolist(), pages)):
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        blocks = perm[used:used + p]
        used += p
        table[i, :p] = blocks.to(torch.int32)
        for j, b in enumerate(blocks.tolist()):
            rows = slice(j * block_size, min(n, (j + 1) * block_size))
            count = rows.stop - rows.start
            kv[b, :count, :, :head_dim] = k[rows]
            kv[b, :count, :, head_dim:] = v[rows]
        ks.append(k)
        vs.append(v)
    if fp8:
        scales = torch.cat([torch.full((head_dim,), k_scale), torch.full((head_dim,), v_scale)])
        cache = (kv / scales).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        stored = cache.view(torch.float8_e4m3fn).float() * scales
    else:
        cache = kv.to(torch.bfloat16)
        stored = cache.float()
    # What each sequence's K/V are after the cache's rounding, contiguous again.
    ks_stored, vs_stored = [], []
    for i, (n, p) in enumerate(zip(lens.tolist(), pages)):
        rows = stored[table[i, :p].long()].reshape(-1, num_kv_heads, 2 * head_dim)[:n]
        ks_stored.append(rows[..., :head_dim])
        vs_stored.append(rows[..., head_dim:])
    q = torch.randn(num_seqs, num_kv_heads * group, head_dim, generator=gen).to(torch.bfloat16)
    k_cache, v_cache = cache.split(head_dim, dim=-1)
    return q, k_cache, v_cache, table, lens.to(torch.int32), ks_stored, vs_stored


CASES = list(itertools.product([1, 4, 8], [64, 128], [False, True], [16, 32]))


@pytest.mark.parametrize("group,head_dim,fp8,block_size", CASES)
def test_paged_decode_matches_plain_attention(group, head_dim, fp8, block_size):
    seed = 1000 * group + head_dim + 7 * fp8 + block_size
    num_kv_heads = 2
    k_scale, v_scale = (0.5, 0.25) if fp8 else (1.0, 1.0)
    q, kc, vc, table, lens, ks, vs = make_paged_case(
        seed, num_seqs=6, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
        block_size=block_size, fp8=fp8, k_scale=k_scale, v_scale=v_scale)
    scale = 1.0 / math.sqrt(head_dim)
    out = reference.paged_decode(q, kc, vc, table, lens, scale, k_scale, v_scale)
    assert out.dtype == torch.float32 and out.shape == q.shape
    for i in range(q.shape[0]):
        expected = plain_attention(q[i], ks[i], vs[i], scale)
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, i=i: f"sequence {i} (len {lens[i]}): {m}")
    assert out.abs().max() < 100, "the reference read garbage past a sequence's end"


def test_paged_decode_zero_length_gives_zeros():
    q, kc, vc, table, lens, ks, vs = make_paged_case(
        3, num_seqs=4, num_kv_heads=2, group=4, head_dim=64, block_size=16, fp8=False)
    lens[3] = 0
    out = reference.paged_decode(q, kc, vc, table, lens, 0.125)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    torch.testing.assert_close(out[0], plain_attention(q[0], ks[0], vs[0], 0.125),
                               rtol=1e-4, atol=1e-5)


def test_paged_decode_single_token_returns_its_value():
    q, kc, vc, table, lens, ks, vs = make_paged_case(
        5, num_seqs=3, num_kv_heads=2, group=4, head_dim=128, block_size=16, fp8=False)
    assert lens[0] == 1
    out = reference.paged_decode(q, kc, vc, table, lens, 0.1)
    expected = vs[0][0].repeat_interleave(4, dim=0)  # softmax over one key is 1
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tq,tk,group,head_dim", [
    (1, 1, 1, 64), (5, 5, 4, 64), (7, 19, 8, 128), (16, 40, 2, 128), (3, 100, 1, 64)])
def test_attention_causal_matches_loop(tq, tk, group, head_dim):
    gen = torch.Generator().manual_seed(tq * 1000 + tk)
    hkv = 2
    q = torch.randn(tq, hkv * group, head_dim, generator=gen)
    k = torch.randn(tk, hkv, head_dim, generator=gen)
    v = torch.randn(tk, hkv, head_dim, generator=gen)
    scale = 1.0 / math.sqrt(head_dim)
    out = reference.attention(q, k, v, scale, causal=True)
    for i in range(tq):
        # Query i sits at position tk - tq + i and sees keys 0 .. tk - tq + i.
        expected = plain_attention(q[i], k, v, scale, visible=tk - tq + i + 1)
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-5)
    full = reference.attention(q, k, v, scale, causal=False)
    for i in range(tq):
        torch.testing.assert_close(full[i], plain_attention(q[i], k, v, scale),
                                   rtol=1e-4, atol=1e-5)


def test_attention_causal_first_query_of_a_square_block_sees_one_key():
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(4, 2, 64, generator=gen)
    k = torch.randn(4, 2, 64, generator=gen)
    v = torch.randn(4, 2, 64, generator=gen)
    out = reference.attention(q, k, v, 0.125, causal=True)
    torch.testing.assert_close(out[0], v[0], rtol=0, atol=1e-6)


def test_cache_to_float_fp8_storage():
    values = torch.tensor([0.5, -1.0, 2.0, 448.0])
    stored = values.to(torch.float8_e4m3fn).view(torch.uint8)
    torch.testing.assert_close(reference.cache_to_float(stored, 0.5), values * 0.5)
