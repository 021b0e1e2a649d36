"""`--kv-cache-dtype mikv` through vLLM 0.26's real `vllm serve` parser and config builder."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from conftest import GPU_WORKER
from mikv_vllm.config import MikvConfig, MikvConfigError

DEFAULT_KNOBS = MikvConfig().as_dict()


def mikv_args(knobs: dict | None = None, *extra: str) -> list[str]:
    argv = ["--kv-cache-dtype", "mikv", *extra]
    if knobs is not None:
        argv += ["--additional-config", json.dumps({"mikv": knobs})]
    return argv


def assert_one_line_error(excinfo) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, f"MikvConfigError spans several lines: {message!r}"
    assert message.startswith("mikv: "), message


# --- the parser -----------------------------------------------------------------------------

def test_serve_parser_accepts_mikv(parse_serve):
    assert parse_serve("--kv-cache-dtype", "mikv").kv_cache_dtype == "mikv"


@pytest.mark.parametrize("dtype", ["auto", "fp8", "fp8_e4m3", "bfloat16"])
def test_serve_parser_still_accepts_stock_dtypes(parse_serve, dtype):
    assert parse_serve("--kv-cache-dtype", dtype).kv_cache_dtype == dtype


def test_serve_parser_rejects_unknown_dtype(parse_serve, capsys):
    with pytest.raises(SystemExit):
        parse_serve("--kv-cache-dtype", "mikv2")
    assert "mikv2" in capsys.readouterr().err


def test_serve_parser_lists_mikv_once(serve_parser):
    action = serve_parser._option_string_actions["--kv-cache-dtype"]
    assert list(action.choices).count("mikv") == 1
    assert "mikv" in action.help


# --- create_engine_config rewrites the alias --------------------------------------------------

def test_mikv_becomes_bf16_cache_and_custom_backend(serve_engine_config):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    engine_args, cfg = serve_engine_config(*mikv_args())
    assert cfg.cache_config.cache_dtype == "auto"
    assert cfg.attention_config.backend == AttentionBackendEnum.CUSTOM
    assert cfg.additional_config["mikv"] == DEFAULT_KNOBS
    assert cfg.model_config.dtype == torch.bfloat16


def test_mikv_selects_its_scheduler_and_worker(serve_engine_config):
    from mikv_vllm.integration.patches import select_scheduler_and_worker

    _, cfg = serve_engine_config(*mikv_args())
    # vLLM's CPU platform turns async scheduling off; on CUDA it is on by default.
    assert cfg.scheduler_config.get_scheduler_cls().__name__ == "MikvScheduler"
    assert cfg.parallel_config.worker_cls == "mikv_vllm.integration.worker.MikvWorker"
    cfg.scheduler_config.scheduler_cls, cfg.scheduler_config.async_scheduling = None, True
    select_scheduler_and_worker(cfg)
    assert cfg.scheduler_config.get_scheduler_cls().__name__ == "MikvAsyncScheduler"


def test_stock_dtype_keeps_vllm_scheduler_and_worker(serve_engine_config):
    _, cfg = serve_engine_config("--kv-cache-dtype", "fp8")
    assert cfg.scheduler_config.scheduler_cls is None
    assert cfg.parallel_config.worker_cls == GPU_WORKER


@pytest.mark.parametrize("argv,match", [
    pytest.param(["--scheduler-cls", "vllm.v1.core.sched.scheduler.Scheduler"],
                 r"brings its own scheduler; remove --scheduler-cls", id="scheduler-cls"),
    pytest.param(["--worker-cls", "my.Worker"], r"brings its own GPU worker; remove --worker-cls",
                 id="worker-cls"),
    pytest.param(["--worker-cls", "vllm.v1.worker.cpu_worker.CPUWorker"],
                 r"needs an NVIDIA GPU \(CUDA\)", id="cpu-platform"),
])
def test_scheduler_and_worker_conflicts(serve_engine_config, argv, match):
    with pytest.raises(MikvConfigError, match=match) as excinfo:
        serve_engine_config(*mikv_args(), *argv)
    assert_one_line_error(excinfo)


def test_hi_dtype_fp8_becomes_fp8_cache(serve_engine_config):
    _, cfg = serve_engine_config(*mikv_args({"hi_dtype": "fp8"}))
    assert cfg.cache_config.cache_dtype == "fp8"
    assert cfg.additional_config["mikv"] == {**DEFAULT_KNOBS, "hi_dtype": "fp8"}


def test_two_lo_tiers_are_parsed_and_carried(serve_engine_config):
    _, cfg = serve_engine_config(*mikv_args({"lo_bits": [4, 2]}))
    assert cfg.additional_config["mikv"] == {**DEFAULT_KNOBS, "lo_bits": [4, 2]}
    parsed = MikvConfig.of(cfg)  # what scheduler, worker and backend read: parsed once
    assert (parsed.mid_bits, parsed.final_bits) == (4, 2)
    assert MikvConfig.of(cfg) is parsed


@pytest.mark.parametrize("knobs", [{"hi_dtype": "fp8", "lo_bits": 4},
                                   {"hi_dtype": "fp8", "lo_bits": [4, 2]}])
def test_a_4_bit_page_that_does_not_pack_in_an_fp8_block_is_refused(serve_engine_config, knobs):
    with pytest.raises(MikvConfigError, match="4-bit page .* does not fit twice in a fp8 block"):
        serve_engine_config(*mikv_args(knobs))


def test_kv_transfer_connectors_are_refused(serve_engine_config):
    with pytest.raises(MikvConfigError, match=r"KV transfer connectors .* not supported"):
        serve_engine_config(*mikv_args(None, "--kv-transfer-config", json.dumps(
            {"kv_connector": "ExampleConnector", "kv_role": "kv_both"})))


@pytest.mark.parametrize("argv,match", [
    pytest.param(["--speculative-config", json.dumps(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})],
        r"speculative decoding \(--speculative-config\) is not supported", id="ngram"),
    pytest.param(["--enable-sleep-mode"], r"sleep mode \(--enable-sleep-mode\) is not supported",
                 id="sleep"),
])
def test_features_that_would_read_lo_pages_as_hi_are_refused(serve_engine_config, argv, match):
    with pytest.raises(MikvConfigError, match=match) as excinfo:
        serve_engine_config(*mikv_args(None, *argv))
    assert_one_line_error(excinfo)


@pytest.mark.parametrize("argv", [["--no-enable-chunked-prefill"], ["--max-num-seqs", "1"],
                                  ["--max-num-seqs", "1024"]], ids=lambda a: " ".join(a))
def test_scheduler_extremes_are_accepted(serve_engine_config, argv):
    _, cfg = serve_engine_config(*mikv_args(None, *argv))
    assert cfg.scheduler_config.scheduler_cls.__name__.startswith("Mikv")


def test_a_kv_budget_below_all_lo_is_refused(serve_engine_config):
    with pytest.raises(MikvConfigError, match=r"kv_budget 0.1 is not above what a 2-bit page "
                                              r"stores \(0.1\d\d of bf16's bytes\)"):
        serve_engine_config(*mikv_args({"kv_budget": 0.1}))


def test_knobs_are_normalized_and_other_additional_config_kept(serve_engine_config):
    extra = json.dumps({"other_plugin": {"x": 1}, "mikv": {"hi_budget": 1, "sink_pages": 0}})
    _, cfg = serve_engine_config("--kv-cache-dtype", "mikv", "--additional-config", extra)
    assert cfg.additional_config["other_plugin"] == {"x": 1}
    assert cfg.additional_config["mikv"] == {**DEFAULT_KNOBS, "hi_budget": 1, "sink_pages": 0}


def test_explicit_custom_backend_is_allowed(serve_engine_config):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    _, cfg = serve_engine_config(*mikv_args(None, "--attention-backend", "CUSTOM"))
    assert cfg.attention_config.backend == AttentionBackendEnum.CUSTOM


def test_block_size_is_kept(serve_engine_config):
    _, cfg = serve_engine_config(*mikv_args(None, "--block-size", "32"))
    assert cfg.cache_config.block_size == 32


@pytest.mark.parametrize("dtype", ["auto", "fp8"])
def test_stock_dtypes_are_untouched(serve_engine_config, dtype):
    _, cfg = serve_engine_config("--kv-cache-dtype", dtype)
    assert cfg.cache_config.cache_dtype == dtype
    assert cfg.attention_config.backend is None
    assert "mikv" not in (cfg.additional_config or {})


def test_engine_args_are_left_unchanged(parse_serve):
    """The rewrite is temporary: the caller's EngineArgs still says `mikv` afterwards, and the
    call changes no field that stock vLLM's own create_engine_config does not change too."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    def changed_fields(*argv):
        engine_args = AsyncEngineArgs.from_cli_args(parse_serve(*argv))
        before = {f.name: copy.deepcopy(getattr(engine_args, f.name))
                  for f in dataclasses.fields(engine_args)}
        engine_args.create_engine_config()
        return engine_args, {n for n, v in before.items() if getattr(engine_args, n) != v}

    extra = ["--additional-config", json.dumps({"other": 1, "mikv": {"lo_bits": 4}})]
    engine_args, changed_by_mikv = changed_fields("--kv-cache-dtype", "mikv", *extra)
    _, changed_by_stock = changed_fields("--kv-cache-dtype", "auto")
    assert engine_args.kv_cache_dtype == "mikv"
    assert engine_args.attention_backend is None
    assert engine_args.attention_config.backend is None
    assert engine_args.additional_config == {"other": 1, "mikv": {"lo_bits": 4}}
    assert changed_by_mikv <= changed_by_stock, changed_by_mikv - changed_by_stock


