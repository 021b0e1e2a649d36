"""One test per vLLM 0.26 internal that mikv relies on.

When vLLM moves one of them, the failing test's message says what moved and which mikv code
depends on it (mikv_vllm/integration/patches.py, plugin.py, attention/)."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest
import torch


def _unwrapped(func):
    """vLLM's own function below any mikv wrapper (the plugin may already be loaded)."""
    return inspect.unwrap(func)


def _vllm_file(relative: str) -> Path:
    import vllm
    return Path(vllm.__file__).parent / relative


def _param_names(func) -> list[str]:
    return list(inspect.signature(func).parameters)


# --- the `mikv` alias (integration/patches.py) --------------------------------------------------------

def test_engine_args_add_cli_args_builds_kv_cache_dtype_choices():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    assert isinstance(inspect.getattr_static(EngineArgs, "add_cli_args"), staticmethod), (
        "EngineArgs.add_cli_args is no longer a staticmethod; patches.apply() re-wraps it "
        "as one")
    parser = _unwrapped(EngineArgs.add_cli_args)(FlexibleArgumentParser())
    action = parser._option_string_actions.get("--kv-cache-dtype")
    assert action is not None, "EngineArgs.add_cli_args no longer adds --kv-cache-dtype"
    assert action.choices is not None and {"auto", "fp8"} <= set(action.choices), (
        "--kv-cache-dtype is no longer built with a list of choices; mikv appends 'mikv' to it")
    assert "mikv" not in action.choices


def test_engine_args_create_engine_config_exists():
    from vllm.engine.arg_utils import EngineArgs

    original = _unwrapped(EngineArgs.create_engine_config)
    assert callable(original), "EngineArgs.create_engine_config moved; mikv wraps it"
    params = _param_names(original)
    assert params[0] == "self", f"EngineArgs.create_engine_config signature changed: {params}"


def test_engine_args_fields_mikv_rewrites():
    from vllm.engine.arg_utils import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    for name in ("kv_cache_dtype", "attention_backend", "attention_config",
                 "additional_config"):
        assert name in names, (
            f"EngineArgs.{name} is gone; patches._create_engine_config rewrites it")


def test_cache_dtype_literal_needs_the_alias():
    from vllm.config.cache import CacheDType

    values = typing.get_args(CacheDType)
    assert "auto" in values and "fp8" in values, (
        f"vllm.config.cache.CacheDType no longer has 'auto'/'fp8' (mikv's hi dtypes): {values}")
    assert "mikv" not in values, (
        "vLLM's CacheDType now knows 'mikv' itself: the alias in integration/patches.py may be obsolete")


def test_serve_parser_loads_plugins_before_engine_args():
    """The `mikv` choice exists only because plugins run before the choices are built."""
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.entrypoints.openai import cli_args

    source = inspect.getsource(AsyncEngineArgs.add_cli_args)
    load = source.find("load_general_plugins()")
    build = source.find("EngineArgs.add_cli_args(parser)")
    assert load != -1 and build != -1 and load < build, (
        "AsyncEngineArgs.add_cli_args no longer calls load_general_plugins() before "
        "EngineArgs.add_cli_args(parser): `vllm serve --kv-cache-dtype mikv` would be rejected")
    assert "AsyncEngineArgs.add_cli_args(parser)" in inspect.getsource(cli_args.make_arg_parser), (
        "make_arg_parser (vllm serve) no longer builds its engine options through "
        "AsyncEngineArgs.add_cli_args")
    post_init = inspect.getsource(EngineArgs.__post_init__)
    assert "load_general_plugins()" in post_init, (
        "EngineArgs.__post_init__ no longer loads plugins: LLM(kv_cache_dtype='mikv') would not "
        "be rewritten")


def test_model_config_queries_for_model_checks(tiny_llama):
    from vllm.engine.arg_utils import EngineArgs

    cfg = EngineArgs(model=tiny_llama).create_engine_config()
    model = cfg.model_config
    for attr in ("use_mla", "is_attention_free", "is_hybrid", "hf_text_config", "dtype",
                 "architectures"):
        assert hasattr(model, attr), f"ModelConfig.{attr} is gone (check_model_and_device)"
    assert model.get_sliding_window() is None
    assert model.get_head_size() == 64
    assert model.get_num_kv_heads(cfg.parallel_config) == 2
    assert model.get_num_attention_heads(cfg.parallel_config) == 8
    assert isinstance(cfg.cache_config.block_size, int)
    from vllm.platforms import current_platform
    assert hasattr(current_platform, "get_device_capability")


