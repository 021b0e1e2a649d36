"""Typed Python wrappers of the CUDA kernels in csrc/ (registered as torch.ops.mikv.*).

The extension is built by `pip install --no-build-isolation .` where CUDA torch and nvcc are
present; without it the plugin still imports, and the first kernel call says what is missing."""
from __future__ import annotations

import functools
import importlib.util

import torch

from mikv_vllm.cxx_runtime import static_runtime_problem
from mikv_vllm.layout import PageLayout

MAX_SPLITS = 64
SLAB_ELEMS = 1024  # a hi-pass slab holds SLAB_ELEMS // head_dim rows (csrc/paged_decode.cu)


def slabs_per_block(block_size: int, head_dim: int) -> int:
    """Slabs of a hi page for which paged_decode leaves a log-sum-exp (`slab_lse`)."""
    return block_size * head_dim // SLAB_ELEMS


class KernelsUnavailableError(ImportError):
    pass


@functools.cache
def load_kernels() -> None:
    spec = importlib.util.find_spec("mikv_vllm._C")
    if spec is not None and spec.origin and (problem := static_runtime_problem(spec.origin)):
        raise KernelsUnavailableError(problem)
    try:
        import mikv_vllm._C  # noqa: F401  (registers torch.ops.mikv.*)
    except ImportError as e:
        raise KernelsUnavailableError(
            f"mikv_vllm._C (the CUDA kernels) could not be loaded: {e}. Build them with "
            "`pip install --no-build-isolation .` on a machine with CUDA torch 2.11 and nvcc "
            "(CUDA_HOME), or check that this GPU's architecture is in TORCH_CUDA_ARCH_LIST "
            "(default 8.0;9.0).") from e


