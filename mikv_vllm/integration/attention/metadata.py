"""Per-step attention metadata: decodes (one query token each, first in the batch, as vLLM
orders them) go to the mikv decode kernel (or, with the `split_decode` knob, their hi pages to
FlashAttention and their lo pages to the mikv kernel), the rest to FlashAttention's varlen
prefill."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import (AttentionCGSupport, AttentionMetadataBuilder,
                                       CommonAttentionMetadata)
from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from mikv_vllm.integration.attention.split_decode import FlashSchedule, SplitTables
from mikv_vllm.config import MikvConfig
from mikv_vllm.layout import PageLayout
from mikv_vllm.ops import (decode_ctas_per_sm, decode_num_splits, empty_gate_pays,
                           widest_lo_bits)

logger = init_logger("vllm.mikv")


@dataclass
class SplitDecodeMetadata:
    """The decode rows' hi-only and lo-only tables (views of persistent buffers)."""
    query_start_loc: torch.Tensor
    hi_table: torch.Tensor
    hi_lens: torch.Tensor
    lo_table: torch.Tensor
    lo_lens: torch.Tensor
    max_seq_len: int
    fa_splits: int  # FlashAttention's num_splits: a fixed bound under CUDA graphs, else 0
    # Whether the lo part's launches sit behind the CUDA-graph gate (ops.empty_gate_pays),
    # chosen per batch shape like decode_num_splits.
    lo_skip_empty: bool = False
    fa_schedule: torch.Tensor | None = None  # FlashAttention 3's tile schedule of the hi part


@dataclass
class MikvAttentionMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor
    # Decodes: rows [0, num_decodes) of the batch, one token each.
    num_decodes: int
    decode_seq_lens: torch.Tensor
    decode_block_table: torch.Tensor
    decode_num_splits: int
    # Prefills and chunked-prefill extends: the remaining rows and tokens.
    num_prefills: int
    num_prefill_tokens: int
    prefill_query_start_loc: torch.Tensor | None
    prefill_seq_lens: torch.Tensor | None
    prefill_block_table: torch.Tensor | None
    prefill_max_query_len: int
    prefill_max_seq_len: int
    split: SplitDecodeMetadata | None = None
    # Per prefill row, on the host: (end of its query tokens among the prefill tokens, its
    # sequence length after this step), for the observation window's page scores.
    prefill_rows: list[tuple[int, int]] | None = None


