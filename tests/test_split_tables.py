"""Split decode's table partition (CPU tensors: the torch reference of csrc/split_tables.cu)
and why the merged parts equal attention over the whole page map (torch reference with real lo
pages)."""
from __future__ import annotations

import math

import torch

from mikv_vllm import reference
from mikv_vllm.integration.attention.split_decode import SplitTables
from mikv_vllm.layout import PageLayout, encode_lo
from mikv_vllm.quant import quantize_page

BS = 16


def random_table(gen, rows, pages, lo_share=0.4):
    table = torch.randint(1, 1000, (rows, pages), generator=gen, dtype=torch.int32)
    lo = torch.rand(rows, pages, generator=gen) < lo_share
    return torch.where(lo, -table, table)  # negative entries stand for lo codes


def test_partition_keeps_order_and_counts_tokens():
    gen = torch.Generator().manual_seed(0)
    rows, pages = 7, 9
    table = random_table(gen, rows, pages)
    lens = torch.tensor([1, 16, 17, 100, 144, 0, 33], dtype=torch.int32)
    tables = SplitTables(8, 12, torch.device("cpu"))
    tables.hi_table.fill_(-7)  # stale values from an earlier step
    hi, hi_lens, lo, lo_lens = tables.fill(table, lens, BS)
    for r in range(rows):
        n = int(lens[r])
        used = table[r, :-(-n // BS)].tolist()
        tokens = [min(BS, n - j * BS) for j in range(len(used))]
        want_hi = [e for e in used if e >= 0]
        want_lo = [e for e in used if e < 0]
        assert hi[r].tolist() == want_hi + [0] * (pages - len(want_hi))
        assert lo[r].tolist() == want_lo + [0] * (pages - len(want_lo))
        assert int(hi_lens[r]) == sum(t for e, t in zip(used, tokens) if e >= 0)
        assert int(lo_lens[r]) == sum(t for e, t in zip(used, tokens) if e < 0)
        assert int(hi_lens[r] + lo_lens[r]) == n
    # views of the persistent buffers (what captured CUDA graphs read)
    assert hi.data_ptr() == tables.hi_table.data_ptr()
    assert lo_lens.data_ptr() == tables.lo_lens.data_ptr()


def test_partial_last_page_stays_last_in_its_part():
    table = torch.tensor([[5, -3, 6, -4, 7]], dtype=torch.int32)  # last page hi, 3 tokens
    hi, hi_lens, lo, lo_lens = (torch.zeros(1, 5, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                                torch.zeros(1, 5, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    reference.split_page_table(table, torch.tensor([4 * BS + 3]), BS, hi, hi_lens, lo, lo_lens)
    assert hi.tolist() == [[5, 6, 7, 0, 0]] and int(hi_lens[0]) == 2 * BS + 3
    assert lo.tolist() == [[-3, -4, 0, 0, 0]] and int(lo_lens[0]) == 2 * BS


def _attend_with_lse(q, k, v, scale):
    """Softmax attention of one token [H, D] over k, v [T, Hkv, D]: (out [H, D], lse [H])."""
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("hd,thd->ht", q.float(), k) * scale
    return torch.einsum("ht,thd->hd", s.softmax(-1), v), torch.logsumexp(s, -1)


def test_merged_parts_equal_attention_over_the_whole_map():
    gen = torch.Generator().manual_seed(3)
    heads, group, d = 2, 4, 64
    layout = PageLayout(BS, heads, d, 2)
    n = layout.pack_factor
    lens = [5 * BS + 7, 3 * BS, 9]
    pages = [-(-x // BS) for x in lens]
    blocks = sum(pages) + sum(pages) // n + 2
    kv = torch.randn(blocks, BS, heads, 2 * d, generator=gen).to(torch.bfloat16)
    k, v = kv.split(d, dim=-1)
    raw = kv.view(torch.uint8).reshape(blocks, -1)
    table = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    used, code = 1, sum(pages) * n + n
    for i, p in enumerate(pages):
        for j in range(p):
            table[i, j] = used
            if j % 2 == 1 and j < p - 1:  # every other page lo, never the last
                pack, slot = divmod(code, n)
                page = quantize_page(k[used].float(), v[used].float(), layout)
                raw[pack, slot * layout.lo_page_bytes:(slot + 1) * layout.lo_page_bytes] = page
                table[i, j] = encode_lo(pack, slot, n)
                code += 1
            used += 1
    q = torch.randn(len(lens), heads * group, d, generator=gen)
    scale = 1 / math.sqrt(d)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    want = reference.paged_decode(q, k, v, table, lens_t, scale, cache_bytes=raw, layout=layout)

    tables = SplitTables(len(lens), max(pages), torch.device("cpu"))
    hi, hi_lens, lo, lo_lens = tables.fill(table, lens_t, BS)
    k_all, v_all = reference.cache_to_float(k), reference.cache_to_float(v)
    empty = (torch.zeros(heads * group, d), torch.full((heads * group,), float("-inf")))
    for i in range(len(lens)):
        parts = []
        for part, n_tok in ((hi[i], int(hi_lens[i])), (lo[i], int(lo_lens[i]))):
            if n_tok:
                kk, vv = reference.gather_kv(k_all, v_all, part, n_tok, raw, layout)
                parts.append(_attend_with_lse(q[i], kk, vv, scale))
            else:
                parts.append(empty)
        (hi_out, hi_lse), (lo_out, lo_lse) = parts
        # as split decode merges them: the hi part's natural-log lse [H, rows] (FlashAttention's),
        # the lo part's log2 lse [rows, H] (the mikv kernel's)
        merged = reference.merge_parts(hi_out[None], hi_lse[:, None], lo_out[None],
                                       lo_lse[None] * math.log2(math.e))[0]
        assert torch.allclose(merged, want[i], atol=1e-5), (merged - want[i]).abs().max()


def test_columns_past_the_buffers_are_ignored():
    """vLLM's block table is wider than max_model_len's pages (rounded up to 128 tokens)."""
    table = torch.tensor([[4, -2, 9, 123, 456]], dtype=torch.int32)  # 3 used pages + padding
    tables = SplitTables(2, 3, torch.device("cpu"))
    hi, hi_lens, lo, lo_lens = tables.fill(table, torch.tensor([40]), BS)
    assert hi.tolist() == [[4, 9, 0]] and lo.tolist() == [[-2, 0, 0]]
    assert hi_lens.tolist() == [24] and lo_lens.tolist() == [16]