# --- the attention backend (plugin.py, attention/) ---------------------------------------------

def test_custom_backend_enum_and_register_backend():
    from vllm.v1.attention.backends import registry

    assert hasattr(registry.AttentionBackendEnum, "CUSTOM"), "AttentionBackendEnum.CUSTOM is gone"
    assert hasattr(registry, "register_backend"), "registry.register_backend is gone"
    params = _param_names(registry.register_backend)
    assert params[:2] == ["backend", "class_path"], (
        f"register_backend(backend, class_path) changed: {params}")
    assert hasattr(registry.AttentionBackendEnum.CUSTOM, "get_class")


def test_flash_attention_cache_layout_equals_mikv():
    """Prefill runs vLLM's FlashAttention on the mikv cache: same shape, same NHD strides."""
    from vllm.v1.attention.backends import utils as backend_utils
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    from mikv_vllm.integration.attention.backend import MikvAttentionBackend

    args = (10, 32, 2, 128)
    assert FlashAttentionBackend.get_kv_cache_shape(*args) == \
        MikvAttentionBackend.get_kv_cache_shape(*args), (
        "FlashAttentionBackend.get_kv_cache_shape changed; the mikv cache must stay readable by "
        "FlashAttention")
    backend_utils.set_kv_cache_layout("NHD")
    try:
        for with_layers in (False, True):
            assert FlashAttentionBackend.get_kv_cache_stride_order(with_layers) == \
                MikvAttentionBackend.get_kv_cache_stride_order(with_layers), (
                "FlashAttention's NHD stride order changed (include_num_layers_dimension="
                f"{with_layers})")
    finally:
        backend_utils.set_kv_cache_layout(None)


def test_v2_runner_reshapes_kv_cache_with_stride_order():
    from vllm.v1.worker.gpu import attn_utils

    assert hasattr(attn_utils, "_reshape_attention_kv_cache"), (
        "vllm.v1.worker.gpu.attn_utils._reshape_attention_kv_cache moved (tests/test_layout.py "
        "uses it to view the cache as the V2 runner does)")
    source = inspect.getsource(attn_utils._reshape_kv_cache)
    assert "get_kv_cache_stride_order()" in source, (
        "the V2 runner no longer applies backend.get_kv_cache_stride_order()")


def test_fa_utils_exposes_flash_attention_functions():
    from vllm.v1.attention.backends import fa_utils

    assert callable(getattr(fa_utils, "get_flash_attn_version", None)), (
        "fa_utils.get_flash_attn_version is gone (MikvAttentionImpl.__init__, the split_decode default)")
    assert "head_size" in _param_names(fa_utils.get_flash_attn_version)
    names = ("flash_attn_varlen_func", "reshape_and_cache_flash", "get_scheduler_metadata")
    if all(hasattr(fa_utils, n) for n in names):  # CUDA platform: the real objects
        return
    # Other platforms define them only under `if current_platform.is_cuda():`; read the source.
    tree = ast.parse(Path(fa_utils.__file__).read_text())
    cuda_imports = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "is_cuda" in ast.unparse(node.test):
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom):
                    cuda_imports.update(a.asname or a.name for a in stmt.names)
    for name in names:
        assert name in cuda_imports, (
            f"fa_utils no longer imports {name} on CUDA (the mikv backend uses it)")


def _flash_interface_params(name: str) -> set[str]:
    """Parameter names of a function of vLLM's FlashAttention interface (read from source: the
    module imports CUDA extensions)."""
    tree = ast.parse(_vllm_file("vllm_flash_attn/flash_attn_interface.py").read_text())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return {a.arg for a in func.args.args + func.args.kwonlyargs}


def test_flash_attn_varlen_func_accepts_mikv_prefill_keywords():
    params = _flash_interface_params("flash_attn_varlen_func")
    used = {"q", "k", "v", "out", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "max_seqlen_k",
            "softmax_scale", "causal", "block_table", "fa_version", "q_descale", "k_descale",
            "v_descale", "return_softmax_lse", "num_splits", "scheduler_metadata"}
    assert used <= params, (
        f"flash_attn_varlen_func lost keywords MikvAttentionImpl._prefill passes: "
        f"{sorted(used - params)}")