def test_create_engine_config_twice(parse_serve):
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine_args = AsyncEngineArgs.from_cli_args(parse_serve(*mikv_args({"hi_dtype": "fp8"})))
    first = engine_args.create_engine_config()
    second = engine_args.create_engine_config()
    for cfg in (first, second):
        assert cfg.cache_config.cache_dtype == "fp8"
        assert cfg.attention_config.backend.name == "CUSTOM"
        assert cfg.additional_config["mikv"]["hi_dtype"] == "fp8"
    assert engine_args.kv_cache_dtype == "mikv"


def test_engine_args_path_of_llm(tiny_llama):
    """`LLM(model=..., kv_cache_dtype="mikv", additional_config=...)` builds EngineArgs with
    these keywords and calls create_engine_config; no parser involved."""
    from vllm.engine.arg_utils import EngineArgs

    engine_args = EngineArgs(model=tiny_llama, kv_cache_dtype="mikv", worker_cls=GPU_WORKER,
                             additional_config={"mikv": {"recent_pages": 2}})
    cfg = engine_args.create_engine_config()
    assert cfg.cache_config.cache_dtype == "auto"
    assert cfg.attention_config.backend.name == "CUSTOM"
    assert cfg.additional_config["mikv"] == {**DEFAULT_KNOBS, "recent_pages": 2}
    assert engine_args.kv_cache_dtype == "mikv"


