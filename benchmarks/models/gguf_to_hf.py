"""A GGUF checkpoint (Llama or Qwen2) as a bf16 Hugging Face folder that vLLM loads natively.

    python benchmarks/models/gguf_to_hf.py MODEL.gguf TOKENIZER_DIR OUT_DIR [--workers 16]

TOKENIZER_DIR holds the model's config.json and tokenizer files (made once with transformers
from the same GGUF, see prepare_qwen.py): transformers' own GGUF loader needs half a minute for
the tokenizer alone and runs its dequantization in one process, while this script dequantizes
the tensors in parallel with the `gguf` package (the same dequantization transformers uses, so
the weights are identical). llama.cpp stores a Llama's attn_q/attn_k rows interleaved per
head; they are put back in Hugging Face order. Qwen2 GGUFs keep Hugging Face's order."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor

import numpy as np

NAMES = {  # GGUF name -> Hugging Face name ({} = layer)
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    m = LAYER.match(name)
    if not m or m.group(2) not in NAMES:
        raise KeyError(f"no Hugging Face name for GGUF tensor {name!r}")
    return f"model.layers.{m.group(1)}.{NAMES[m.group(2)]}.{m.group(3)}"


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleave of rotary rows ((half, 2) -> (2, half))."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.parts[f.data[0]]
    return bytes(v).decode() if v.dtype == np.uint8 else int(v[0])


def _convert(args) -> tuple[str, object]:
    path, names = args
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    heads = {"attn_q": _field(reader, f"{arch}.attention.head_count"),
             "attn_k": _field(reader, f"{arch}.attention.head_count_kv")}
    out = {}
    for t in reader.tensors:
        if t.name not in names:
            continue
        w = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        kind = t.name.split(".")[-2]
        if arch == "llama" and kind in heads and t.name.endswith("weight"):
            w = unpermute(w, heads[kind])
        out[hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32)).to(torch.bfloat16)
    return out


def convert(gguf_path: str, tok_dir: str, out_dir: str, workers: int = 8) -> int:
    from gguf import GGUFReader
    from safetensors.torch import save_file

    names = [t.name for t in GGUFReader(gguf_path).tensors]
    chunks = [(gguf_path, set(names[i::workers])) for i in range(workers)]
    tensors = {}
    # spawn, not fork: a forked child of a process with torch's threads running can hang
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for part in pool.map(_convert, chunks):
            tensors.update(part)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for f in os.listdir(tok_dir):
        if f != "config.json":
            shutil.copy(os.path.join(tok_dir, f), out_dir)
    with open(os.path.join(tok_dir, "config.json")) as f:
        config = json.load(f)
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return len(tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("tok_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    a = ap.parse_args()
    print(f"{convert(a.gguf, a.tok_dir, a.out_dir, a.workers)} tensors -> {a.out_dir}")


if __name__ == "__main__":
    main()