def test_get_scheduler_metadata_accepts_split_decode_keywords():
    """split_decode.FlashSchedule computes FA3's schedule of the hi part once per step."""
    params = _flash_interface_params("get_scheduler_metadata")
    used = {"batch_size", "max_seqlen_q", "max_seqlen_k", "num_heads_q", "num_heads_kv",
            "headdim", "cache_seqlens", "qkv_dtype", "cu_seqlens_q", "page_size", "causal",
            "num_splits"}
    assert used <= params, (
        f"get_scheduler_metadata lost keywords FlashSchedule passes: {sorted(used - params)}")


def test_reshape_and_cache_flash_signature():
    from vllm import _custom_ops

    assert _param_names(_custom_ops.reshape_and_cache_flash) == [
        "key", "value", "key_cache", "value_cache", "slot_mapping", "kv_cache_dtype", "k_scale",
        "v_scale"], "reshape_and_cache_flash changed (MikvAttentionImpl.do_kv_cache_update)"


def test_split_decodes_and_prefills_signature():
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills

    params = _param_names(split_decodes_and_prefills)
    assert params[:2] == ["common_attn_metadata", "decode_threshold"], (
        f"split_decodes_and_prefills(common_attn_metadata, decode_threshold) changed: {params}")


def test_common_attention_metadata_fields():
    import dataclasses

    from vllm.v1.attention.backend import CommonAttentionMetadata

    names = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    used = {"query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs",
            "num_actual_tokens", "max_query_len", "max_seq_len", "block_table_tensor",
            "slot_mapping"}
    assert used <= names, (
        f"CommonAttentionMetadata lost {sorted(used - names)} (MikvMetadataBuilder)")


def test_cudagraph_support_levels():
    from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder

    assert hasattr(AttentionCGSupport, "UNIFORM_SINGLE_TOKEN_DECODE"), (
        "AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE is gone (MikvMetadataBuilder)")
    assert hasattr(AttentionCGSupport, "NEVER")
    assert hasattr(AttentionMetadataBuilder, "_init_reorder_batch_threshold"), (
        "AttentionMetadataBuilder._init_reorder_batch_threshold is gone")


def test_v2_runner_puts_decodes_first():
    from vllm.v1.worker.gpu.model_runner import sort_batch_req_ids

    order = sort_batch_req_ids({"p1": 7, "d1": 1, "e1": 3, "d2": 1, "p2": 100},
                               decode_query_len=1)
    assert order[:2] == ["d1", "d2"] or order[:2] == ["d2", "d1"], (
        f"the V2 runner no longer puts decodes first ({order}); MikvMetadataBuilder assumes "
        "rows [0, num_decodes) are the decodes")
    assert set(order[2:]) == {"e1", "p1", "p2"}


def test_attention_impl_forward_signature():
    from vllm.v1.attention.backend import AttentionImpl

    from mikv_vllm.integration.attention.impl import MikvAttentionImpl

    expected = ["self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
                "output_scale", "output_block_scale"]
    assert _param_names(AttentionImpl.forward) == expected, (
        f"AttentionImpl.forward changed: {_param_names(AttentionImpl.forward)}")
    assert _param_names(MikvAttentionImpl.forward) == expected


def test_kv_cache_update_hook():
    """With forward_includes_kv_cache_update False, vLLM calls
    impl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping) before forward."""
    from vllm.model_executor.layers.attention import attention
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    from mikv_vllm.integration.attention.impl import MikvAttentionImpl

    source = inspect.getsource(attention.unified_kv_cache_update)
    call = (r"impl\.do_kv_cache_update\((?:\s*#[^\n]*)?"  # a `# type: ignore` may follow
            r"\s*attn_layer,\s*key,\s*value,\s*kv_cache,\s*layer_slot_mapping,?\s*\)")
    assert re.search(call, source), (
        "unified_kv_cache_update no longer calls impl.do_kv_cache_update(layer, key, value, "
        "kv_cache, slot_mapping)")
    assert "forward_includes_kv_cache_update" in inspect.getsource(attention.Attention), (
        "Attention no longer checks backend.forward_includes_kv_cache_update")
    assert _param_names(FlashAttentionImpl.do_kv_cache_update) == _param_names(
        MikvAttentionImpl.do_kv_cache_update)