# --- bad knobs: one-line MikvConfigError ------------------------------------------------------

BAD_KNOBS = [
    pytest.param({"lo_bit": 2}, r"unknown knob 'lo_bit'", id="unknown-knob"),
    pytest.param({"lo_bits": True}, r"knob 'lo_bits' must be int or list or tuple, got bool",
                 id="bool-for-int"),
    pytest.param({"sink_pages": "1"}, r"knob 'sink_pages' must be int, got str",
                 id="str-for-int"),
    pytest.param({"recent_pages": 4.0}, r"knob 'recent_pages' must be int, got float",
                 id="float-for-int"),
    pytest.param({"hi_dtype": 8}, r"knob 'hi_dtype' must be str, got int", id="number-for-str"),
    pytest.param({"hi_budget": "0.5"}, r"knob 'hi_budget' must be float or int or null",
                 id="str-for-float"),
    pytest.param({"hi_budget": True}, r"knob 'hi_budget' must be float or int or null, got bool",
                 id="bool-for-float"),
    pytest.param({"split_decode": 1}, r"knob 'split_decode' must be bool or null, got int",
                 id="int-for-bool"),
    pytest.param({"outlier_balancing": True}, r"unknown knob 'outlier_balancing'",
                 id="harness-only-knob"),
    pytest.param({"key_outliers": "yes"}, r"knob 'key_outliers' must be bool, got str",
                 id="str-for-bool"),
    pytest.param({"split_decode": "auto"}, r"knob 'split_decode' must be bool or null, got str",
                 id="str-for-optional-bool"),
    pytest.param({"hi_dtype": "fp16"}, r"hi_dtype must be 'bf16' or 'fp8', got 'fp16'",
                 id="hi-dtype"),
    pytest.param({"lo_bits": 3}, r"lo_bits must be 2, 4 or \[4, 2\] .*, got 3", id="lo-bits-3"),
    pytest.param({"kv_budget": 0}, r"kv_budget must be in \(0, 1\], got 0", id="kv-budget-0"),
    pytest.param({"kv_budget": 0.3, "hi_budget": 0.2}, r"not both", id="both-budgets"),
    pytest.param({"lo_bits": [2, 4]}, r"lo_bits must be 2, 4 or \[4, 2\] .*, got \[2, 4\]",
                 id="lo-bits-2-4"),
    pytest.param({"lo_bits": [4, 2.0]}, r"lo_bits must be .*, got \[4, 2.0\]",
                 id="lo-bits-float"),
    pytest.param({"hi_budget": 0}, r"hi_budget must be in \(0, 1\], got 0", id="hi-budget-0"),
    pytest.param({"hi_budget": 1.5}, r"hi_budget must be in \(0, 1\], got 1.5",
                 id="hi-budget-1.5"),
    pytest.param({"recent_pages": 0}, r"recent_pages must be >= 1", id="recent-pages-0"),
    pytest.param({"sink_pages": -1}, r"sink_pages must be >= 0, got -1", id="sink-pages-neg"),
    pytest.param({"prefill_window": 513}, r"prefill_window must be in \[0, 512\], got 513",
                 id="window-513"),
    pytest.param({"value_group_size": 48}, r"value_group_size must be 32, 64 or 128, got 48",
                 id="group-48"),
    pytest.param({"value_group_size": 128}, r"value_group_size 128 must divide head size 64",
                 id="group-128-on-head-64"),
]


