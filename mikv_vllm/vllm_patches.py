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

from mikv_vllm.attention.backend import SUPPORTED_HEAD_SIZES
from mikv_vllm.config import ADDITIONAL_CONFIG_KEY, KV_CACHE_DTYPE, MikvConfig, MikvConfigError
from mikv_vllm.layout import PageLayout

logger = init_logger("vllm.mikv")

KV_CACHE_DTYPE_FLAG = "--kv-cache-dtype"
CUSTOM_BACKEND = "CUSTOM"
_PATCHED_MARK = "_mikv_patched"


def apply() -> None:
    """Patch vLLM once per process; calling again is a no-op."""
    from vllm.engine.arg_utils import EngineArgs

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
    logger.info("mikv: hi pages %s, %s", cfg.hi_dtype, layout.describe())
    better = _better_block_size(layout)
    if better is not None:
        logger.info("mikv: --block-size %d would pack %d lo pages per block instead of %d",
                    better.block_size, better.pack_factor, layout.pack_factor)
    return vllm_config


def _better_block_size(layout: PageLayout) -> PageLayout | None:
    """The smallest larger block size whose pack holds more lo pages (per-page key scales cost
    less over more tokens), or None."""
    for block_size in (32, 64):
        if block_size > layout.block_size:
            candidate = dataclasses.replace(layout, block_size=block_size)
            if candidate.pack_factor > layout.pack_factor:
                return candidate
    return None
