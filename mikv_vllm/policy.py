"""Which pages stay hi: the demotion policy as plain functions, shared by the scheduler and the
quality harness so that both describe the same product.

A request's pages are ranked by accumulated attention mass (H2O's heavy hitters, at page
granularity, decayed over steps). Sink pages, the recent window and the page still being
written are never demoted; of the rest, the coldest hi pages go first."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mikv_vllm.config import MikvConfig


@dataclass(frozen=True)
class DemotionPolicy:
    sink_pages: int = 1
    recent_pages: int = 4
    hi_budget: float | None = None
    decay: float = 0.95  # per decode step, applied to accumulated page mass
    kv_budget: float | None = None  # a share of bf16's bytes (met through `tier_limits`)

    @classmethod
    def from_config(cls, cfg: MikvConfig) -> "DemotionPolicy":
        return cls(sink_pages=cfg.sink_pages, recent_pages=cfg.recent_pages,
                   hi_budget=cfg.hi_budget, kv_budget=cfg.kv_budget)

    def demotable(self, num_tokens: int, block_size: int) -> range:
        """Page indices that may be demoted: full, past the sinks, before the recent window."""
        full_pages = num_tokens // block_size
        total_pages = -(-num_tokens // block_size)
        end = min(full_pages, total_pages - self.recent_pages)
        return range(self.sink_pages, max(self.sink_pages, end))

    def hi_page_limit(self, num_tokens: int, block_size: int) -> int | None:
        """Most hi pages the budget allows (never below the pages that must stay hi)."""
        if self.hi_budget is None:
            return None
        total_pages = -(-num_tokens // block_size)
        must_keep = total_pages - len(self.demotable(num_tokens, block_size))
        return max(must_keep, int(self.hi_budget * total_pages + 0.5))

    def coldest(self, mass: torch.Tensor, is_lo: torch.Tensor, num_tokens: int,
                block_size: int, count: int, pinned: torch.Tensor | None = None) -> list[int]:
        """Up to `count` demotable hi pages, lowest accumulated mass first (ties: older first).
        `pinned` pages (in vLLM: prefix-cache blocks shared with other requests) are hi but
        cannot move, so they take no place in the ranking."""
        pages = self.demotable(num_tokens, block_size)
        if count <= 0 or not pages:
            return []
        out = is_lo[pages.start:pages.stop]
        if pinned is not None:
            out = out | pinned[pages.start:pages.stop]
        candidates = torch.nonzero(~out).flatten()
        m = mass[pages.start:pages.stop].float()[candidates].numpy()
        order = torch.from_numpy(self.coldest_of(m, count))
        return (candidates[order] + pages.start).tolist()

    @staticmethod
    def coldest_of(mass: np.ndarray, count: int) -> np.ndarray:
        """Positions of the `count` lowest of `mass` (candidate pages in page order), coldest
        first; ties go to the older page."""
        if count <= 0:
            return np.zeros(0, dtype=np.int64)
        return np.argsort(mass, kind="stable")[:count]

    def tier_limits(self, num_tokens: int, block_size: int, byte_budget: float, hi: float,
                    mid: float | None, lo: float) -> tuple[int, int]:
        """(hi pages, mid-tier pages) a request may hold so that its bytes stay within
        `byte_budget` (a fraction of bf16's; `hi`, `mid`, `lo`: a page's cost in each tier, the
        same fraction): hi pages go to the middle tier (4-bit) first, and mid pages to lo
        (2-bit) only where all-mid would not fit. The pages that must stay hi count as hi;
        a budget below what they and all-lo cost leaves every other page lo. With `mid` None
        (one lo tier): (the hi pages that fit beside all-lo, 0)."""
        total = -(-num_tokens // block_size)
        free = len(self.demotable(num_tokens, block_size))
        room = byte_budget * total - (total - free) * hi      # bytes left for the demotable
        if mid is None:
            return total - free + max(0, min(free, int((room - free * lo) / (hi - lo)))), 0
        if room >= free * mid:
            extra = min(free, int((room - free * mid) / (hi - mid)))
            return total - free + extra, free - extra
        return total - free, max(0, min(free, int((room - free * lo) / (mid - lo))))

    def kv_budget_excess(self, num_tokens: int, block_size: int, lo_pages: int, mid_pages: int,
                         hi: float, mid: float | None, lo: float) -> tuple[int, int]:
        """(hi pages to demote, middle-tier pages to move on to the last tier) for a request with
        `lo_pages` lo pages (`mid_pages` of them in the middle tier) to fit `kv_budget`; page
        costs as in `tier_limits` (`mid` None: one lo tier). Counts only: cheap every step."""
        if self.kv_budget is None:
            return 0, 0
        hi_limit, mid_limit = self.tier_limits(num_tokens, block_size, self.kv_budget, hi, mid,
                                               lo)
        hi_excess = max(0, -(-num_tokens // block_size) - lo_pages - hi_limit)
        return hi_excess, max(0, mid_pages + hi_excess - mid_limit) if mid is not None else 0

    def budget_excess(self, num_tokens: int, block_size: int, lo_pages: int) -> int:
        """How many hi pages a request with `lo_pages` lo pages holds beyond `hi_budget` (0
        without a budget). Cheap: the scheduler asks it every step before ranking anything."""
        limit = self.hi_page_limit(num_tokens, block_size)
        if limit is None:
            return 0
        return max(0, -(-num_tokens // block_size) - lo_pages - limit)

    def over_budget(self, mass: torch.Tensor, is_lo: torch.Tensor, num_tokens: int,
                    block_size: int, pinned: torch.Tensor | None = None) -> list[int]:
        """Pages to demote now so the request's hi pages fit `hi_budget` (as far as pages not
        `pinned` allow)."""
        total_pages = -(-num_tokens // block_size)
        excess = self.budget_excess(num_tokens, block_size, int(is_lo[:total_pages].sum()))
        return self.coldest(mass, is_lo, num_tokens, block_size, excess, pinned)

    def accumulate(self, acc: torch.Tensor, step_mass: torch.Tensor) -> torch.Tensor:
        """Decayed accumulated mass after one step (grows with the request's page count)."""
        if acc.numel() < step_mass.numel():
            acc = torch.cat([acc, acc.new_zeros(step_mass.numel() - acc.numel())])
        return acc * self.decay + step_mass
