"""Plain-torch references of every kernel: slow, obviously right, and the ground truth the
CUDA kernels are tested against (and what the CPU quality harness runs)."""
from __future__ import annotations

import math

import torch

from mikv_vllm.layout import PageLayout
from mikv_vllm.quant import dequantize_page, quantize_page


def cache_to_float(cache: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A hi-page cache (bf16/fp16, or fp8-e4m3 stored as uint8) as fp32 values."""
    if cache.dtype == torch.uint8:
        cache = cache.view(torch.float8_e4m3fn)
    return cache.float() * scale


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              causal: bool = True) -> torch.Tensor:
    """Softmax attention in fp32. q: [Tq, Hq, D]; k, v: [Tk, Hkv, D] (GQA by head groups).

    With `causal`, query i sits at position Tk - Tq + i and sees keys up to it."""
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        tq, tk = q.shape[0], k.shape[0]
        pos_q = torch.arange(tk - tq, tk, device=q.device)[:, None]
        pos_k = torch.arange(tk, device=q.device)[None, :]
        scores = scores.masked_fill(pos_k > pos_q, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def gather_kv(k_all: torch.Tensor, v_all: torch.Tensor, block_row: torch.Tensor, seq_len: int,
              cache_bytes: torch.Tensor | None = None, layout: PageLayout | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K and V rows [seq_len, kv_heads, D] over a page map of hi blocks and lo
    slots of either tier (negative entries, read from `cache_bytes` [blocks, block_bytes] with
    `layout`)."""
    num_pages = -(-seq_len // k_all.shape[1])
    ks, vs = [], []
    for entry in block_row[:num_pages].tolist():
        if entry >= 0:
            ks.append(k_all[entry])
            vs.append(v_all[entry])
            continue
        if cache_bytes is None or layout is None:
            raise ValueError("a lo page in the block table needs cache_bytes and layout")
        k, v = dequantize_page(*lo_slot(cache_bytes, entry, layout))
        ks.append(k)
        vs.append(v)
    return torch.cat(ks)[:seq_len], torch.cat(vs)[:seq_len]


def lo_slot(cache_bytes: torch.Tensor, entry: int, layout: PageLayout
            ) -> tuple[torch.Tensor, PageLayout]:
    """The bytes of a lo page's slot (a view into `cache_bytes` [blocks, block_bytes]) and its
    tier's layout."""
    block, slot, tier = layout.locate(entry)
    start = slot * tier.lo_page_bytes
    return cache_bytes[block, start:start + tier.lo_page_bytes], tier


def quantize_pages(cache_bytes: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, src: torch.Tensor, dst_codes: torch.Tensor,
                   layout: PageLayout, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Reference of `ops.quantize_pages`, writing into `cache_bytes` [blocks, block_bytes] (the
    bytes of the cache that `key_cache`/`value_cache` view): hi sources quantized from their
    values, lo sources (entries < 0) requantized from their dequantized codes."""
    for s, code in zip(src.tolist(), dst_codes.tolist()):
        if s >= 0:
            k, v = cache_to_float(key_cache[s], k_scale), cache_to_float(value_cache[s], v_scale)
        else:
            k, v = dequantize_page(*lo_slot(cache_bytes, s, layout))
        dst, tier = lo_slot(cache_bytes, -1 - code, layout)
        dst.copy_(quantize_page(k, v, tier))


def paged_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 k_scale: float = 1.0, v_scale: float = 1.0,
                 cache_bytes: torch.Tensor | None = None,
                 layout: PageLayout | None = None) -> torch.Tensor:
    """Reference of `ops.paged_decode`: one query token per sequence, fp32 output, over hi
    pages and (with `cache_bytes` and `layout`) lo pages."""
    k_all = cache_to_float(key_cache, k_scale)
    v_all = cache_to_float(value_cache, v_scale)
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        k, v = gather_kv(k_all, v_all, block_table[i], seq_len, cache_bytes, layout)
        out[i] = attention(query[i:i + 1], k, v, scale, causal=False)[0]
    return out


def merge_parts(other: torch.Tensor, other_lse: torch.Tensor, own: torch.Tensor,
                own_lse2: torch.Tensor) -> torch.Tensor:
    """Reference of `ops.paged_decode`'s `merge_lse` (split decode's merge), fp32: `other`
    [rows, heads, D] is the attention over some of each row's keys with natural-log lse
    `other_lse` [heads, >= rows] (FlashAttention's; +-inf: no keys), `own` the attention over
    the rest with log2 lse `own_lse2` [rows, heads] (-inf: no keys, and `other` is kept)."""
    lse2 = other_lse[:, :own.shape[0]].t().float() * math.log2(math.e)
    other_empty = torch.isinf(lse2)
    mx = torch.where(other_empty, own_lse2, torch.maximum(lse2, own_lse2))
    w_other = torch.where(other_empty, 0.0, torch.exp2(lse2 - mx))
    w_own = torch.exp2(own_lse2 - mx)
    merged = ((w_other[..., None] * other.float() + w_own[..., None] * own.float())
              / (w_other + w_own)[..., None])
    return torch.where(torch.isneginf(own_lse2)[..., None], other.float(), merged)


def page_mass(probs: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention mass per page: probs [q_heads, seq_len] of one decode step for the query heads
    of one KV head -> [pages], summed over a page's tokens and averaged over the heads (each
    head's probabilities sum to 1, so the masses do too)."""
    heads, seq_len = probs.shape
    pages = -(-seq_len // block_size)
    padded = probs.new_zeros(heads, pages * block_size)
    padded[:, :seq_len] = probs
    return padded.reshape(heads, pages, block_size).sum(-1).mean(0)


def split_page_table(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                     hi_table: torch.Tensor, hi_lens: torch.Tensor, lo_table: torch.Tensor,
                     lo_lens: torch.Tensor) -> None:
    """Split decode's table partition (csrc/split_tables.cu): a stable partition of each row's
    used pages of `block_table` [rows, pages] (hi block ids >= 0, lo codes < 0) into hi_table
    and lo_table (entries past a part's pages are 0), and the tokens of each part into hi_lens
    and lo_lens, all written in place."""
    rows, pages = block_table.shape
    col = torch.arange(pages, device=block_table.device)
    seq_lens = seq_lens.to(torch.int64)
    used = col[None, :] < ((seq_lens + block_size - 1) // block_size)[:, None]
    tokens = (seq_lens[:, None] - col[None, :] * block_size).clamp(0, block_size)
    for part, table, lens in ((used & (block_table >= 0), hi_table, hi_lens),
                              (used & (block_table < 0), lo_table, lo_lens)):
        # Each entry of the part goes to its rank within the part; the rest to a spill column.
        dest = torch.where(part, part.cumsum(1) - 1, pages)
        spill = torch.zeros(rows, pages + 1, dtype=block_table.dtype, device=block_table.device)
        spill.scatter_(1, dest, block_table)
        table.copy_(spill[:, :pages])
        lens.copy_((tokens * part).sum(1))
