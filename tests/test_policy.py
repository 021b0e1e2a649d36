"""The demotion policy (mikv_vllm.policy): which pages may go to 2-bit, and which go first."""
from __future__ import annotations

import torch

from mikv_vllm.config import MikvConfig
from mikv_vllm.policy import DemotionPolicy


def test_sinks_recent_window_and_partial_page_stay_hi():
    p = DemotionPolicy(sink_pages=1, recent_pages=2)
    # 100 tokens in pages of 16: 6 full pages + 1 partial; recent = pages 5, 6.
    assert list(p.demotable(100, 16)) == [1, 2, 3, 4]
    # exactly full: 96 tokens = 6 pages, recent = 4, 5
    assert list(p.demotable(96, 16)) == [1, 2, 3]
    # short requests have nothing to demote
    assert list(p.demotable(40, 16)) == []
    assert list(DemotionPolicy(sink_pages=0, recent_pages=1).demotable(33, 16)) == [0, 1]


def test_coldest_pages_go_first_and_lo_pages_are_skipped():
    p = DemotionPolicy(sink_pages=1, recent_pages=1)
    mass = torch.tensor([9.0, 0.5, 0.1, 0.3, 0.1, 7.0])
    is_lo = torch.tensor([False, False, False, True, False, False])
    assert p.coldest(mass, is_lo, 96, 16, 2) == [2, 4]   # tie broken by age
    assert p.coldest(mass, is_lo, 96, 16, 10) == [2, 4, 1]
    assert p.coldest(mass, is_lo, 96, 16, 0) == []
    # pinned pages (shared prefix blocks) stay out of the ranking without counting as lo
    pinned = torch.tensor([False, False, True, False, False, False])
    assert p.coldest(mass, is_lo, 96, 16, 2, pinned) == [4, 1]
    budget = DemotionPolicy(sink_pages=1, recent_pages=1, hi_budget=0.5)
    assert budget.over_budget(mass, is_lo, 96, 16, pinned) == [4, 1]  # 5 hi, limit 3


def test_budget_limits_hi_pages_but_never_below_the_protected_ones():
    p = DemotionPolicy(sink_pages=1, recent_pages=2, hi_budget=0.5)
    mass = torch.tensor([5.0, 1, 3, 0.5, 2, 9, 9])
    is_lo = torch.zeros(7, dtype=torch.bool)
    assert p.hi_page_limit(100, 16) == 4
    assert p.over_budget(mass, is_lo, 100, 16) == [3, 1, 4]
    is_lo[[1, 3, 4]] = True
    assert p.over_budget(mass, is_lo, 100, 16) == []
    tiny = DemotionPolicy(sink_pages=1, recent_pages=2, hi_budget=0.01)
    assert tiny.hi_page_limit(100, 16) == 3           # sink + 2 recent
    assert DemotionPolicy().over_budget(mass, is_lo, 100, 16) == []  # no budget: no demotion


def test_tiers_go_to_4_bit_first_and_to_2_bit_only_where_4_bit_does_not_fit():
    p = DemotionPolicy(sink_pages=1, recent_pages=2)      # 100 tokens: 7 pages, 4 demotable
    hi, mid, lo = 1.0, 0.31, 0.18
    assert p.tier_limits(100, 16, 1.0, hi, mid, lo) == (7, 0)      # room for every page hi
    # 0.6 of 7 pages = 4.2; the 3 kept hi cost 3, 1.2 is left for 4 pages: not all-4-bit
    # (1.24), so 4-bit pages n with 0.31 n + 0.18 (4 - n) <= 1.2: n = 3
    assert p.tier_limits(100, 16, 0.6, hi, mid, lo) == (3, 3)
    # 0.8: 2.6 left; all 4 at 4-bit (1.24) leaves 1.36 for hi upgrades of 0.69: 1 more hi
    assert p.tier_limits(100, 16, 0.8, hi, mid, lo) == (4, 3)
    assert p.tier_limits(100, 16, 0.1, hi, mid, lo) == (3, 0)      # below the floor: all lo
    assert p.tier_limits(40, 16, 0.1, hi, mid, lo) == (3, 0)       # nothing demotable


def test_budget_excess_is_what_over_budget_demotes():
    p = DemotionPolicy(sink_pages=1, recent_pages=2, hi_budget=0.5)
    assert p.budget_excess(100, 16, lo_pages=0) == 3      # 7 pages, limit 4
    assert p.budget_excess(100, 16, lo_pages=3) == 0
    assert p.budget_excess(100, 16, lo_pages=5) == 0      # never negative
    assert DemotionPolicy().budget_excess(100, 16, lo_pages=0) == 0


def test_accumulated_mass_decays_and_grows_with_the_request():
    p = DemotionPolicy(decay=0.5)
    acc = p.accumulate(torch.zeros(0), torch.tensor([1.0, 0.0]))
    acc = p.accumulate(acc, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.allclose(acc, torch.tensor([0.5, 1.0, 2.0]))


def test_policy_from_config():
    p = DemotionPolicy.from_config(MikvConfig(sink_pages=2, recent_pages=3, hi_budget=0.2))
    assert (p.sink_pages, p.recent_pages, p.hi_budget) == (2, 3, 0.2)