def test_attention_layer_float_scales():
    """MikvAttentionImpl reads layer._k_scale_float/_v_scale_float/_q_scale_float and the
    tensors _k_scale/_v_scale/_q_scale that _init_kv_cache_quant sets up."""
    from vllm.model_executor.layers.attention import attention

    assert hasattr(attention, "_init_kv_cache_quant"), "_init_kv_cache_quant moved"
    init_source = inspect.getsource(attention.Attention.__init__)
    assert "_init_kv_cache_quant(" in init_source, (
        "Attention.__init__ no longer calls _init_kv_cache_quant")
    layer = torch.nn.Module()
    attention.set_default_quant_scales(layer, register_buffer=True)
    for name in ("_k_scale_float", "_v_scale_float", "_q_scale_float"):
        assert getattr(layer, name) == 1.0, f"Attention layers no longer carry {name}"
    for name in ("_k_scale", "_v_scale", "_q_scale"):
        assert isinstance(getattr(layer, name), torch.Tensor), f"{name} is no longer a tensor"


def test_current_vllm_config_carries_additional_config():
    from vllm.config import VllmConfig, get_current_vllm_config, set_current_vllm_config

    cfg = VllmConfig(additional_config={"mikv": {"lo_bits": 4}})
    with set_current_vllm_config(cfg):
        assert get_current_vllm_config().additional_config == {"mikv": {"lo_bits": 4}}


@pytest.mark.parametrize("name", ["page_size_bytes", "real_page_size_bytes"])
def test_full_attention_spec_page_size(name):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    assert getattr(spec, name) == 2 * 16 * 2 * 64 * 2, f"FullAttentionSpec.{name} changed"


# --- demotion (demotion.py, scheduler.py, worker.py) ------------------------------------------

def test_kv_cache_manager_exposes_per_request_block_lists():
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

    src = inspect.getsource(SingleTypeKVCacheManager.__init__)
    assert "self.req_to_blocks" in src, (
        "SingleTypeKVCacheManager.req_to_blocks moved: PageDemoter nulls demoted pages there")
    for name in ("get_new_blocks", "free_blocks", "evict_blocks", "get_num_free_blocks"):
        assert hasattr(BlockPool, name), f"BlockPool.{name} moved: PageDemoter uses it"
    assert "self.null_block" in inspect.getsource(BlockPool.__init__), (
        "BlockPool.null_block moved: demoted pages point at it, as sliding windows do")
    coordinator = _vllm_file("v1/core/kv_cache_coordinator.py").read_text()
    assert "self.single_type_managers" in coordinator, (
        "KVCacheCoordinator.single_type_managers moved: PageDemoter reads its first group")


