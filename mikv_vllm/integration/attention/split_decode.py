"""Split decode (knob `split_decode`): hi pages through vLLM's FlashAttention, lo pages through
the mikv kernel, the two partial softmaxes merged by their log-sum-exps.

Why it is exact: decode attention of one query token over a set of pages does not depend on the
pages' order, and only a sequence's last page can be partly filled. A stable partition of each
block-table row into its hi pages and its lo pages keeps that page last in its part, so each
part is a valid paged sequence of its own (hi: `hi_lens` tokens for FlashAttention's
`seqused_k`; lo: `lo_lens` tokens for the mikv kernel, which then skips its hi pass).

The tables are split once per step by the metadata builder (one kernel, csrc/split_tables.cu),
into persistent buffers that the captured CUDA graphs read."""
from __future__ import annotations

from collections.abc import Callable

import torch

from mikv_vllm import ops, reference
from mikv_vllm.layout import PageLayout


class SplitTables:
    """Persistent hi-only and lo-only block tables and lengths of a step's decode rows."""

    def __init__(self, max_rows: int, max_pages: int, device: torch.device) -> None:
        self.hi_table = torch.zeros(max_rows, max_pages, dtype=torch.int32, device=device)
        self.lo_table = torch.zeros_like(self.hi_table)
        self.hi_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.lo_lens = torch.zeros_like(self.hi_lens)

    def fill(self, block_table: torch.Tensor, seq_lens: torch.Tensor,
             block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split `block_table` [rows, pages] (hi block ids >= 0, lo codes < 0) of sequences
        `seq_lens` [rows]; returns views (hi_table, hi_lens, lo_table, lo_lens) of the buffers."""
        # vLLM rounds the table's width up (to 128 tokens of pages); the columns past
        # max_model_len's pages are never used.
        block_table = block_table[:, :self.hi_table.shape[1]]
        rows, pages = block_table.shape
        if rows > self.hi_table.shape[0]:
            raise ValueError(f"split decode: {rows} decode rows exceed the buffers' "
                             f"{self.hi_table.shape[0]}")
        hi_table, lo_table = self.hi_table[:rows, :pages], self.lo_table[:rows, :pages]
        hi_lens, lo_lens = self.hi_lens[:rows], self.lo_lens[:rows]
        # The kernel on the GPU; CPU tensors (tests) take the torch reference it is tested against.
        split = ops.split_page_table if block_table.is_cuda else reference.split_page_table
        split(block_table, seq_lens, block_size, hi_table, hi_lens, lo_table, lo_lens)
        return hi_table, hi_lens, lo_table, lo_lens


class FlashSchedule:
    """FlashAttention 3's tile schedule of the hi part, computed once per step from the hi
    lengths, as vLLM's own FlashAttention backend does: without it FlashAttention recomputes it
    in every layer (a prepare kernel of ~2.4 us a layer in the all-hi profile,
    benchmarks/results/2026-12-07-h100-all-hi-profile/). Under full CUDA graphs it lives in a
    persistent buffer that the graphs read, zeroed past the step's entries."""

    def __init__(self, max_rows: int, num_heads_q: int, num_heads_kv: int, head_size: int,
                 qkv_dtype: torch.dtype, block_size: int, device: torch.device,
                 persistent: bool) -> None:
        self.args = dict(num_heads_q=num_heads_q, num_heads_kv=num_heads_kv, headdim=head_size,
                         qkv_dtype=qkv_dtype, page_size=block_size)
        # FlashAttention 3's layout: a semaphore, then 4 int32 per row rounded up to 4 rows.
        self.buffer = (torch.zeros(1 + -(-max_rows // 4) * 16, dtype=torch.int32, device=device)
                       if persistent else None)

    def __call__(self, query_start_loc: torch.Tensor, hi_lens: torch.Tensor, max_seq_len: int,
                 num_splits: int) -> torch.Tensor:
        from vllm.v1.attention.backends.fa_utils import get_scheduler_metadata

        meta = get_scheduler_metadata(
            batch_size=hi_lens.shape[0], max_seqlen_q=1, max_seqlen_k=max_seq_len,
            cache_seqlens=hi_lens, cu_seqlens_q=query_start_loc, causal=True,
            num_splits=num_splits, **self.args)
        if self.buffer is None:
            return meta
        n = meta.shape[0]
        self.buffer[:n] = meta
        self.buffer[n:] = 0
        return self.buffer[:n]


def decode(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
           value_cache: torch.Tensor, lo_table: torch.Tensor, lo_lens: torch.Tensor,
           flash_hi: Callable[[torch.Tensor], torch.Tensor], scale: float, k_scale: float,
           v_scale: float, num_splits: int, layout: PageLayout, skip_empty: bool = False) -> None:
    """One split decode into `out`: `flash_hi(out)` runs FlashAttention over the hi table into
    out and returns its lse; the mikv kernel then merges the lo table's attention into out by
    that lse (rows without lo pages keep FlashAttention's answer). One kernel after
    FlashAttention, no scratch outputs: the merge rides in the lo pass's last write. Under CUDA
    graphs, with `skip_empty` (where ops.empty_gate_pays), the lo pass is skipped in steps where
    no row has lo pages."""
    hi_lse = flash_hi(out)
    ops.paged_decode(out, query, key_cache, value_cache, lo_table, lo_lens, scale, k_scale,
                     v_scale, num_splits, layout, merge_lse=hi_lse, skip_empty=skip_empty)
