"""vLLM entry point (`vllm.general_plugins`): runs in every vLLM process, possibly twice."""
from __future__ import annotations

BACKEND_CLASS_PATH = "mikv_vllm.integration.attention.backend.MikvAttentionBackend"


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from mikv_vllm.integration import patches

    patches.apply()
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS_PATH)
