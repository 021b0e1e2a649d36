"""Decode-attention kernel benchmark: mikv's paged decode over mixed hi/2-bit pages (and, with
--mid-shares, hi/4-bit/2-bit pages: that share of the lo pages in the 4-bit tier; with
--key-outliers, lo pages that keep exact keys, kernel mikv_bf16hi_kout) vs vLLM's
FlashAttention decode on bf16 and fp8 caches of the same shapes (one layer, H100).

Times are CUDA-event medians (triton.testing.do_bench); bytes_read counts what each kernel must
read at least once (K/V pages and their scales, queries, block table) plus the output it writes;
hbm_gbps is a device-to-device copy measured in the same run. Writes JSON rows
{kernel, batch, ctx, hi_fraction, mid_share, head_dim, gqa, us, bytes_read, gbps, hbm_gbps,
frac_of_hbm}
and a PNG of speedup vs context length."""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from dataclasses import replace

import torch

from mikv_vllm import ops
from mikv_vllm.layout import PageLayout

KV_HEADS = 8
BLOCK = 16
MAX_TOKENS = 4 << 20  # batch * ctx cap: one layer's bf16 cache stays under ~16 GB


def step_overhead(layer_overhead: float, num_layers: int = 32) -> float:
    """Page mass's share of a measured decode step of a `num_layers` model: the slab output and
    page_mass run on `sampled_layers(num_layers)` only (and on one step in REPORT_EVERY; the
    others pay `us_with_slab_gate_off`)."""
    from mikv_vllm.importance import sampled_layers
    return layer_overhead * len(sampled_layers(num_layers)) / num_layers


def bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # us


def hbm_copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / us / 1e3


def make_case(batch, ctx, head_dim, gqa, hi_fraction, fp8_hi, layout, mid_share=0.0):
    pages = math.ceil(ctx / BLOCK)
    lo_pages = min(round(pages * (1 - hi_fraction)), pages - 1)  # the sink page stays hi
    mid_pages = round(lo_pages * mid_share)
    tiers = [(False, 1 + mid_pages, 1 + lo_pages)]  # (middle tier?, first column, end)
    if mid_pages:
        tiers.append((True, 1, 1 + mid_pages))
    first_pack = batch * pages
    num_blocks = first_pack + sum(
        math.ceil(batch * (end - start) / layout.tier(mid).pack_factor)
        for mid, start, end in tiers) + 1
    dtype = torch.uint8 if fp8_hi else torch.bfloat16
    kv = torch.randn(num_blocks, BLOCK, KV_HEADS, 2 * head_dim, device="cuda").to(
        torch.float8_e4m3fn if fp8_hi else torch.bfloat16).view(dtype)
    k, v = kv.split(head_dim, dim=-1)
    table = torch.arange(batch * pages, dtype=torch.int32, device="cuda").reshape(batch, pages)
    for mid, start, end in tiers:
        if end == start:
            continue
        # The oldest pages after the sink go lo (4-bit first, where a share of them is), each
        # tier packed in blocks of its own.
        cols = torch.arange(start, end, device="cuda")
        src = table[:, cols].reshape(-1).contiguous()
        n = layout.tier(mid).pack_factor
        slots = torch.arange(src.numel(), dtype=torch.int32, device="cuda")
        codes = layout.lo_code(first_pack, 0, mid) + slots  # pack first_pack + slot // n
        ops.quantize_pages(k, v, src, codes, layout)
        table[:, cols] = -(1 + codes.reshape(batch, -1))
        first_pack += math.ceil(src.numel() / n)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, KV_HEADS * gqa, head_dim, device="cuda", dtype=torch.bfloat16)
    return q, k, v, table, lens, lo_pages, pages


def split_step(q, k, v, table, lens, scale, splits, layout, ctx, fa_utils):
    """One decode of the split_decode knob, as the backend runs it (mikv_vllm.integration.attention.
    split_decode.decode; the tables are split outside the timed call, as the metadata builder
    does once per step for all layers)."""
    from mikv_vllm.integration.attention.split_decode import SplitTables, decode

    hi_t, hi_lens, lo_t, lo_lens = SplitTables(*table.shape, q.device).fill(table, lens, BLOCK)
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device="cuda")
    merged = torch.empty_like(q)

    def flash_hi(hi_out):
        return fa_utils.flash_attn_varlen_func(
            q=q, k=k, v=v, out=hi_out, cu_seqlens_q=cu, max_seqlen_q=1, seqused_k=hi_lens,
            max_seqlen_k=ctx, softmax_scale=scale, causal=True, block_table=hi_t,
            return_softmax_lse=True, fa_version=fa_utils.get_flash_attn_version())[1]

    return lambda: decode(merged, q, k, v, lo_t, lo_lens, flash_hi, scale, 1.0, 1.0, splits,
                          layout)