def test_scheduler_frees_requests_in_free_request_blocks():
    """MikvScheduler returns a request's packs by overriding Scheduler._free_request_blocks
    (whether the packs really come back on finish, abort and preemption: test_scheduler.py)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    assert _param_names(Scheduler._free_request_blocks) == ["self", "request"], (
        "Scheduler._free_request_blocks changed: MikvScheduler overrides it to return packs")
    assert "preempted_req_ids" in _vllm_file("v1/core/sched/output.py").read_text(), (
        "SchedulerOutput.preempted_req_ids moved: MikvScheduler drops moves of preempted requests")


def test_v2_runner_block_table_is_a_gpu_tensor_with_appends():
    """MikvWorker writes demoted pages' entries straight into the V2 runner's GPU block table:
    that needs the table on `.gpu`, rows found through RequestState.req_id_to_index, and the
    runner's own writes limited to appending pages (or filling a new request's row)."""
    from vllm.v1.worker.gpu.block_table import BlockTables
    from vllm.v1.worker.gpu.buffer_utils import StagedWriteTensor
    from vllm.v1.worker.gpu.states import RequestState

    assert "self.gpu = " in inspect.getsource(StagedWriteTensor.__init__), (
        "StagedWriteTensor.gpu moved: MikvWorker writes demoted pages' entries into it")
    assert "self.block_tables.append(block_table)" in inspect.getsource(BlockTables.__init__)
    append = inspect.getsource(BlockTables.append_block_ids)
    assert "start = self.num_blocks.np[i, req_index] if not overwrite else 0" in append, (
        "BlockTables.append_block_ids no longer appends after a request's last page: it could "
        "overwrite entries MikvWorker pointed at lo slots")
    assert "self.block_table_ptrs" in inspect.getsource(BlockTables.gather_block_tables)
    assert "[b.gpu for b in self.block_tables]" in inspect.getsource(
        BlockTables.init_block_table_layout_tensors), (
        "the V2 runner's step table is no longer gathered from the .gpu tables")
    assert "self.req_id_to_index" in inspect.getsource(RequestState.__init__), (
        "RequestState.req_id_to_index moved: MikvWorker maps request ids to table rows")


def test_gpu_worker_execute_model_takes_the_scheduler_output():
    from vllm.v1.worker.gpu_worker import Worker

    assert _param_names(Worker.execute_model)[1:2] == ["scheduler_output"], (
        "Worker.execute_model(scheduler_output) changed: MikvWorker wraps it")


def test_gpu_worker_hooks_of_mikv_worker():
    from vllm.v1.worker.gpu_worker import Worker

    assert _param_names(Worker.sample_tokens)[1:2] == ["grammar_output"], (
        "Worker.sample_tokens(grammar_output) changed: MikvWorker attaches importance reports")
    assert _param_names(Worker.initialize_from_config)[1:2] == ["kv_cache_config"], (
        "Worker.initialize_from_config(kv_cache_config) changed: MikvWorker sizes its meter")
    assert "self.use_v2_model_runner" in inspect.getsource(Worker.__init__), (
        "Worker.use_v2_model_runner moved: MikvWorker requires the V2 runner")
    from vllm.model_executor.models.utils import extract_layer_index

    assert extract_layer_index("model.layers.12.self_attn.attn") == 12


def test_async_tensor_h2d_of_a_list():
    from vllm.utils.torch_utils import async_tensor_h2d

    assert _param_names(async_tensor_h2d)[:3] == ["data", "device", "dtype"], (
        "async_tensor_h2d(data, device, dtype) changed: MikvWorker copies demotion moves with it")
    assert "non_blocking=True" in inspect.getsource(async_tensor_h2d)


def test_model_runner_output_carries_an_extra_attribute():
    """The importance report rides on ModelRunnerOutput as an attribute: it must survive the
    pickling of the multiprocessing executor, and the scheduler hook must keep its signature."""
    import pickle

    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

    from mikv_vllm.integration import protocol

    out = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    protocol.put_block_mass(out, [1.0])
    assert protocol.get_block_mass(pickle.loads(pickle.dumps(out))) == [1.0], (
        "ModelRunnerOutput no longer keeps extra attributes (slots?): importance reports are lost")
    assert _param_names(Scheduler.update_from_output)[1:3] == [
        "scheduler_output", "model_runner_output"], (
        "Scheduler.update_from_output changed: MikvScheduler reads importance reports there")
    assert AsyncModelRunnerOutput.__abstractmethods__ == {"get_output"}


def test_executors_resolve_worker_cls_and_scheduler_cls():
    from vllm.config import ParallelConfig, SchedulerConfig

    assert "worker_cls" in {f.name for f in dataclasses.fields(ParallelConfig)}
    assert "scheduler_cls" in {f.name for f in dataclasses.fields(SchedulerConfig)}
    assert "resolve_obj_by_qualname" in inspect.getsource(SchedulerConfig.get_scheduler_cls)
    cuda = _vllm_file("platforms/cuda.py").read_text()
    assert '"vllm.v1.worker.gpu_worker.Worker"' in cuda, (
        "the CUDA platform's default worker moved: integration/patches.py replaces exactly that class")


def test_admission_gate_mikv_makes_room_for():
    """MikvScheduler demotes ahead of vLLM's admission check, so it must know what that check
    asks: the whole prompt when scheduler_reserve_full_isl is on, plus the manager's watermark."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.request_queue import RequestQueue
    from vllm.v1.core.sched.scheduler import Scheduler

    assert "self.scheduler_reserve_full_isl" in inspect.getsource(Scheduler.__init__)
    assert "full_sequence_must_fit=self.scheduler_reserve_full_isl" in inspect.getsource(
        Scheduler.schedule), "vLLM's admission gate changed: MikvScheduler._blocks_wanted"
    assert "self.watermark_blocks" in inspect.getsource(KVCacheManager.__init__)
    assert "peek_request" in RequestQueue.__abstractmethods__
