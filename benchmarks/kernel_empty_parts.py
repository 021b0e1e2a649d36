"""What the decode kernel costs over a table with no pages: split decode's lo part while nothing
is demoted (issue 21's all-hi gap). One layer's kernel (and its split reduce) over empty rows,
merging into `out` by a given lse as split decode does, replayed 32 times in a CUDA graph;
medians of 30 replays. Each batch twice: launched plainly, and behind the graph gate
(`skip_empty`), with what `ops.empty_gate_pays` picks for that shape.
Needs no vLLM: PYTHONPATH=. python benchmarks/kernel_empty_parts.py"""
from __future__ import annotations

import argparse
import math

import torch

from mikv_vllm import ops
from mikv_vllm.layout import PageLayout


def time_empty(batch: int, kv_heads: int, group: int, head_dim: int, block_size: int,
               skip_empty: bool) -> tuple[int, float]:
    """(splits, median us per layer) over `batch` empty rows."""
    layout = PageLayout(block_size, kv_heads, head_dim, 2)
    kv = torch.randn(64, block_size, kv_heads, 2 * head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = kv.split(head_dim, dim=-1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = ops.decode_num_splits(batch, kv_heads, group, sms,
                                   ops.decode_ctas_per_sm(head_dim, group, False, 2, 0))
    q = torch.randn(batch, kv_heads * group, head_dim, device="cuda", dtype=torch.bfloat16)
    out = torch.randn_like(q)
    table = torch.zeros(batch, 144, dtype=torch.int32, device="cuda")
    lens = torch.zeros(batch, dtype=torch.int32, device="cuda")
    merge_lse = torch.randn(kv_heads * group, batch, device="cuda")

    def layer():
        ops.paged_decode(out, q, k, v, table, lens, 1 / math.sqrt(head_dim), 1.0, 1.0, splits,
                         layout, merge_lse=merge_lse, skip_empty=skip_empty)

    for _ in range(20):
        layer()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(32):
            layer()
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / 32)
    return splits, sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 128])
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--gqa", type=int, default=4)
    args = p.parse_args()
    for batch in args.batches:
        splits, plain = time_empty(batch, args.kv_heads, args.gqa, 128, 16, False)
        _, gated = time_empty(batch, args.kv_heads, args.gqa, 128, 16, True)
        pick = "gated" if ops.empty_gate_pays(batch, args.kv_heads, args.gqa, splits) else "plain"
        print(f"batch {batch} splits {splits}: empty lo table, kernel + reduce per layer in a "
              f"graph: plain {plain:.2f} us, gated {gated:.2f} us; empty_gate_pays picks {pick}")


if __name__ == "__main__":
    main()