@pytest.mark.parametrize("knobs,match", BAD_KNOBS)
def test_bad_knobs_fail_with_one_line(serve_engine_config, knobs, match):
    with pytest.raises(MikvConfigError, match=match) as excinfo:
        serve_engine_config(*mikv_args(knobs))
    assert_one_line_error(excinfo)


@pytest.mark.parametrize("knobs", [[2], None, "lo_bits=2"])
def test_knobs_must_be_an_object(serve_engine_config, knobs):
    with pytest.raises(MikvConfigError, match=r"must be a JSON object, got") as excinfo:
        serve_engine_config("--kv-cache-dtype", "mikv",
                            "--additional-config", json.dumps({"mikv": knobs}))
    assert_one_line_error(excinfo)


@pytest.mark.parametrize("argv,match", [
    pytest.param(["--block-size", "24"], r"block size must be a multiple of 16, got 24",
                 id="block-24"),
    pytest.param(["--block-size", "8"], r"block size must be a multiple of 16, got 8",
                 id="block-8"),
    pytest.param(["--dtype", "float32"], r"model dtype torch.float32 unsupported", id="fp32"),
])
def test_bad_engine_settings(serve_engine_config, argv, match):
    with pytest.raises(MikvConfigError, match=match) as excinfo:
        serve_engine_config(*mikv_args(None, *argv))
    assert_one_line_error(excinfo)


def test_fp16_model_is_accepted(serve_engine_config):
    _, cfg = serve_engine_config(*mikv_args(None, "--dtype", "float16"))
    assert cfg.model_config.dtype == torch.float16
    assert cfg.cache_config.cache_dtype == "auto"


@pytest.mark.parametrize("dtype", ["fp8", "auto"])
def test_knobs_without_mikv_dtype(serve_engine_config, dtype):
    argv = ["--kv-cache-dtype", dtype, "--additional-config", json.dumps({"mikv": {}})]
    with pytest.raises(MikvConfigError,
                       match=rf"'mikv' knobs but --kv-cache-dtype is '{dtype}'") as excinfo:
        serve_engine_config(*argv)
    assert_one_line_error(excinfo)


def test_bad_knobs_through_engine_args(tiny_llama):
    from vllm.engine.arg_utils import EngineArgs

    engine_args = EngineArgs(model=tiny_llama, kv_cache_dtype="mikv", worker_cls=GPU_WORKER,
                             additional_config={"mikv": {"lo_bits": 8}})
    with pytest.raises(MikvConfigError, match=r"lo_bits must be 2, 4 or \[4, 2\] .*, got 8"):
        engine_args.create_engine_config()