def decode_split_ctas(num_seqs: int, num_kv_heads: int, group: int) -> int:
    """CTAs of paged_decode's grid per split: one per sequence, KV head and chunk of up to 8 of
    its query heads (csrc/paged_decode.cu)."""
    return num_seqs * num_kv_heads * -(-group // 8)


@functools.cache  # called by every step's metadata build; the search over splits takes ~10 us
def decode_num_splits(num_seqs: int, num_kv_heads: int, group: int, num_sms: int,
                      ctas_per_sm: int = 2) -> int:
    """Splits of each sequence's pages, sizing the grid in whole waves of the CTAs the GPU holds
    at once (`num_sms` x `ctas_per_sm`, see `decode_ctas_per_sm`).

    A CTA's time is about its share of a sequence's pages, so s splits of n CTAs take about
    ceil(n s / capacity) / s; the choice minimises that, times 1 + s / 16 for what every split
    adds (its partials, their reduction, its share of the fixed per-CTA work: a guess, not
    measured). A grid that leaves a wave part-empty costs up to the whole wave: on an H200 at
    32K context and batch 16, GQA 8 (2 CTAs per SM) took 2119 us with the earlier "about twice
    the SMs" rule (3 splits, 1.45 waves) and 1622 us with 4 splits (1.94 waves).
    Depends on the batch shape only, so one choice holds for a whole CUDA-graph capture."""
    ctas = max(1, decode_split_ctas(num_seqs, num_kv_heads, group))
    capacity = max(1, num_sms * ctas_per_sm)
    return min(range(1, MAX_SPLITS + 1),
               key=lambda s: (-(-ctas * s // capacity) / s * (1 + s / 16), s))


# Grid size (CTAs) from which an empty merging pass of several splits costs more than the graph
# gate that skips it: on an H100 the gate costs ~5.1 us a layer, the empty kernel + reduce
# 3.3-4.6 us up to 768 CTAs, 5.9 at 1,536, 9.1 at 3,072 (one split, no reduce: 1.7-2.3 us up to
# 768), benchmarks/results/2026-12-07-h100-graph-gate/.
EMPTY_GATE_MIN_CTAS = 1024


def empty_gate_pays(num_seqs: int, num_kv_heads: int, group: int, num_splits: int) -> bool:
    """Whether `paged_decode(..., skip_empty=True)` is cheaper than plain launches when the
    table is empty: only a grid of several splits (a reduce to skip) and enough CTAs."""
    ctas = decode_split_ctas(num_seqs, num_kv_heads, group) * num_splits
    return num_splits > 1 and ctas >= EMPTY_GATE_MIN_CTAS


@functools.cache
def decode_ctas_per_sm(head_dim: int, group: int, fp8_kv: bool, lo_bits: int = 2,
                       outlier_slots: int = 0) -> int:
    """CTAs of paged_decode (for these shapes) that one SM of the current GPU holds at once;
    `lo_bits`: the widest lo tier the tables name (`widest_lo_bits`); `outlier_slots`: the lo
    pages' exact keys per head (`PageLayout.outlier_slots`), staged beside their codes."""
    load_kernels()
    return max(1, int(torch.ops.mikv.decode_ctas_per_sm(head_dim, group, fp8_kv, lo_bits,
                                                        outlier_slots)))


def widest_lo_bits(layout: PageLayout) -> int:
    """The most bits of any lo tier of `layout` (what sizes the decode kernel's staging)."""
    return max(layout.lo_bits, layout.mid_bits or 0)


def _lo_args(layout: PageLayout | None, head_dim: int) -> tuple[int, ...]:
    """(pack factor, bits, value group, middle tier's pack factor and bits (0, 0 for none),
    exact key outliers per page and head) of the lo pages a block table may name."""
    if layout is None:
        return 1, 2, head_dim, 0, 0, 0  # the table holds hi pages only
    mid = layout.mid
    return (layout.pack_factor, layout.lo_bits, layout.value_group_size,
            0 if mid is None else mid.pack_factor, 0 if mid is None else mid.lo_bits,
            layout.outlier_slots)


def paged_decode(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                 num_splits: int = 1, layout: PageLayout | None = None,
                 lse: torch.Tensor | None = None,
                 slab_lse: torch.Tensor | None = None,
                 slab_gate: torch.Tensor | None = None,
                 merge_lse: torch.Tensor | None = None,
                 skip_empty: bool = False) -> torch.Tensor:
    """Decode attention of one query token per sequence over its hi and lo pages.

    query/out: [seqs, q_heads, D]; key/value_cache: [blocks, block_size, kv_heads, D] views
    (any strides but the last; fp8 caches as uint8 or float8_e4m3fn with k/v_scale);
    block_table: [seqs, pages] int32, block ids for hi pages and -(1 + `PageLayout.lo_code`)
    for lo pages of either tier; seq_lens: [seqs] int32. With `lse` (fp32 [seqs, q_heads]) it
    also leaves each head's softmax normaliser (log2 domain), and with `slab_lse` (fp32
    [num_blocks, slabs_per_block, q_heads]) the same over each slab of every hi page it reads:
    what `page_mass` turns into page masses. `slab_gate` (CUDA int32 [1]) writes slab_lse only
    while it holds a nonzero value, so a captured graph pays for it on measured steps only.
    With `merge_lse` (fp32 [q_heads, >= seqs], natural log, FlashAttention's softmax_lse),
    `out` already holds the attention over the rest of each row's keys and this call merges its
    own pages' attention into it (split decode); rows with no pages in the table keep `out`.
    With `skip_empty` such a call (merge_lse, no lse or slab_lse) captured in a CUDA graph sits
    in a conditional node that a one-CTA kernel opens only when some row has pages
    (csrc/graph_gate.cu): while nothing is demoted, split decode's lo part then costs the gate
    instead of its launches (`empty_gate_pays` says when that is cheaper)."""
    if query.dim() != 3 or key_cache.dim() != 4:
        raise ValueError(f"paged_decode: query must be 3-D and caches 4-D, got "
                         f"{tuple(query.shape)} and {tuple(key_cache.shape)}")
    if query.shape[-1] != key_cache.shape[-1] or query.shape[1] % key_cache.shape[2]:
        raise ValueError(f"paged_decode: query {tuple(query.shape)} does not fit cache "
                         f"{tuple(key_cache.shape)} (head_dim, GQA)")
    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("paged_decode: block_table and seq_lens must be int32")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"paged_decode: num_splits must be in [1, {MAX_SPLITS}]")
    if merge_lse is not None and (merge_lse.dim() != 2 or merge_lse.shape[0] != query.shape[1]
                                  or merge_lse.shape[1] < query.shape[0]):
        raise ValueError(f"paged_decode: merge_lse must be [q_heads, >= seqs], got "
                         f"{tuple(merge_lse.shape)} for query {tuple(query.shape)}")
    if skip_empty and (merge_lse is None or lse is not None or slab_lse is not None):
        raise ValueError("paged_decode: skip_empty needs merge_lse and neither lse nor slab_lse")
    load_kernels()
    torch.ops.mikv.paged_decode(out, query, key_cache, value_cache, block_table, seq_lens,
                                float(scale), float(k_scale), float(v_scale), int(num_splits),
                                *_lo_args(layout, query.shape[-1]), lse, slab_lse, slab_gate,
                                merge_lse, bool(skip_empty))
    return out


def page_mass(mass: torch.Tensor, slab_lse: torch.Tensor, block_table: torch.Tensor,
              seq_lens: torch.Tensor, lse: torch.Tensor, block_size: int, num_kv_heads: int,
              weight: float = 1.0) -> torch.Tensor:
    """Add each hi page's attention mass of one decode step into `mass[block]` (fp32, one entry
    per cache block): the page's softmax probabilities summed over its tokens, averaged over the
    query heads of a KV head, times `weight`. `lse` and `slab_lse` come from
    `paged_decode(..., lse=lse, slab_lse=slab_lse)` of the same step; no key is read again and
    lo pages are skipped."""
    if mass.dtype != torch.float32 or mass.dim() != 1 or mass.numel() < slab_lse.shape[0]:
        raise ValueError("page_mass: mass must be fp32 [num_blocks]")
    if slab_lse.dim() != 3 or lse.dim() != 2 or lse.shape[1] != slab_lse.shape[2]:
        raise ValueError(f"page_mass: lse {tuple(lse.shape)} and slab_lse "
                         f"{tuple(slab_lse.shape)} do not fit ([seqs, q_heads], "
                         "[num_blocks, slabs, q_heads])")
    load_kernels()
    torch.ops.mikv.page_mass(mass, slab_lse, block_table, seq_lens, lse, int(block_size),
                             int(num_kv_heads), float(weight))
    return mass


def quantize_pages(key_cache: torch.Tensor, value_cache: torch.Tensor, src: torch.Tensor,
                   dst_codes: torch.Tensor, layout: PageLayout, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> None:
    """Demote pages into lo slots `dst_codes` (`PageLayout.lo_code`s, either tier) of the same
    layer cache, in place; one launch for all pages and KV heads of the layer. `src` holds each
    page's table entry: a hi block id (its values, times the fp8 k/v scales), or a lo entry
    (< 0) whose page is requantized from its codes (a middle-tier page moving on to 2-bit). No
    slot may be read and written by the same launch."""
    if src.shape != dst_codes.shape or src.dim() != 1:
        raise ValueError("quantize_pages: src and dst_codes must be 1-D of equal length")
    if src.dtype != torch.int32 or dst_codes.dtype != torch.int32:
        raise ValueError("quantize_pages: src and dst_codes must be int32")
    if key_cache.shape[1:] != (layout.block_size, layout.num_kv_heads, layout.head_size):
        raise ValueError(f"quantize_pages: cache {tuple(key_cache.shape)} does not match {layout}")
    load_kernels()
    torch.ops.mikv.quantize_pages(key_cache, value_cache, src, dst_codes, float(k_scale),
                                  float(v_scale), *_lo_args(layout, layout.head_size))


def split_page_table(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                     hi_table: torch.Tensor, hi_lens: torch.Tensor, lo_table: torch.Tensor,
                     lo_lens: torch.Tensor) -> None:
    """Split decode's per-step table partition in one launch: each row's used pages of
    `block_table` [rows, pages] (hi block ids >= 0, lo codes < 0) stable-partitioned into
    hi_table and lo_table (same shape, entries past a part's pages zeroed), and the tokens of
    each part into hi_lens and lo_lens [rows]; int32 CUDA tensors, rows of unit stride."""
    if hi_table.shape != block_table.shape or lo_table.shape != block_table.shape:
        raise ValueError(f"split_page_table: tables {tuple(hi_table.shape)}, "
                         f"{tuple(lo_table.shape)} must have block_table's shape "
                         f"{tuple(block_table.shape)}")
    load_kernels()
    torch.ops.mikv.split_page_table(block_table, seq_lens, int(block_size), hi_table, hi_lens,
                                    lo_table, lo_lens)
