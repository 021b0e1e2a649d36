"""Every change mikv makes to vLLM 0.26 internals, applied once from `plugin.register()`.

`mikv` is an alias, not a new vLLM dtype: the CLI parser learns the word, and
`EngineArgs.create_engine_config` rewrites it into legal vLLM settings (the hi dtype, the
CUSTOM attention backend, the knobs in `additional_config["mikv"]`) so that no Literal,
selector or dtype table of vLLM needs patching. `tests/test_vllm_internals.py` fails loudly
when one of the places below moves."""
from __future__ import annotations

import copy
import dataclasses
import functools

from vllm.logger import init_logger

from mikv_vllm.integration.attention.backend import SUPPORTED_HEAD_SIZES
from mikv_vllm.config import ADDITIONAL_CONFIG_KEY, KV_CACHE_DTYPE, MikvConfig, MikvConfigError
from mikv_vllm.layout import MAX_PAGE_HEAD_ELEMS, PageLayout

logger = init_logger("vllm.mikv")

KV_CACHE_DTYPE_FLAG = "--kv-cache-dtype"
CUSTOM_BACKEND = "CUSTOM"
_PATCHED_MARK = "_mikv_patched"


def apply() -> None:
    """Patch vLLM once per process; calling again is a no-op."""
    from vllm.engine.arg_utils import EngineArgs

    add_scheduler_stats_field()
    if getattr(EngineArgs.create_engine_config, _PATCHED_MARK, False):
        return
    original_add_cli_args = EngineArgs.add_cli_args
    original_create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(original_add_cli_args)
    def add_cli_args(parser):
        return _add_cli_args(original_add_cli_args, parser)

    @functools.wraps(original_create_engine_config)
    def create_engine_config(self, *args, **kwargs):
        return _create_engine_config(original_create_engine_config, self, *args, **kwargs)

    for patched in (add_cli_args, create_engine_config):
        setattr(patched, _PATCHED_MARK, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.create_engine_config = create_engine_config


STATS_FIELD = "mikv"


def add_scheduler_stats_field() -> None:
    """Give vLLM's SchedulerStats a `mikv` field (dict or None) so that the scheduler's page
    counters travel with vLLM's own stats from the engine core to the API server's stat loggers
    (msgspec sends declared dataclass fields only). Done in place, in every process, before
    vLLM encodes or decodes its first stats."""
    from vllm.v1.metrics.stats import SchedulerStats

    if STATS_FIELD in SchedulerStats.__dataclass_fields__:
        return

    @dataclasses.dataclass
    class _Field:  # a well-formed dataclass Field to graft on
        mikv: dict[str, float] | None = None  # counts and ratios (msgspec: int fits float)

    field = _Field.__dataclass_fields__[STATS_FIELD]
    SchedulerStats.__dataclass_fields__[STATS_FIELD] = field
    SchedulerStats.__annotations__[STATS_FIELD] = field.type
    setattr(SchedulerStats, STATS_FIELD, None)  # the default; __init__ is left as it is


def _add_cli_args(original, parser):
    """Let `--kv-cache-dtype` accept `mikv`."""
    parser = original(parser)
    action = parser._option_string_actions.get(KV_CACHE_DTYPE_FLAG)
    if action is None or action.choices is None:
        raise RuntimeError(f"mikv: vLLM's {KV_CACHE_DTYPE_FLAG} option changed shape; "
                           "this mikv-vllm release supports vllm==0.26.0")
    if KV_CACHE_DTYPE not in action.choices:
        action.choices = [*action.choices, KV_CACHE_DTYPE]
        action.help = (action.help or "") + (
            "\n- \"mikv\": importance-aware hi + 2-bit pages (mikv-vllm plugin); knobs in "
            "--additional-config '{\"mikv\": {...}}'.")
    return parser


def _create_engine_config(original, engine_args, *args, **kwargs):
    """Translate `kv_cache_dtype="mikv"` into legal vLLM settings, then check the model."""
    extra = engine_args.additional_config or {}
    if engine_args.kv_cache_dtype != KV_CACHE_DTYPE:
        if ADDITIONAL_CONFIG_KEY in extra:
            raise MikvConfigError(
                "mikv: --additional-config has 'mikv' knobs but --kv-cache-dtype is "
                f"{engine_args.kv_cache_dtype!r}; add --kv-cache-dtype mikv")
        return original(engine_args, *args, **kwargs)

    cfg = MikvConfig.from_additional_config(extra)
    _check_backend_choice(engine_args)
    _check_features(engine_args)
    saved = (engine_args.kv_cache_dtype, engine_args.attention_backend,
             engine_args.additional_config)
    engine_args.kv_cache_dtype = cfg.vllm_kv_cache_dtype
    if engine_args.attention_config.backend is None:
        engine_args.attention_backend = CUSTOM_BACKEND
    engine_args.additional_config = {**copy.deepcopy(extra), ADDITIONAL_CONFIG_KEY: cfg.as_dict()}
    try:
        vllm_config = original(engine_args, *args, **kwargs)
    finally:
        (engine_args.kv_cache_dtype, engine_args.attention_backend,
         engine_args.additional_config) = saved
    layout = check_model_and_device(vllm_config, cfg)
    select_scheduler_and_worker(vllm_config)
    logger.info("mikv: hi pages %s, %s", cfg.hi_dtype, layout.describe())
    better = _better_block_size(layout)
    if better is not None:
        logger.info("mikv: --block-size %d would pack %d lo pages per block instead of %d "
                    "(more capacity; 2-bit keys then share scales over more tokens)",
                    better.block_size, better.pack_factor, layout.pack_factor)
    return vllm_config


GPU_WORKER = "vllm.v1.worker.gpu_worker.Worker"
MIKV_WORKER = "mikv_vllm.integration.worker.MikvWorker"


def select_scheduler_and_worker(vllm_config) -> None:
    """Demotion lives in a Scheduler subclass (matching vLLM's async scheduling choice) and a
    GPU Worker subclass; a user's own choice of either cannot be combined with them."""
    sched, parallel = vllm_config.scheduler_config, vllm_config.parallel_config
    if sched.scheduler_cls is not None:
        raise MikvConfigError(
            f"mikv: --kv-cache-dtype mikv brings its own scheduler; remove --scheduler-cls "
            f"{sched.scheduler_cls!r}")
    if parallel.worker_cls.startswith("vllm.") and parallel.worker_cls != GPU_WORKER:
        raise MikvConfigError(
            f"mikv: needs an NVIDIA GPU (CUDA); this vLLM platform runs {parallel.worker_cls}")
    if parallel.worker_cls not in ("auto", GPU_WORKER, MIKV_WORKER):
        raise MikvConfigError(
            f"mikv: --kv-cache-dtype mikv brings its own GPU worker; remove --worker-cls "
            f"{parallel.worker_cls!r}")
    if vllm_config.kv_transfer_config is not None:
        # A connector moves a request's blocks as hi pages, and (as a consumer under async
        # scheduling) frees them on a path that would skip the request's packs.
        raise MikvConfigError("mikv: KV transfer connectors (--kv-transfer-config) are not "
                              "supported with --kv-cache-dtype mikv")
    if parallel.pipeline_parallel_size > 1:
        raise MikvConfigError("mikv: pipeline parallelism is not supported (tensor parallelism "
                              "is); use --pipeline-parallel-size 1")
    from mikv_vllm.integration.scheduler import MikvAsyncScheduler, MikvScheduler

    sched.scheduler_cls = MikvAsyncScheduler if sched.async_scheduling else MikvScheduler
    if sched.watermark == 0.0:
        # vLLM's admission headroom (--watermark, off by default): without it, admissions
        # could take every block demotion had freed, and the next step's demotion, which
        # needs free blocks to open packs in, could then open only one or two: vLLM preempted
        # (3 preemptions in 256 x (2048 + 256) at auto's pool, scheduler_step.py; 0 with it).
        sched.watermark = MikvScheduler.free_watermark
    parallel.worker_cls = MIKV_WORKER


def _better_block_size(layout: PageLayout) -> PageLayout | None:
    """The smallest larger block size whose pack holds more lo pages (per-page key scales cost
    less over more tokens), or None."""
    for block_size in (32, 64):
        if block_size > layout.block_size:
            candidate = dataclasses.replace(layout, block_size=block_size)
            if candidate.pack_factor > layout.pack_factor:
                return candidate
    return None


def _check_backend_choice(engine_args) -> None:
    chosen = [engine_args.attention_backend, engine_args.attention_config.backend]
    for backend in chosen:
        name = getattr(backend, "name", backend)
        if name is not None and str(name).upper() != CUSTOM_BACKEND:
            raise MikvConfigError(
                f"mikv: --kv-cache-dtype mikv brings its own attention backend; "
                f"remove the attention backend choice {name!r}")


def _check_features(engine_args) -> None:
    """Engine features that cannot run over lo pages, refused before vLLM builds anything."""
    if engine_args.speculative_config:
        # A verification step gives a request several query tokens, which go to FlashAttention's
        # varlen path: it reads every block-table entry as a hi page, and lo pages are not.
        raise MikvConfigError("mikv: speculative decoding (--speculative-config) is not "
                              "supported with --kv-cache-dtype mikv")
    if engine_args.enable_sleep_mode:
        # Sleep discards the KV cache under the scheduler's packs and the workers' page state.
        raise MikvConfigError("mikv: sleep mode (--enable-sleep-mode) is not supported with "
                              "--kv-cache-dtype mikv")


def flash_attn_version(vllm_config, capability) -> int | None:
    """The FlashAttention version vLLM will run mikv's prefill with: the one pinned by
    `--attention-config '{"flash_attn_version": N}'`, else FA3 on Hopper and FA2 on other
    CUDA GPUs (vLLM's fa_utils.get_flash_attn_version); None where neither is known."""
    pinned = vllm_config.attention_config.flash_attn_version
    if pinned is not None:
        return pinned
    if capability is None:
        return None
    return 3 if capability.major == 9 else 2


def check_model_and_device(vllm_config, cfg: MikvConfig) -> PageLayout:
    """Reject models and GPUs the mikv backend cannot serve; return the page layout."""
    model = vllm_config.model_config
    arch = ",".join(getattr(model, "architectures", None) or ["?"])
    if model.use_mla:
        raise MikvConfigError(f"mikv: {arch} uses MLA attention, which mikv does not support")
    if model.is_attention_free or model.is_hybrid:
        raise MikvConfigError(
            f"mikv: {arch} has non-attention (e.g. Mamba/linear) layers, which mikv does not "
            "support")
    if model.get_sliding_window() is not None or getattr(
            model.hf_text_config, "sliding_window_pattern", None):
        raise MikvConfigError(
            f"mikv: {arch} uses sliding-window attention, which mikv does not support yet")
    head_size = model.get_head_size()
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise MikvConfigError(
            f"mikv: head size {head_size} of {arch} is not in {SUPPORTED_HEAD_SIZES}")
    import torch
    if model.dtype not in (torch.bfloat16, torch.float16):
        raise MikvConfigError(f"mikv: model dtype {model.dtype} unsupported; use --dtype bfloat16")
    if head_size % cfg.value_group_size:
        raise MikvConfigError(
            f"mikv: value_group_size {cfg.value_group_size} must divide head size {head_size}")

    from vllm.platforms import current_platform
    capability = current_platform.get_device_capability()
    if capability is not None and capability.to_int() < 80:
        raise MikvConfigError(
            f"mikv: GPU compute capability {capability.major}.{capability.minor} < 8.0 "
            "(Ampere) is not supported")
    fa_version = flash_attn_version(vllm_config, capability)
    if fa_version is not None and fa_version != 3:
        # vLLM attends over fp8 KV only in FlashAttention 3, and split decode hands hi pages to
        # it; FA2 (every A100, or pinned by --attention-config) runs neither.
        if cfg.hi_dtype == "fp8":
            raise MikvConfigError(
                f"mikv: hi_dtype 'fp8' needs FlashAttention 3 (compute capability 9.0), this "
                f"engine runs FlashAttention {fa_version}; use 'bf16'")
        if cfg.split_decode:
            raise MikvConfigError(
                f"mikv: split_decode needs FlashAttention 3 (compute capability 9.0), this "
                f"engine runs FlashAttention {fa_version}; leave it unset")
    block_size = vllm_config.cache_config.block_size or 16
    if block_size % 16:
        raise MikvConfigError(f"mikv: block size must be a multiple of 16, got {block_size}")
    if block_size * head_size > MAX_PAGE_HEAD_ELEMS:
        raise MikvConfigError(
            f"mikv: block size {block_size} x head size {head_size} is more key elements per "
            f"page and KV head than the {MAX_PAGE_HEAD_ELEMS} the quantize kernel stages; use "
            f"--block-size {MAX_PAGE_HEAD_ELEMS // head_size} or less")
    layout = PageLayout(
        block_size=block_size,
        num_kv_heads=model.get_num_kv_heads(vllm_config.parallel_config),
        head_size=head_size,
        hi_elem_bytes=1 if cfg.hi_dtype == "fp8" else 2,
        **cfg.lo_format(),
    )
    tier = layout.unpackable()
    if tier is not None:
        raise MikvConfigError(
            f"mikv: a {tier.lo_bits}-bit page ({tier.lo_page_bytes} B) does not fit twice in "
            f"a {cfg.hi_dtype} block of {tier.hi_page_bytes} B; use a larger --block-size, "
            f"or fewer lo_bits")
    floor = layout.lo_page_bytes / layout.bf16_page_bytes
    if cfg.kv_budget is not None and cfg.kv_budget <= floor:
        raise MikvConfigError(
            f"mikv: kv_budget {cfg.kv_budget} is not above what a {layout.lo_bits}-bit page "
            f"stores ({floor:.3f} of bf16's bytes); raise it")
    return layout
