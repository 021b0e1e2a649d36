"""Plain-torch references of every kernel: slow, obviously right, and the ground truth the
CUDA kernels are tested against (and what the CPU quality harness runs)."""
from __future__ import annotations

import torch


def cache_to_float(cache: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A hi-page cache (bf16/fp16, or fp8-e4m3 stored as uint8) as fp32 values."""
    if cache.dtype == torch.uint8:
        cache = cache.view(torch.float8_e4m3fn)
    return cache.float() * scale


def gather_pages(cache: torch.Tensor, block_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` token rows [seq_len, kv_heads, D] of one sequence's pages."""
    block_size = cache.shape[1]
    num_pages = -(-seq_len // block_size)
    pages = cache[block_row[:num_pages].long()]  # [pages, block, heads, D]
    return pages.reshape(-1, *cache.shape[2:])[:seq_len]


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


def paged_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Reference of `ops.paged_decode`: one query token per sequence, fp32 output."""
    k_all = cache_to_float(key_cache, k_scale)
    v_all = cache_to_float(value_cache, v_scale)
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        k = gather_pages(k_all, block_table[i], seq_len)
        v = gather_pages(v_all, block_table[i], seq_len)
        out[i] = attention(query[i:i + 1], k, v, scale, causal=False)[0]
    return out
