"""PageDemoter on a real vLLM 0.26 KVCacheManager: blocks move to packs, nothing leaks."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from vllm import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.request import Request

from conftest import one_layer_kv_cache_config
from mikv_vllm.demotion import PageDemoter
from mikv_vllm.layout import MID_TIER, PageLayout, decode_entry
from mikv_vllm.policy import DemotionPolicy

BLOCK = 16
LAYOUT = PageLayout(block_size=BLOCK, num_kv_heads=2, head_size=128, hi_elem_bytes=2)
TIERED = dataclasses.replace(LAYOUT, mid_bits=4)  # 3 four-bit or 5 two-bit pages per block


def make_manager(num_blocks: int = 200, caching: bool = True) -> KVCacheManager:
    config = one_layer_kv_cache_config(num_blocks, BLOCK, num_kv_heads=2, head_size=128)
    return KVCacheManager(config, max_model_len=8192, scheduler_block_size=BLOCK,
                          hash_block_size=BLOCK, enable_caching=caching)


init_none_hash(sha256)
HASHER = get_request_block_hasher(BLOCK, sha256)


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=10_000), None, block_hasher=HASHER)


def prefill(mgr: KVCacheManager, req: Request) -> None:
    computed, num_computed = mgr.get_computed_blocks(req)[:2]
    n = req.num_tokens - num_computed
    assert mgr.allocate_slots(req, n, num_computed, computed) is not None
    req.num_computed_tokens = req.num_tokens


def decode_step(mgr: KVCacheManager, req: Request) -> bool:
    req.append_output_token_ids(7)
    if mgr.allocate_slots(req, 1) is None:
        return False
    req.num_computed_tokens += 1
    return True


def test_demoting_n_pages_frees_n_minus_one_blocks():
    mgr = make_manager()
    demoter = PageDemoter(mgr, LAYOUT)
    n = demoter.pack_factor
    req = make_request("a", list(range(BLOCK * 12)))
    prefill(mgr, req)
    free_before = mgr.block_pool.get_num_free_blocks()
    old = [b.block_id for b in mgr.coordinator.single_type_managers[0].req_to_blocks["a"]]
    moves = demoter.demote("a", list(range(1, 1 + n)))
    assert len(moves) == n
    assert mgr.block_pool.get_num_free_blocks() == free_before - 1   # the pack; sources wait
    assert demoter.free_sources() == n
    assert mgr.block_pool.get_num_free_blocks() == free_before + n - 1
    packs = {decode_entry(-(1 + m.dst_code), n)[0] for m in moves}
    assert len(packs) == 1 and packs.isdisjoint(old)
    assert [m.src for m in moves] == old[1:1 + n]
    blocks = mgr.coordinator.single_type_managers[0].req_to_blocks["a"]
    assert all(blocks[p].is_null for p in range(1, 1 + n))
    # demoting again is a no-op; the request keeps decoding into new hi blocks
    assert demoter.demote("a", [1, 2]) == []
    for _ in range(40):
        assert decode_step(mgr, req)
    mgr.free(req)
    demoter.release("a")
    assert mgr.block_pool.get_num_free_blocks() == 200 - 1


def test_shared_prefix_blocks_are_not_demoted_and_hashes_leave_the_cache():
    mgr = make_manager()
    demoter = PageDemoter(mgr, LAYOUT)
    prompt = list(range(BLOCK * 8))
    a, b = make_request("a", prompt), make_request("b", prompt + [1, 2, 3])
    prefill(mgr, a)
    prefill(mgr, b)   # hits a's 8 cached blocks
    assert demoter.demote("b", [1, 2, 3]) == []
    mgr.free(a)
    moves = demoter.demote("b", [1, 2, 3])
    assert len(moves) == 3
    demoter.free_sources()
    c = make_request("c", prompt)
    hit_blocks, num_hit = mgr.get_computed_blocks(c)[:2]
    assert num_hit == BLOCK  # only the first page is still a prefix hit


def test_pool_is_short_of_packs():
    mgr = make_manager(num_blocks=14)
    demoter = PageDemoter(mgr, LAYOUT)
    req = make_request("a", list(range(BLOCK * 13)))
    prefill(mgr, req)
    assert mgr.block_pool.get_num_free_blocks() == 0
    assert demoter.demote("a", list(range(1, 12))) == []  # no block for a first pack


def test_tiers_move_pages_to_4_bit_then_pack_by_pack_to_2_bit():
    mgr = make_manager()
    demoter = PageDemoter(mgr, TIERED)
    prefill(mgr, make_request("a", list(range(BLOCK * 12))))
    free_before = mgr.block_pool.get_num_free_blocks()
    pages = list(range(1, 7))
    moves = demoter.demote("a", pages, mass=[0.5, 0.1, 0.1, 0.0, 0.0, 0.2])
    assert [m.page for m in moves] == pages and all(m.dst_code & MID_TIER for m in moves)
    assert demoter.free_sources() == 6
    assert mgr.block_pool.get_num_free_blocks() == free_before + 6 - 2  # two 4-bit packs
    assert demoter.num_mid_pages("a") == demoter.num_lo_pages("a") == 6
    assert demoter.num_pack_blocks(mid=True) == 2 and demoter.num_pack_blocks(mid=False) == 0
    # the pack of pages 4-6 (mass 0.2) moves on before that of pages 1-3 (mass 0.7)
    assert [pages for _, pages in demoter.mid_packs("a")] == [[4, 5, 6], [1, 2, 3]]
    mid_codes = {m.page: m.dst_code for m in moves}
    on = demoter.demote_mid("a", [4, 5, 6])
    assert [m.src for m in on] == [-1 - mid_codes[p] for p in (4, 5, 6)]
    assert not any(m.dst_code & MID_TIER for m in on)
    assert demoter.free_sources() == 1  # the emptied 4-bit pack
    assert mgr.block_pool.get_num_free_blocks() == free_before + 6 - 2  # one 2-bit pack taken
    assert demoter.num_mid_pages("a") == 3 and demoter.num_lo_pages("a") == 6
    assert demoter.num_pack_blocks(mid=True) == 1 and demoter.num_pack_blocks(mid=False) == 1
    # a later page opens a new 4-bit pack (slot 0) rather than the emptied one's slots
    later = demoter.demote("a", [7])
    assert TIERED.locate(-1 - later[0].dst_code)[1] == 0
    assert demoter.num_pack_blocks(mid=True) == 2
    assert demoter.demote_mid("a", [7]) == []  # a page moves once per step
    assert all(7 not in pages for _, pages in demoter.mid_packs("a"))
    demoter.free_sources()
    demoter.release("a")
    assert demoter.num_pack_blocks() == 0


@pytest.mark.parametrize("layout", [LAYOUT, TIERED], ids=["one tier", "two tiers"])
def test_random_workload_never_leaks(layout):
    rng = random.Random(0)
    mgr = make_manager(num_blocks=300)
    demoter = PageDemoter(mgr, layout)
    policy = DemotionPolicy(sink_pages=1, recent_pages=2, hi_budget=0.3)
    running: dict[str, Request] = {}
    mass: dict[str, torch.Tensor] = {}
    next_id = 0
    for step in range(400):
        if len(running) < 6 and rng.random() < 0.3:
            rid = f"r{next_id}"
            next_id += 1
            req = make_request(rid, [rng.randrange(50) for _ in range(rng.randrange(20, 300))])
            if mgr.block_pool.get_num_free_blocks() > 25:
                prefill(mgr, req)
                running[rid] = req
                mass[rid] = torch.zeros(0)
        for rid, req in list(running.items()):
            if rng.random() < 0.03 or not decode_step(mgr, req):   # finish/abort/preempt
                mgr.free(req)
                demoter.release(rid)
                del running[rid], mass[rid]
                continue
            pages = -(-req.num_computed_tokens // BLOCK)
            mass[rid] = policy.accumulate(mass[rid], torch.rand(pages))
            is_lo = torch.tensor([demoter.is_lo(rid, p) for p in range(pages)])
            demoter.demote(rid, policy.over_budget(mass[rid], is_lo, req.num_computed_tokens,
                                                   BLOCK))
            if demoter.tiered and rng.random() < 0.2 and demoter.mid_packs(rid):
                demoter.demote_mid(rid, demoter.mid_packs(rid)[0][1])
        demoter.free_sources()
        # Every block is free, held by a running request, or a pack: none lost, none twice.
        tables = mgr.coordinator.single_type_managers[0].req_to_blocks
        held = {b.block_id for r in running for b in tables[r] if not b.is_null}
        packs = {b.block_id for s in demoter.requests.values()
                 for b in s.lo.packs + s.mid.packs}
        assert sum(len(s.lo.packs) + len(s.mid.packs)
                   for s in demoter.requests.values()) == len(packs)
        assert held.isdisjoint(packs)
        assert mgr.block_pool.get_num_free_blocks() + len(held) + len(packs) == 300 - 1
        # the running totals the stats read agree with the requests' own books
        states = demoter.requests.values()
        assert demoter.num_pack_blocks() == len(packs)
        assert demoter.num_pack_blocks(True) == sum(len(s.mid.packs) for s in states)
        assert demoter.num_lo_pages() == sum(len(s.lo_pages) for s in states)
        assert demoter.num_mid_pages() == sum(len(s.mid_mass) for s in states)
    assert demoter.total_demoted > 100
    for rid, req in running.items():
        mgr.free(req)
        demoter.release(rid)
    assert demoter.num_pack_blocks() == demoter.num_lo_pages() == demoter.num_mid_pages() == 0
    assert mgr.block_pool.get_num_free_blocks() == 300 - 1


def test_needs_a_useful_pack_factor():
    with pytest.raises(ValueError, match="frees nothing"):
        PageDemoter(make_manager(), PageLayout(16, 1, 64, hi_elem_bytes=1, lo_bits=4,
                                               value_group_size=64))


def test_no_block_is_a_source_and_a_pack_of_one_step():
    """The workers quantize a step's moves in one launch: a block freed by one request's
    demotion must not become another request's pack in the same step (vLLM's pool hands freed,
    unhashed blocks out first)."""
    mgr = make_manager(num_blocks=60)
    demoter = PageDemoter(mgr, LAYOUT)
    n = demoter.pack_factor
    for rid in ("a", "b"):
        prefill(mgr, make_request(rid, list(range(BLOCK * 12)) if rid == "a" else
                                  list(range(1000, 1000 + BLOCK * 12))))
    moves = demoter.demote("a", list(range(1, 1 + n))) + demoter.demote("b", list(range(1, 1 + n)))
    demoter.free_sources()
    assert {m.src for m in moves}.isdisjoint({m.dst_code // n for m in moves})
