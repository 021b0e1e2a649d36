"""The `vllm.general_plugins` entry point, as vLLM 0.26 discovers and runs it."""
from __future__ import annotations

from importlib.metadata import entry_points

import pytest

ENTRY_POINT = "mikv_vllm.plugin:register"


def _mikv_layers(func) -> int:
    """How many mikv wrappers sit on top of a vLLM function (following functools.wraps)."""
    layers = 0
    while func is not None:
        code = getattr(func, "__code__", None)
        if code is not None and code.co_filename.endswith("integration/patches.py"):
            layers += 1
        func = getattr(func, "__wrapped__", None)
    return layers


def test_entry_point_is_installed():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "mikv"]
    assert len(eps) == 1, "mikv is not installed as a vllm.general_plugins entry point"
    assert eps[0].value == ENTRY_POINT
    from mikv_vllm import plugin
    assert eps[0].load() is plugin.register


def test_load_general_plugins_runs_register(monkeypatch):
    import vllm.plugins
    from vllm.v1.attention.backends import registry

    from mikv_vllm import plugin

    calls = []
    original = plugin.register

    def counting_register():
        calls.append(1)
        original()

    monkeypatch.setattr(plugin, "register", counting_register)
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    monkeypatch.setattr(registry, "_ATTN_OVERRIDES", {})  # as in a fresh process
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    vllm.plugins.load_general_plugins()
    assert calls == [1]
    assert registry.AttentionBackendEnum.CUSTOM.get_path() == plugin.BACKEND_CLASS_PATH


def test_custom_backend_is_mikv():
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from mikv_vllm.integration.attention.backend import MikvAttentionBackend

    load_general_plugins()
    backend = AttentionBackendEnum.CUSTOM.get_class()
    assert backend is MikvAttentionBackend
    assert backend.get_name() == "CUSTOM"
    # vLLM's Attention layer maps the backend back through its name.
    assert AttentionBackendEnum[backend.get_name()] is AttentionBackendEnum.CUSTOM


def test_register_is_idempotent():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from mikv_vllm import plugin

    plugin.register()
    create, add = EngineArgs.create_engine_config, EngineArgs.add_cli_args
    plugin.register()
    plugin.register()
    assert EngineArgs.create_engine_config is create
    assert EngineArgs.add_cli_args is add
    assert _mikv_layers(EngineArgs.create_engine_config) == 1
    assert _mikv_layers(EngineArgs.add_cli_args) == 1
    assert isinstance(EngineArgs.__dict__["add_cli_args"], staticmethod)
    assert AttentionBackendEnum.CUSTOM.get_path() == plugin.BACKEND_CLASS_PATH


def test_twice_registered_parser_lists_mikv_once():
    """A second register() (vLLM runs plugins in every process, sometimes twice) must not make
    a parser list `mikv` twice."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from mikv_vllm import plugin

    plugin.register()
    plugin.register()
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    choices = parser._option_string_actions["--kv-cache-dtype"].choices
    assert list(choices).count("mikv") == 1


@pytest.mark.parametrize("module", ["mikv_vllm.plugin", "mikv_vllm.integration.patches",
                                    "mikv_vllm.integration.attention.backend", "mikv_vllm.integration.attention.metadata",
                                    "mikv_vllm.integration.attention.impl", "mikv_vllm.ops"])
def test_modules_import_without_kernels(module):
    """Every process imports these before a kernel runs; none may need mikv_vllm._C."""
    import importlib
    importlib.import_module(module)
