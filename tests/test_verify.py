"""The MIKV_VERIFY_DEMOTIONS aid (mikv_vllm.verify) on a CPU cache laid out as the mikv backend
allocates it: it finds a pack slot where the worker writes it, accepts a correct round trip and
reports a slot or a table entry that changed afterwards."""
from __future__ import annotations

import types

import pytest
import torch

from mikv_vllm.integration.attention.backend import MikvAttentionBackend
from mikv_vllm.layout import split_kv_cache
from mikv_vllm.demotion import Demotion
from mikv_vllm.layout import PageLayout
from mikv_vllm import reference
from mikv_vllm import verify
from mikv_vllm.verify import DemotionVerifier


class Lines:
    """Stands in for vLLM's logger (which does not propagate to pytest's caplog)."""

    def __init__(self):
        self.text = ""

    def _log(self, msg, *args):
        self.text += (msg % args) + "\n"

    info = warning = _log


def backend_cache(fp8: bool, num_blocks=12, block=16, heads=3, d=64):
    shape = MikvAttentionBackend.get_kv_cache_shape(num_blocks, block, heads, d)
    order = MikvAttentionBackend.get_kv_cache_stride_order()
    physical = torch.randn([shape[i] for i in order])
    # vLLM keeps fp8 caches as uint8
    physical = physical.to(torch.float8_e4m3fn).view(torch.uint8) if fp8 else \
        physical.to(torch.bfloat16)
    inverse = [order.index(i) for i in range(len(order))]
    return types.SimpleNamespace(kv_cache=physical.permute(*inverse), head_size=d,
                                 _k_scale_float=1.0, _v_scale_float=1.0)


def layout_of(key_cache, mid_bits=None, key_outliers=False) -> PageLayout:
    """The layout of a cache, read off its key view [blocks, block_size, kv_heads, D]."""
    _, block_size, heads, head_size = key_cache.shape
    return PageLayout(block_size, heads, head_size, key_cache.element_size(), 2, 64, mid_bits,
                      key_outliers)


def demote_on_cpu(layer, layout, src: int, dst_code: int) -> None:
    """What quantize_pages does on the GPU, with the torch reference."""
    k, v = split_kv_cache(layer.kv_cache, layer.head_size)
    raw = torch.empty(0, dtype=torch.uint8).set_(k.untyped_storage()).view(k.shape[0], -1)
    reference.quantize_pages(raw, k, v, torch.tensor([src]), torch.tensor([dst_code]), layout)


@pytest.mark.parametrize("fp8", [False, True])
def test_verifier_accepts_round_trips_and_reports_changes(monkeypatch, fp8):
    log = Lines()
    monkeypatch.setattr(verify, "logger", log)
    layer = backend_cache(fp8)
    key_cache, _ = split_kv_cache(layer.kv_cache, layer.head_size)
    layout = layout_of(key_cache)
    moves = [Demotion("a", 1, 3, 9 * layout.pack_factor + 1),
             Demotion("a", 2, 4, 9 * layout.pack_factor + 2)]
    table = torch.zeros(2, 8, dtype=torch.int32)
    v = DemotionVerifier()
    v.save_sources(layer, layout, moves)
    for m in moves:
        demote_on_cpu(layer, layout, m.src, m.dst_code)
        table[0, m.page] = -(1 + m.dst_code)
    v.check_moves(layer, layout, moves, {"a": 0})
    v.check_live(layer, layout, table, gone=set())
    assert "worst error" in log.text and "changed" not in log.text
    assert float(log.text.split("K ")[1].split(",")[0]) <= 1.0
    table[0, 2] = 4                                       # the entry went back to a hi block
    v.check_live(layer, layout, table, gone=set())
    assert "1 of 2 demoted pages changed" in log.text
    v.check_live(layer, layout, table, gone={"a"})        # finished or preempted: forgotten
    assert not v.live


@pytest.mark.parametrize("key_outliers", [False, True])
@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (1e-3, 150.0), (1e-5, 0.0)])
def test_verifier_holds_each_group_to_its_own_bound(monkeypatch, scale, offset, key_outliers):
    """Keys with a channel far from zero relative to its spread (Qwen2's biased k_proj) get a
    coarser step by design; tiny activations sit on fp16's smallest step. Neither is a broken
    demotion: the check measures error against what the format allows each group (pages with
    exact key outliers too: their grids span less, their outliers are exact)."""
    log = Lines()
    monkeypatch.setattr(verify, "logger", log)
    layer = backend_cache(False, heads=2)
    key_cache, value_cache = split_kv_cache(layer.kv_cache, layer.head_size)
    key_cache.mul_(scale)
    key_cache[..., 0, 5] += offset
    value_cache.mul_(scale)
    layout = layout_of(key_cache, key_outliers=key_outliers)
    moves = [Demotion("a", 1, 3, 9 * layout.pack_factor + 1)]
    v = DemotionVerifier()
    v.save_sources(layer, layout, moves)
    demote_on_cpu(layer, layout, 3, moves[0].dst_code)
    v.check_moves(layer, layout, moves, {"a": 0})
    k_ratio = float(log.text.split("K ")[1].split(",")[0])
    assert "worst error" in log.text and 0.0 < k_ratio <= 1.0
    raw = torch.empty(0, dtype=torch.uint8).set_(key_cache.untyped_storage())
    start = moves[0].dst_code // layout.pack_factor * key_cache.stride(0) * 2 + \
        moves[0].dst_code % layout.pack_factor * layout.lo_page_bytes
    raw[start:start + 4] ^= 0xFF                           # flipped codes are still caught
    log.text = ""
    v.check_moves(layer, layout, moves, {"a": 0})
    assert float(log.text.split("K ")[1].split(",")[0]) > 1.0


@pytest.mark.parametrize("key_outliers", [False, True])
def test_verifier_follows_pages_through_both_tiers(monkeypatch, key_outliers):
    """Hi -> 4-bit, then 4-bit -> 2-bit (requantized from the 4-bit codes): each move is held
    to its own tier's bound and found in its own tier's slot."""
    log = Lines()
    monkeypatch.setattr(verify, "logger", log)
    layer = backend_cache(False, heads=2)
    key_cache, _ = split_kv_cache(layer.kv_cache, layer.head_size)
    layout = layout_of(key_cache, mid_bits=4, key_outliers=key_outliers)
    v = DemotionVerifier()
    table = torch.zeros(1, 8, dtype=torch.int32)
    for moves in ([Demotion("a", 1, 3, layout.lo_code(9, 1, mid=True))],
                  [Demotion("a", 1, -1 - layout.lo_code(9, 1, mid=True), layout.lo_code(10, 0))]):
        log.text = ""
        v.save_sources(layer, layout, moves)
        demote_on_cpu(layer, layout, moves[0].src, moves[0].dst_code)
        table[0, 1] = -1 - moves[0].dst_code
        v.check_moves(layer, layout, moves, {"a": 0})
        v.check_live(layer, layout, table, gone=set())
        assert "worst error" in log.text and "changed" not in log.text
        assert float(log.text.split("K ")[1].split(",")[0]) <= 1.0
