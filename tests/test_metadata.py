"""MikvMetadataBuilder on a real vLLM CommonAttentionMetadata (CPU tensors)."""
from __future__ import annotations

import pytest
import torch

from conftest import GPU_WORKER
from mikv_vllm.integration.attention.metadata import MikvAttentionMetadata, MikvMetadataBuilder
from mikv_vllm.ops import empty_gate_pays

LAYER = "model.layers.0.self_attn.attn"


@pytest.fixture(scope="module")
def vllm_config(tiny_llama):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=tiny_llama, kv_cache_dtype="mikv", worker_cls=GPU_WORKER,
                      block_size=16).create_engine_config()


@pytest.fixture(scope="module")
def builder(vllm_config):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=2,
                             head_size=64, dtype=torch.bfloat16)
    return MikvMetadataBuilder(spec, [LAYER], vllm_config, torch.device("cpu"))


def common_metadata(query_lens: list[int], seq_lens: list[int], pages: int = 6):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0)
    num_tokens = int(qsl[-1])
    table = torch.arange(len(query_lens) * pages, dtype=torch.int32).reshape(-1, pages) + 1
    return CommonAttentionMetadata(
        query_start_loc=qsl.clone(), query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=len(query_lens),
        num_actual_tokens=num_tokens, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        block_table_tensor=table, slot_mapping=torch.arange(num_tokens, dtype=torch.int64))


def test_builder_declarations(builder, vllm_config):
    from vllm.v1.attention.backend import AttentionCGSupport

    assert builder.reorder_batch_threshold == 1  # vLLM puts query_len-1 rows first
    assert builder.num_kv_heads == 2 and builder.group == 4
    assert builder.num_sms == 1  # no CUDA device here
    support = MikvMetadataBuilder.get_cudagraph_support(vllm_config, builder.kv_cache_spec)
    assert support in (AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE, AttentionCGSupport.NEVER)
    assert builder.use_cascade_attention() is False


def test_mixed_batch_is_split(builder):
    # Two decodes first (as vLLM orders them), then a prefill and a chunked-prefill extend.
    cm = common_metadata(query_lens=[1, 1, 5, 12], seq_lens=[10, 37, 5, 20])
    md = builder.build(0, cm)
    assert isinstance(md, MikvAttentionMetadata)
    assert md.num_actual_tokens == 19
    assert (md.num_decodes, md.num_prefills, md.num_prefill_tokens) == (2, 2, 17)
    assert md.decode_seq_lens.tolist() == [10, 37]
    assert torch.equal(md.decode_block_table, cm.block_table_tensor[:2])
    assert md.prefill_query_start_loc.tolist() == [0, 5, 17]
    assert md.prefill_seq_lens.tolist() == [5, 20]
    assert torch.equal(md.prefill_block_table, cm.block_table_tensor[2:4])
    assert md.prefill_max_query_len == 12
    assert md.prefill_max_seq_len >= 20
    assert md.slot_mapping is cm.slot_mapping
    assert 1 <= md.decode_num_splits <= 64


def test_decode_rows_are_views_of_vllm_buffers(builder):
    """Full CUDA graphs replay with vLLM's persistent buffers: the decode inputs must alias
    them, not copy."""
    cm = common_metadata(query_lens=[1, 1, 1], seq_lens=[3, 40, 17])
    md = builder.build(0, cm)
    assert md.decode_seq_lens.data_ptr() == cm.seq_lens.data_ptr()
    assert md.decode_block_table.data_ptr() == cm.block_table_tensor.data_ptr()


def test_pure_decode_batch(builder):
    cm = common_metadata(query_lens=[1, 1, 1], seq_lens=[3, 40, 17])
    md = builder.build(0, cm)
    assert (md.num_decodes, md.num_prefills, md.num_prefill_tokens) == (3, 0, 0)
    assert md.decode_seq_lens.tolist() == [3, 40, 17]
    assert md.prefill_query_start_loc is None
    assert md.prefill_block_table is None
    assert md.prefill_seq_lens is None


def test_pure_prefill_batch(builder):
    cm = common_metadata(query_lens=[4, 9], seq_lens=[4, 30])
    md = builder.build(0, cm)
    assert (md.num_decodes, md.num_prefills, md.num_prefill_tokens) == (0, 2, 13)
    assert md.decode_seq_lens.numel() == 0 and md.decode_block_table.shape[0] == 0
    assert md.prefill_query_start_loc.tolist() == [0, 4, 13]
    assert torch.equal(md.prefill_block_table, cm.block_table_tensor)


def test_cudagraph_capture_build(builder):
    cm = common_metadata(query_lens=[1] * 8, seq_lens=[1] * 8)
    md = builder.build_for_cudagraph_capture(cm)
    assert md.num_decodes == 8 and md.num_prefills == 0


def test_num_splits_depends_on_batch_shape_only(builder):
    a = builder.build(0, common_metadata(query_lens=[1, 1], seq_lens=[5, 900]))
    b = builder.build(0, common_metadata(query_lens=[1, 1], seq_lens=[700, 2]))
    assert a.decode_num_splits == b.decode_num_splits


def test_split_decode_knob_fills_persistent_hi_and_lo_tables(tiny_llama):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    config = EngineArgs(model=tiny_llama, kv_cache_dtype="mikv", worker_cls=GPU_WORKER,
                        block_size=16, additional_config={"mikv": {"split_decode": True}}
                        ).create_engine_config()
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    builder = MikvMetadataBuilder(spec, [LAYER], config, torch.device("cpu"))
    cm = common_metadata(query_lens=[1, 1, 5], seq_lens=[40, 17, 5])
    cm.block_table_tensor[0, 1] = -9  # the first decode's second page is lo
    md = builder.build(0, cm)
    s = md.split
    assert s is not None and s.max_seq_len == 40
    assert s.hi_table.shape[0] == 2 and s.hi_table.data_ptr() == builder.split_tables.hi_table.data_ptr()
    assert s.hi_table[0, :2].tolist() == [1, 3] and s.lo_table[0, :1].tolist() == [-9]
    assert s.hi_lens.tolist() == [24, 17] and s.lo_lens.tolist() == [16, 0]
    assert s.query_start_loc.tolist() == [0, 1, 2]
    assert s.fa_splits >= 0
    # the graph gate, chosen once per step from the batch shape, as the splits are
    assert s.lo_skip_empty == empty_gate_pays(2, builder.num_kv_heads, builder.group,
                                              md.decode_num_splits)
    again = builder.build(0, cm)  # the next step writes the same buffers
    assert again.split.lo_table.data_ptr() == s.lo_table.data_ptr()


def test_split_decode_default_is_off_without_flash_attention_3(builder):
    # The default (None) turns it on only where vLLM picks FA3; a CPU has no FlashAttention.
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    assert get_flash_attn_version() != 3
    assert builder.split_tables is None
    assert builder.build(0, common_metadata(query_lens=[1], seq_lens=[10])).split is None