def bytes_read(batch, ctx, head_dim, gqa, pages, lo_pages, hi_elem, layout,
               mid_share=0.0) -> int:
    hi_rows = (pages - lo_pages) * BLOCK
    mid_pages = round(lo_pages * mid_share)
    lo_bytes = (lo_pages - mid_pages) * layout.lo_page_bytes + (
        mid_pages * layout.mid.lo_page_bytes if mid_pages else 0)
    kv = batch * (hi_rows * KV_HEADS * 2 * head_dim * hi_elem + lo_bytes)
    qo = 2 * batch * KV_HEADS * gqa * head_dim * 2
    return kv + qo + batch * pages * 4


def run(args) -> list[dict]:
    hbm = hbm_copy_gbps()
    print(f"device-to-device copy: {hbm:.0f} GB/s")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    fa_utils = None
    if args.flash:
        from vllm.v1.attention.backends import fa_utils
    rows = []
    for head_dim, gqa, batch, ctx in itertools.product(args.head_dims, args.gqa, args.batches,
                                                       args.ctxs):
        if batch * ctx > MAX_TOKENS:
            continue
        scale = 1 / math.sqrt(head_dim)
        for fp8_hi in (False, True):
            splits = args.splits or ops.decode_num_splits(
                batch, KV_HEADS, gqa, num_sms, ops.decode_ctas_per_sm(head_dim, gqa, fp8_hi))
            layout = PageLayout(BLOCK, KV_HEADS, head_dim, 1 if fp8_hi else 2, 2, 64)
            cases = [(hi, 0.0, layout) for hi in args.hi_fractions]
            if not fp8_hi:
                # Tiers and exact key outliers go with bf16 hi pages (a 4-bit page does not
                # pack twice in an fp8 block; outliers are timed against the plain bf16 rows).
                lo = [hi for hi in args.hi_fractions if hi < 1.0]
                tiered = PageLayout(BLOCK, KV_HEADS, head_dim, 2, 2, 64, mid_bits=4)
                cases += [(hi, m, tiered) for hi in lo for m in args.mid_shares]
                if args.key_outliers:
                    cases += [(hi, 0.0, replace(layout, key_outliers=True)) for hi in lo]
            for hi, mid_share, lay in cases:
                variant = "_tiers" if mid_share else "_kout" if lay.key_outliers else ""
                lay_splits = splits if not variant or args.splits else ops.decode_num_splits(
                    batch, KV_HEADS, gqa, num_sms, ops.decode_ctas_per_sm(
                        head_dim, gqa, False, 4 if mid_share else 2, lay.outlier_slots))
                q, k, v, table, lens, lo_pages, pages = make_case(batch, ctx, head_dim, gqa, hi,
                                                                  fp8_hi, lay, mid_share)
                out = torch.empty_like(q)
                us = bench(lambda: ops.paged_decode(out, q, k, v, table, lens, scale, 1.0, 1.0,
                                                    lay_splits, lay))
                b = bytes_read(batch, ctx, head_dim, gqa, pages, lo_pages, layout.hi_elem_bytes,
                               lay, mid_share)
                rows.append(dict(kernel=f"mikv_{'fp8' if fp8_hi else 'bf16'}hi" + variant,
                                 batch=batch, ctx=ctx, hi_fraction=hi, mid_share=mid_share,
                                 head_dim=head_dim, gqa=gqa, us=us, bytes_read=b,
                                 gbps=b / us / 1e3, hbm_gbps=hbm,
                                 frac_of_hbm=b / us / 1e3 / hbm, splits=lay_splits))
                if variant:  # the tiered or outlier table's time only
                    print(json.dumps(rows[-1]))
                    continue
                if args.mass:  # a sampled layer also leaves per-page attention mass
                    lse = torch.empty(batch, q.shape[1], device="cuda")
                    mass = torch.zeros(k.shape[0], device="cuda")
                    slab_lse = torch.empty(k.shape[0], ops.slabs_per_block(BLOCK, head_dim),
                                           q.shape[1], device="cuda")

                    def with_mass():
                        ops.paged_decode(out, q, k, v, table, lens, scale, 1.0, 1.0, splits,
                                         layout, lse, slab_lse)
                        ops.page_mass(mass, slab_lse, table, lens, lse, BLOCK, KV_HEADS)
                    us_mass = bench(with_mass)
                    rows[-1]["us_with_slab_lse"] = bench(lambda: ops.paged_decode(
                        out, q, k, v, table, lens, scale, 1.0, 1.0, splits, layout, lse,
                        slab_lse))
                    gate = torch.zeros(1, dtype=torch.int32, device="cuda")  # unmeasured step
                    rows[-1]["us_with_slab_gate_off"] = bench(lambda: ops.paged_decode(
                        out, q, k, v, table, lens, scale, 1.0, 1.0, splits, layout, lse,
                        slab_lse, gate))
                    rows[-1]["us_with_page_mass"] = us_mass
                    rows[-1]["page_mass_overhead_layer"] = us_mass / us - 1
                    if args.flash:  # sampled_layers lives with vLLM's imports
                        rows[-1]["page_mass_overhead_step"] = step_overhead(us_mass / us - 1)
                if args.split and args.flash and not fp8_hi:  # the split_decode knob's path
                    us_split = bench(split_step(q, k, v, table, lens, scale, splits, layout,
                                                ctx, fa_utils))
                    rows.append(dict(rows[-1], kernel="mikv_split_bf16hi", us=us_split,
                                     gbps=b / us_split / 1e3, frac_of_hbm=b / us_split / 1e3 / hbm))
                    for f in [f for f in rows[-1] if f.startswith(("us_with", "page_mass"))]:
                        del rows[-1][f]
                if hi == 1.0 and args.flash:  # FlashAttention on the same all-hi cache
                    kf, vf = (k.view(torch.float8_e4m3fn), v.view(torch.float8_e4m3fn)) \
                        if fp8_hi else (k, v)
                    qf = q.to(torch.float8_e4m3fn) if fp8_hi else q
                    one = torch.ones(batch, KV_HEADS, device="cuda")
                    descale = dict(q_descale=one, k_descale=one, v_descale=one) if fp8_hi else {}
                    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
                    us = bench(lambda: fa_utils.flash_attn_varlen_func(
                        q=qf, k=kf, v=vf, out=out, cu_seqlens_q=cu, max_seqlen_q=1,
                        seqused_k=lens, max_seqlen_k=ctx, softmax_scale=scale, causal=True,
                        block_table=table, fa_version=fa_utils.get_flash_attn_version(),
                        **descale))
                    rows.append(dict(kernel=f"flash_attn_{'fp8' if fp8_hi else 'bf16'}",
                                     batch=batch, ctx=ctx, hi_fraction=1.0, head_dim=head_dim,
                                     gqa=gqa, us=us, bytes_read=b, gbps=b / us / 1e3,
                                     hbm_gbps=hbm, frac_of_hbm=b / us / 1e3 / hbm))
            print(json.dumps(rows[-1]))
        # after every shape, so a run cut short by the device's time limit still leaves rows
        json.dump(rows, open(os.path.join(args.out_dir, "kernel_decode.json"), "w"), indent=1)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fa = {(r["batch"], r["ctx"], r["gqa"]): r["us"] for r in rows
          if r["kernel"] == "flash_attn_bf16"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kernel, name, style in (("mikv_bf16hi", "mikv", "-"), ("mikv_split_bf16hi", "split", "--")):
        for i, hi in enumerate(sorted({r["hi_fraction"] for r in rows}, reverse=True)):
            pts = sorted((r["ctx"], fa[(r["batch"], r["ctx"], r["gqa"])] / r["us"]) for r in rows
                         if r["kernel"] == kernel and r["hi_fraction"] == hi
                         and r["batch"] == 16 and r["gqa"] == 4 and (16, r["ctx"], 4) in fa)
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=f"C{i}", label=f"{name}, {hi:.0%} hi")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens (batch 16, GQA 4, head_dim 128)")
    ax.set_ylabel("speedup vs FlashAttention bf16 decode")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128])
    p.add_argument("--ctxs", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 131072])
    p.add_argument("--hi-fractions", type=float, nargs="+", default=[1.0, 0.25, 0.1, 0.0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[128])
    p.add_argument("--gqa", type=int, nargs="+", default=[4, 8])
    p.add_argument("--mid-shares", type=float, nargs="*", default=[],
                   help="also time tables whose lo pages are this share 4-bit, the rest 2-bit")
    p.add_argument("--key-outliers", action="store_true",
                   help="also time lo pages that keep exact keys (the key_outliers knob)")
    p.add_argument("--no-mass", dest="mass", action="store_false",
                   help="skip timing the page-mass output")
    p.add_argument("--no-split", dest="split", action="store_false",
                   help="skip timing the split_decode path (bf16 hi only)")
    p.add_argument("--no-flash", dest="flash", action="store_false",
                   help="mikv rows only, without vLLM (a kernel A/B on a machine without it)")
    p.add_argument("--splits", type=int, default=0,
                   help="splits per sequence instead of ops.decode_num_splits' (a kernel A/B)")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    rows = run(args)
    json.dump(rows, open(os.path.join(args.out_dir, "kernel_decode.json"), "w"), indent=1)
    try:
        plot(rows, os.path.join(args.out_dir, "kernel_decode.png"))
    except ImportError as e:  # the GPU image may lack matplotlib: plot from the JSON later
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
