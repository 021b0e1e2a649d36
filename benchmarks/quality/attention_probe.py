"""A real model's prefill with its last queries kept per layer, and how far attention over
round-tripped keys and values lands from exact attention: the probe behind the lo-format
measurements (lo_zero_points.py, requant_cost.py), which change one thing in a page's round trip
and watch attention."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchmarks.harness import kvsim, models  # noqa: E402
from benchmarks.harness.tasks import wiki_articles  # noqa: E402
from mikv_vllm.layout import PageLayout  # noqa: E402

QUERIES = 64


def prefill_wiki(model_name: str, tokens: int):
    """(model, per-layer (keys, values) [H, T, D] after RoPE, per-layer (last QUERIES queries,
    scaling)) of `tokens` Wikipedia tokens prefilled at full precision."""
    model, tok = models.load(model_name, kvsim.ATTN_IMPL)
    ids = tok(" ".join(wiki_articles()[:40]))["input_ids"][:tokens]
    queries = {}
    attend = kvsim.Prefill.attend

    def keep_queries(self, layer, q, k, v, scaling):
        queries[layer] = (q[:, -QUERIES:].clone(), scaling)
        return attend(self, layer, q, k, v, scaling)

    kvsim.Prefill.attend = keep_queries
    try:
        state = kvsim.prefill(model, ids)
    finally:
        kvsim.Prefill.attend = attend
    kv = {layer: (state.cache.layers[layer].keys[0].float(),
                  state.cache.layers[layer].values[0].float()) for layer in queries}
    return model, kv, queries, len(ids)


def attention_error(q: torch.Tensor, scaling: float, k: torch.Tensor, v: torch.Tensor,
                    k2: torch.Tensor, v2: torch.Tensor) -> dict:
    """KL of attention over (k2, v2) from attention over (k, v), and the output's relative
    error, averaged over heads and queries."""
    out0, p0 = kvsim._attend(q, k, v, scaling)
    out, p = kvsim._attend(q, k2, v2, scaling)
    kl = (p0 * (p0.clamp_min(1e-30).log() - p.clamp_min(1e-30).log())).sum(-1).mean()
    rel = ((out - out0).norm(dim=-1) / out0.norm(dim=-1).clamp_min(1e-12)).mean()
    return {"attention_kl": round(float(kl), 5), "output_rel_err": round(float(rel), 5)}


def mean_over_layers(rows: list[dict], names) -> dict:
    return {name: {m: round(sum(r[name][m] for r in rows) / len(rows), 5)
                   for m in ("attention_kl", "output_rel_err")} for name in names}


def probe_parser(doc: str) -> argparse.ArgumentParser:
    """The options every probe takes (model, tokens, block size, output JSON)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=models.QWEN15)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--out", required=True)
    return ap


def run_probe(a: argparse.Namespace, variants: tuple[str, ...], round_trips,
              lo_bits: int = 2, extra=None) -> None:
    """Per layer, whole pages' keys and values [H, T, D] round-tripped each variant's way
    (`round_trips(layout, k, v)` -> {variant: (k2, v2)}, `layout` the model's page layout at
    `lo_bits`), the attention error of each, and `extra(layout, k)`'s fields; rows and their
    means over layers go to a.out."""
    model, kv, queries, tokens = prefill_wiki(a.model, a.tokens)
    layout: PageLayout = kvsim.layout_of(model, a.block_size, lo_bits=lo_bits)
    rows = []
    for layer in sorted(queries):
        k, v = kv[layer]
        t = k.shape[1] - k.shape[1] % a.block_size
        k, v = k[:, :t], v[:, :t]
        q, scaling = queries[layer]
        trips = round_trips(layout, k, v)
        row = {"layer": layer, **(extra(layout, k) if extra else {}),
               **{name: attention_error(q, scaling, k, v, *trips[name]) for name in variants}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    mean = mean_over_layers(rows, variants)
    result = {"model": a.model, "tokens": tokens, "bits": lo_bits, "block_size": a.block_size,
              "queries": QUERIES, "mean_over_layers": mean, "layers": rows}
    json.dump(result, open(a.out, "w"), indent=1)
    print(json.dumps(mean))
