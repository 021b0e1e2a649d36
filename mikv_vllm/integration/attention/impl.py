"""The per-layer attention: writes new K/V into hi pages, decodes through the mikv kernel,
prefills through vLLM's FlashAttention on the same cache."""
from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from mikv_vllm import ops
from mikv_vllm.config import MikvConfig
from mikv_vllm.importance import PageMassMeter, window_page_mass
from mikv_vllm.integration.attention import split_decode
from mikv_vllm.integration.attention.metadata import MikvAttentionMetadata
from mikv_vllm.layout import PageLayout, split_kv_cache

FP8_MAX = 448.0  # largest finite float8_e4m3fn


class MikvAttentionImpl(AttentionImpl[MikvAttentionMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, alibi_slopes: list[float] | None = None,
                 sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "sliding-window attention": sliding_window is not None,
            "logit soft-capping": bool(logits_soft_cap),
            "attention sinks (learned)": sinks is not None,
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
        }
        for feature, present in unsupported.items():
            if present:
                raise NotImplementedError(f"mikv: {feature} is not supported")
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.is_fp8 = kv_cache_dtype.startswith("fp8")
        self.fa_version = get_flash_attn_version(head_size=head_size)
        self.mikv = _mikv_config()
        # The engine's page layout: set by the mikv worker once the KV cache exists
        # (MikvWorker.initialize_from_config), the same object its demotions write with.
        self.layout: PageLayout | None = None
        # Set by the mikv worker on the layers that measure page importance.
        self.mass_meter: PageMassMeter | None = None
        ops.load_kernels()

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        from vllm.v1.attention.backends.fa_utils import reshape_and_cache_flash

        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                                self.kv_cache_dtype, layer._k_scale, layer._v_scale)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("mikv: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        md: MikvAttentionMetadata = attn_metadata
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        if self.layout is None:
            raise RuntimeError("mikv: an attention layer without its page layout (the mikv "
                               "worker sets it when the KV cache is allocated)")
        nd = md.num_decodes
        meter = self.mass_meter
        if nd and md.split is not None:
            self._split_decode(layer, query[:nd], key_cache, value_cache, output[:nd], md)
            if meter is not None:
                # Page masses in a pass of their own, its output discarded: over the meter's
                # lengths, 0 on the steps that do not measure, so there it finds no page and
                # costs a launch (instead of the fused kernel decoding the layer every step).
                self._fused_decode(layer, query[:nd], key_cache, value_cache,
                                   torch.empty_like(query[:nd]), md, meter, measure_only=True)
        elif nd:
            self._fused_decode(layer, query[:nd], key_cache, value_cache, output[:nd], md, meter)
        if md.num_prefill_tokens:
            prefill_query = query[nd:md.num_actual_tokens]
            self._prefill(layer, prefill_query, key_cache, value_cache,
                          output[nd:md.num_actual_tokens], md)
            if meter is not None and md.prefill_rows:
                self._observe_prefill(layer, prefill_query, key_cache, md, meter)
        return output

    def _observe_prefill(self, layer, query, key_cache, md, meter) -> None:
        """Score each prefill row's pages by the attention of its chunk's last tokens (the
        observation window, importance.window_page_mass) into the meter's mass."""
        w = self.mikv.prefill_window
        start = 0
        for row, (end, seq_len) in enumerate(md.prefill_rows):
            n = min(w, end - start)
            window_page_mass(meter.mass, query[end - n:end].view(n, self.num_heads, -1),
                             key_cache, md.prefill_block_table[row], seq_len, self.scale,
                             meter.weight, layer._k_scale_float)
            start = end
        meter.observed = True

    def _prefill(self, layer, query, key_cache, value_cache, output, md) -> None:
        self._flash(layer, query, key_cache, value_cache, output, md.prefill_query_start_loc,
                    md.prefill_max_query_len, md.prefill_seq_lens, md.prefill_max_seq_len,
                    md.prefill_block_table, md.num_prefills)

    def _split_decode(self, layer, query, key_cache, value_cache, output, md) -> None:
        """Hi pages through FlashAttention, lo pages through the mikv kernel, then merged
        (mikv_vllm/integration/attention/split_decode.py)."""
        s = md.split
        split_decode.decode(
            output, query, key_cache, value_cache, s.lo_table, s.lo_lens,
            lambda hi_out: self._flash(
                layer, query, key_cache, value_cache, hi_out, s.query_start_loc, 1, s.hi_lens,
                s.max_seq_len, s.hi_table, md.num_decodes, return_lse=True,
                num_splits=s.fa_splits, schedule=s.fa_schedule)[1],
            self.scale, layer._k_scale_float, layer._v_scale_float, md.decode_num_splits,
            self.layout, s.lo_skip_empty)

    def _fused_decode(self, layer, query, key_cache, value_cache, output, md, meter,
                      measure_only=False) -> None:
        """The mikv kernel over every page; with a meter it also leaves the page masses of a
        measured step (slab log-sum-exps from the hi pass, then page_mass). `measure_only`
        decodes over the meter's lengths instead of the sequences' own."""
        lengths = md.decode_seq_lens
        if meter is not None:
            mass_lengths = meter.lengths(md.decode_seq_lens)
            if measure_only:
                lengths = mass_lengths
        nd = md.num_decodes
        ops.paged_decode(output, query, key_cache, value_cache, md.decode_block_table, lengths,
                         self.scale, layer._k_scale_float, layer._v_scale_float,
                         md.decode_num_splits, self.layout,
                         lse=None if meter is None else meter.lse[:nd],
                         slab_lse=None if meter is None else meter.slab_lse,
                         slab_gate=None if meter is None else meter.active)
        if meter is not None:
            ops.page_mass(meter.mass, meter.slab_lse, md.decode_block_table, mass_lengths,
                          meter.lse[:nd], self.layout.block_size, self.num_kv_heads,
                          meter.weight)

    def _flash(self, layer, query, key_cache, value_cache, output, query_start_loc,
               max_query_len, seq_lens, max_seq_len, block_table, num_seqs,
               return_lse=False, num_splits=0, schedule=None):
        """vLLM's FlashAttention over hi pages of the cache (fp8 caches with vLLM's scales);
        `schedule`: FA3's tile schedule of this call, computed once per step."""
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

        descale = {}
        if self.is_fp8:
            fp8 = torch.float8_e4m3fn
            key_cache, value_cache = key_cache.view(fp8), value_cache.view(fp8)
            query = (query / layer._q_scale_float).clamp_(-FP8_MAX, FP8_MAX).to(fp8)
            shape = (num_seqs, self.num_kv_heads)
            descale = {"q_descale": layer._q_scale.expand(shape),
                       "k_descale": layer._k_scale.expand(shape),
                       "v_descale": layer._v_scale.expand(shape)}
        return flash_attn_varlen_func(
            q=query, k=key_cache, v=value_cache, out=output,
            cu_seqlens_q=query_start_loc, max_seqlen_q=max_query_len,
            seqused_k=seq_lens, max_seqlen_k=max_seq_len,
            softmax_scale=self.scale, causal=True, block_table=block_table,
            return_softmax_lse=return_lse, num_splits=num_splits, scheduler_metadata=schedule,
            fa_version=self.fa_version, **descale)


def _mikv_config() -> MikvConfig:
    """The engine's mikv knobs (defaults when the backend was chosen without `mikv`)."""
    from vllm.config import get_current_vllm_config

    return MikvConfig.of(get_current_vllm_config())