@pytest.mark.parametrize("argv", [
    pytest.param(["--attention-backend", "FLASH_ATTN"], id="attention-backend"),
    pytest.param(["--attention-config", '{"backend": "FLASH_ATTN"}'], id="attention-config"),
])
def test_conflicting_attention_backend(serve_engine_config, argv):
    with pytest.raises(MikvConfigError,
                       match=r"brings its own attention backend.*'FLASH_ATTN'") as excinfo:
        serve_engine_config(*mikv_args(None, *argv))
    assert_one_line_error(excinfo)


# --- unsupported models: one-line reason --------------------------------------------------------

UNSUPPORTED_MODELS = [
    pytest.param("deepseek-v2-mla", r"DeepseekV2ForCausalLM uses MLA attention", id="mla"),
    pytest.param("jamba-hybrid", r"JambaForCausalLM has non-attention .*layers", id="hybrid"),
    pytest.param("mamba", r"MambaForCausalLM has non-attention .*layers", id="attention-free"),
    pytest.param("mistral-sliding-window", r"MistralForCausalLM uses sliding-window attention",
                 id="sliding-window"),
    pytest.param("llama-head32", r"head size 32 of LlamaForCausalLM is not in \(64, 128, 256\)",
                 id="head-size-32"),
]


@pytest.mark.parametrize("fixture,match", UNSUPPORTED_MODELS)
def test_unsupported_models(serve_engine_config, fixtures_dir, fixture, match):
    """Each fixture is a config.json only; vLLM resolves the architecture offline (the first run
    on a machine inspects each model class in a subprocess and caches it in ~/.cache/vllm)."""
    with pytest.raises(MikvConfigError, match=match) as excinfo:
        serve_engine_config(*mikv_args(), model=str(fixtures_dir / fixture))
    assert_one_line_error(excinfo)


def test_qwen2_with_sliding_window_off_is_accepted(serve_engine_config, fixtures_dir):
    """Qwen2.5 checkpoints carry `sliding_window` with `use_sliding_window: false`: full
    attention, which mikv must accept."""
    _, cfg = serve_engine_config(*mikv_args(), model=str(fixtures_dir / "qwen2-sliding-window-off"))
    assert cfg.model_config.architectures == ["Qwen2ForCausalLM"]
    assert cfg.attention_config.backend.name == "CUSTOM"


@pytest.mark.parametrize("fixture", ["deepseek-v2-mla", "mistral-sliding-window"])
def test_unsupported_models_still_start_without_mikv(serve_engine_config, fixtures_dir, fixture):
    """The rejection comes from mikv, not from the fixture: stock settings accept the model."""
    _, cfg = serve_engine_config("--kv-cache-dtype", "auto", model=str(fixtures_dir / fixture))
    assert cfg.cache_config.cache_dtype == "auto"


# --- GPU generation checks (the platform's answer replaced; the check itself is real) ----------

FA2 = ("--attention-config", '{"flash_attn_version": 2}')  # the A100 route, pinned on Hopper


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes the device capability of a CPU run")
@pytest.mark.parametrize("capability,knobs,extra,match", [
    ((7, 5), {}, (), r"compute capability 7.5 < 8.0"),
    ((8, 0), {"hi_dtype": "fp8"}, (), r"hi_dtype 'fp8' needs FlashAttention 3.*runs FlashAttention 2"),
    ((8, 0), {"split_decode": True}, (), r"split_decode needs FlashAttention 3"),
    ((8, 0), {"split_decode": False}, (), None),
    ((8, 0), {}, (), None),
    ((9, 0), {"hi_dtype": "fp8", "split_decode": True}, (), None),
    ((9, 0), {"hi_dtype": "fp8"}, FA2, r"hi_dtype 'fp8' needs FlashAttention 3"),
    ((9, 0), {"split_decode": True}, FA2, r"split_decode needs FlashAttention 3"),
    ((9, 0), {}, FA2, None),
])
def test_device_capability_checks(serve_engine_config, monkeypatch, capability, knobs, extra,
                                  match):
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    monkeypatch.setattr(type(current_platform), "get_device_capability",
                        classmethod(lambda cls, device_id=0: DeviceCapability(*capability)))
    if match is None:
        _, cfg = serve_engine_config(*mikv_args(knobs, *extra))
        assert cfg.attention_config.flash_attn_version == (2 if extra else None)
        return
    with pytest.raises(MikvConfigError, match=match) as excinfo:
        serve_engine_config(*mikv_args(knobs, *extra))
    assert_one_line_error(excinfo)