class MikvMetadataBuilder(AttentionMetadataBuilder[MikvAttentionMetadata]):
    # Pure-decode batches run as full CUDA graphs (the decode kernel's grid depends on the batch
    # shape only and it reads lengths and tables from vLLM's persistent buffers); mixed batches
    # run piecewise. MIKV_FULL_CUDAGRAPH=0 keeps every batch piecewise.
    _cudagraph_support = (AttentionCGSupport.NEVER
                          if os.environ.get("MIKV_FULL_CUDAGRAPH", "1") == "0"
                          else AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        model_config = vllm_config.model_config
        parallel_config = vllm_config.parallel_config
        self.num_kv_heads = model_config.get_num_kv_heads(parallel_config)
        self.group = model_config.get_num_attention_heads(parallel_config) // self.num_kv_heads
        mikv = MikvConfig.of(vllm_config)
        self.prefill_window = mikv.prefill_window
        on_gpu = torch.device(device).type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 1
        # The decode grid is sized in waves of the kernel's occupancy on this GPU.
        layout = PageLayout.from_spec(kv_cache_spec, **mikv.lo_format())
        self.ctas_per_sm = decode_ctas_per_sm(
            kv_cache_spec.head_size, self.group, mikv.hi_dtype == "fp8",
            widest_lo_bits(layout), layout.outlier_slots) if on_gpu else 2
        self.split_tables: SplitTables | None = None
        self.fa_schedule: FlashSchedule | None = None
        knob = mikv.split_decode
        fa_version = get_flash_attn_version()
        if knob or (knob is None and fa_version == 3):
            sched = vllm_config.scheduler_config
            rows = max(sched.max_num_seqs,
                       vllm_config.compilation_config.max_cudagraph_capture_size or 0)
            pages = -(-model_config.max_model_len // kv_cache_spec.block_size)
            self.split_tables = SplitTables(rows, pages, torch.device(device))
            # As vLLM's FlashAttention backend: under full CUDA graphs FA3 gets a fixed bound
            # on its splits (its scratch buffers are allocated at capture), else its heuristic;
            # FA3's tile schedule is computed once per step.
            compilation = vllm_config.compilation_config
            full_graphs = (self._cudagraph_support != AttentionCGSupport.NEVER
                           and compilation.cudagraph_mode.has_full_cudagraphs())
            self.fa_graph_splits = (
                vllm_config.attention_config.flash_attn_max_num_splits_for_cuda_graph
                if full_graphs and fa_version == 3 else 0)
            self.max_graph_tokens = compilation.max_cudagraph_capture_size or 0
            if fa_version == 3:
                self.fa_schedule = FlashSchedule(
                    rows, self.group * self.num_kv_heads, self.num_kv_heads,
                    kv_cache_spec.head_size,
                    torch.float8_e4m3fn if mikv.hi_dtype == "fp8" else model_config.dtype,
                    kv_cache_spec.block_size, torch.device(device), persistent=full_graphs)
        # Which road the engine took (an A100, or --attention-config pinning FA2, runs FA2).
        logger.info_once("mikv: prefill FlashAttention %s, decode %s", fa_version,
                         "split (hi pages FlashAttention, lo pages mikv)" if self.split_tables
                         else "mikv fused kernel")

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> MikvAttentionMetadata:
        cm = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens = (
            split_decodes_and_prefills(cm, decode_threshold=1))
        md = MikvAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            slot_mapping=cm.slot_mapping,
            num_decodes=num_decodes,
            decode_seq_lens=cm.seq_lens[:num_decodes],
            decode_block_table=cm.block_table_tensor[:num_decodes],
            decode_num_splits=decode_num_splits(
                num_decodes, self.num_kv_heads, self.group, self.num_sms, self.ctas_per_sm),
            num_prefills=num_prefills,
            num_prefill_tokens=num_prefill_tokens,
            prefill_query_start_loc=None,
            prefill_seq_lens=None,
            prefill_block_table=None,
            prefill_max_query_len=0,
            prefill_max_seq_len=0,
        )
        if num_decodes and self.split_tables is not None:
            hi_table, hi_lens, lo_table, lo_lens = self.split_tables.fill(
                md.decode_block_table, md.decode_seq_lens, self.kv_cache_spec.block_size)
            md.split = SplitDecodeMetadata(
                query_start_loc=cm.query_start_loc[:num_decodes + 1], hi_table=hi_table,
                hi_lens=hi_lens, lo_table=lo_table, lo_lens=lo_lens,
                max_seq_len=cm.max_seq_len,
                fa_splits=(self.fa_graph_splits
                           if cm.num_actual_tokens <= self.max_graph_tokens else 0),
                lo_skip_empty=empty_gate_pays(num_decodes, self.num_kv_heads, self.group,
                                              md.decode_num_splits))
            if self.fa_schedule is not None:
                s = md.split
                s.fa_schedule = self.fa_schedule(s.query_start_loc, hi_lens, s.max_seq_len,
                                                 s.fa_splits)
        if num_prefills:
            end = num_decodes + num_prefills
            md.prefill_query_start_loc = (cm.query_start_loc[num_decodes:end + 1]
                                          - num_decode_tokens)
            md.prefill_seq_lens = cm.seq_lens[num_decodes:end]
            md.prefill_block_table = cm.block_table_tensor[num_decodes:end]
            md.prefill_max_query_len = cm.max_query_len
            md.prefill_max_seq_len = cm.max_seq_len
            if self.prefill_window and cm.seq_lens_cpu_upper_bound is not None:
                # exact for prefill rows (vLLM's V2 runner: computed + scheduled tokens)
                ends = (cm.query_start_loc_cpu[num_decodes + 1:end + 1] - num_decode_tokens)
                md.prefill_rows = list(zip(ends.tolist(),
                                           cm.seq_lens_cpu_upper_bound[num_decodes:end].tolist()))
        return md

    def use_cascade_attention(self, *args, **kwargs) -> bool:
        return False
