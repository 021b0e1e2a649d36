"""The scheduler side of mikv: a vLLM Scheduler subclass (selected through
`SchedulerConfig.scheduler_cls`) that demotes pages before vLLM has to preempt.

Each step, before vLLM's own scheduling: (1) pages over a request's `hi_budget` (or
`kv_budget`) go lo, (2) if the free blocks would not cover the running requests' next pages
plus a watermark, the coldest demotable pages go lo until they do; (3) with two lo tiers
(`lo_bits` [4, 2]) steps 1 and 2 move hi pages to 4-bit, and if that did not free enough, 4-bit
packs move on to 2-bit, least attention mass per block freed first. The moves ride to the
workers on the step's `SchedulerOutput` (mikv_vllm.integration.protocol), minus those of
requests vLLM preempted or finished in the same step (their packs are already back in the
pool).

Pages are ranked by the attention mass the workers measure (`mikv_vllm.importance`), which
arrives on the model runner's output as one number per physical block: the prompt's window
scores with the step that ends a prefill, then every few decode steps."""
from __future__ import annotations

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from mikv_vllm.config import MikvConfig
from mikv_vllm.demotion import Demotion, PageDemoter
from mikv_vllm.importance import request_page_mass
from mikv_vllm.integration import protocol
from mikv_vllm.layout import PageLayout
from mikv_vllm.policy import DemotionPolicy
from mikv_vllm.stats import PageStatsRecorder

logger = init_logger("vllm.mikv")


class MikvSchedulerMixin:
    """Adds page demotion to a vLLM scheduler class (see the module docstring)."""

    # Free blocks kept beyond the running requests' next pages, as a fraction of the pool,
    # so that admitting new requests does not stall on a pool demotion could refill.
    free_watermark = 0.02

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = MikvConfig.of(self.vllm_config)
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(f"mikv: expected one KV cache group, got {len(groups)}")
        self.layout = PageLayout.from_spec(groups[0].kv_cache_spec, **cfg.lo_format())
        self.mikv_policy = DemotionPolicy.from_config(cfg)
        # A page's bytes in each tier over a bf16 page's (what kv_budget counts).
        bf16 = self.layout.bf16_page_bytes
        mid = self.layout.mid
        self.page_costs = (self.layout.hi_page_bytes / bf16,
                           None if mid is None else mid.lo_page_bytes / bf16,
                           self.layout.lo_page_bytes / bf16)
        self.demoter = PageDemoter(self.kv_cache_manager, self.layout)
        self.page_stats = PageStatsRecorder(
            self.layout.hi_page_bytes, self.layout.lo_page_bytes, bf16,
            mid.lo_page_bytes if mid is not None else 0)
        # Decayed attention mass per physical block: the ranking of the hi page each block
        # holds. A block's entry is cleared when it leaves its last owner (finish, abort,
        # preemption, demotion), so a reused block starts cold; and again after the next
        # report, which under async scheduling may still carry the old page's mass.
        self.block_mass = torch.zeros(self.kv_cache_config.num_blocks)
        self._released: list[int] = []
        # Requests whose demotable hi pages were all shared, at (demotable, lo) page counts.
        self._nothing_movable: dict[str, tuple[int, int]] = {}
        # Per request, the first page that may still be hi: a lo page never turns hi again (a
        # preempted request starts over), so the scan for movable pages starts there.
        self._first_hi: dict[str, int] = {}
        # Two tiers: whether 4-bit packs had to move on to 2-bit last step (memory is short of
        # even all-4-bit; see plan_demotions).
        self._mid_saturated = False
        # at least one: a demotion opens its pack in a free block before it frees the source
        self.watermark_blocks = max(1, int(self.free_watermark * self.kv_cache_config.num_blocks))
        blocks, bs, n = self.kv_cache_config.num_blocks, self.layout.block_size, \
            self.layout.pack_factor
        logger.info("mikv: KV capacity %d blocks x %d tokens = %d tokens with every page hi, up "
                    "to %d with every demotable page lo (%d %d-bit lo pages per block%s)",
                    blocks, bs, blocks * bs, blocks * bs * n, n, self.layout.lo_bits,
                    "" if mid is None else
                    f"; {blocks * bs * mid.pack_factor} with every one {mid.lo_bits}-bit, "
                    f"{mid.pack_factor} per block")

    def _free_request_blocks(self, request) -> None:
        """vLLM's one path from a request's finish, abort or preemption to freeing its blocks
        (with KV connectors refused at startup, see integration/patches.py): its packs go back
        too, once its stats and page masses are settled."""
        rid = request.request_id
        held = self.demoter.manager.req_to_blocks.get(rid, ())
        lo = self.demoter.num_lo_pages(rid)
        pages = -(-request.num_computed_tokens // self.layout.block_size)
        self.page_stats.request_left(max(pages, lo), lo, self.demoter.num_mid_pages(rid))
        self._release_mass([b.block_id for b in held if b.ref_cnt == 1])
        super()._free_request_blocks(request)
        self.demoter.release(rid)
        self._nothing_movable.pop(rid, None)
        self._first_hi.pop(rid, None)

    def schedule(self, *args, **kwargs):
        moves, pressure_moves = self.plan_demotions()
        output = super().schedule(*args, **kwargs)
        gone = set(getattr(output, "preempted_req_ids", None) or ()) | set(
            output.finished_req_ids)
        protocol.put_demotions(output, [m for m in moves if m.req_id not in gone])
        self.page_stats.observe(self, output, self.demoter, len(moves), pressure_moves)
        return output

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:  # read by mikv_vllm.integration.metrics (field added by integration/patches.py)
            self.page_stats.count_pages(self, self.demoter)  # after this step's frees
            stats.mikv = self.page_stats.stats.as_dict()
        return stats

    def update_from_output(self, scheduler_output, model_runner_output):
        block_mass = protocol.get_block_mass(model_runner_output)
        if block_mass is not None:
            self.report_block_mass(block_mass)
        return super().update_from_output(scheduler_output, model_runner_output)

    def report_block_mass(self, block_mass) -> None:
        """Fold a worker report (mass per physical block) into the ranking: one decayed sum
        over the whole pool, whatever the number of running requests (this runs on the
        engine's critical path)."""
        self.block_mass = self.mikv_policy.accumulate(
            self.block_mass, torch.as_tensor(block_mass, dtype=torch.float32))
        self.block_mass[self._released] = 0.0
        self._released.clear()

    def _release_mass(self, block_ids: list[int]) -> None:
        self.block_mass[block_ids] = 0.0
        self._released += block_ids

    def plan_demotions(self) -> tuple[list[Demotion], int]:
        """This step's moves, and how many of them memory pressure asked for."""
        bs = self.layout.block_size
        # Past their prefill, with its output back: the report riding on it holds the prompt's
        # window scores (mikv_vllm.importance), so no page is ranked before they are in.
        decoding = [r for r in self.running
                    if r.num_computed_tokens >= r.num_prompt_tokens and r.num_output_tokens]
        moves: list[Demotion] = []
        if self.mikv_policy.hi_budget is not None:
            for r in decoding:  # 1. the per-request hi budget (ranked only when exceeded)
                excess = self.mikv_policy.budget_excess(r.num_computed_tokens, bs,
                                                        self.demoter.num_lo_pages(r.request_id))
                if excess:
                    moves += self._demote(r, *self._coldest(r, excess))
        if self.mikv_policy.kv_budget is not None:
            for r in decoding:  # 1'. the per-request byte budget
                moves += self._fit_kv_budget(r)
        # 2. memory pressure: room for this step's pages plus a watermark.
        pool = self.kv_cache_manager.block_pool
        short = self._blocks_wanted() + self.watermark_blocks - pool.get_num_free_blocks()
        n = (self.layout.mid or self.layout).pack_factor  # hi pages go to the first lo tier
        budget_moves = len(moves)
        # While 4-bit packs are moving on, a hi page no warmer than the next pack's pages (any,
        # once none is left) goes straight to 2-bit: it would follow them soon, and one
        # quantization from the original values is cheaper and more exact than two.
        direct_below = self.demoter.cheapest_mid_page_mass() if self._mid_saturated else None
        direct_moves = 0
        for r in sorted(decoding, key=lambda r: -r.num_computed_tokens):  # longest first
            if short <= 0:
                break
            if not self._has_hi_demotable(r):
                continue
            count = n * -(-short // (n - 1))  # whole packs: each frees n - 1 blocks
            pages, mass = self._coldest(r, count)
            if not pages:  # its hi demotable pages are all shared: skip it until that changes
                self._nothing_movable[r.request_id] = self._demotable_counts(r)
            if direct_below is not None and pages:
                done, pages, mass = self._demote_to_last(r, pages, mass, mass <= direct_below)
                short -= len(done) - -(-len(done) // self.layout.pack_factor)
                direct_moves += len(done)
                moves += done
            done = self._demote(r, pages, mass)
            short -= len(done) - -(-len(done) // n)
            moves += done
        moved_on = 0
        while self.demoter.tiered and short > 0:  # 3. 4-bit packs on to 2-bit, cheapest first
            before = pool.get_num_free_blocks() + self.demoter.pending_free
            done = self.demoter.move_on_cheapest()
            if not done:  # none left, or no block left to open a 2-bit pack in
                break
            short -= pool.get_num_free_blocks() + self.demoter.pending_free - before
            moves += done
            moved_on += len(done)
        self._mid_saturated = bool(moved_on or direct_moves)
        self.demoter.free_sources()  # only now: no pack of this step may be a source of it
        self._release_mass([m.src for m in moves if m.src >= 0])
        return moves, len(moves) - budget_moves

    def _fit_kv_budget(self, request) -> list[Demotion]:
        """The moves that bring one request within kv_budget: its coldest hi pages to the first
        lo tier, then (two tiers) its cheapest 4-bit packs on to 2-bit."""
        rid, bs = request.request_id, self.layout.block_size
        hi_excess, mid_excess = self.mikv_policy.kv_budget_excess(
            request.num_computed_tokens, bs, self.demoter.num_lo_pages(rid),
            self.demoter.num_mid_pages(rid), *self.page_costs)
        moves: list[Demotion] = []
        if hi_excess:
            pages, mass = self._coldest(request, hi_excess)
            if mid_excess and pages:
                # Pages the budget wants 2-bit and no warmer than the 4-bit pages that would
                # move on instead go there directly: one quantization from the original values
                # rather than two (hi -> 4 -> 2).
                cold = mass <= self.demoter.cheapest_mid_page_mass(rid)
                done, pages, mass = self._demote_to_last(
                    request, pages, mass, cold & (np.cumsum(cold) <= mid_excess))
                mid_excess -= len(done)
                moves += done
            moves += self._demote(request, pages, mass)
        for _, pages in self.demoter.mid_packs(rid) if mid_excess > 0 else ():
            if mid_excess <= 0:
                break
            done = self.demoter.demote_mid(rid, pages)
            if not done:
                break
            mid_excess -= len(done)
            moves += done
        return moves

    def _demote(self, request, pages: list[int], mass: np.ndarray,
                to_last: bool = False) -> list[Demotion]:
        """Demote hi `pages` of `request`, handing the demoter their mass (it ranks them in the
        middle tier, where nothing is measured)."""
        return self.demoter.demote(request.request_id, pages, mass.tolist(), to_last)

    def _demote_to_last(self, request, pages: list[int], mass: np.ndarray, chosen: np.ndarray
                        ) -> tuple[list[Demotion], list[int], np.ndarray]:
        """Demote the `chosen` (a mask) of hi `pages` straight to the last tier; returns those
        moves and the pages left, with their mass."""
        done = self._demote(request, [p for p, c in zip(pages, chosen) if c], mass[chosen],
                            to_last=True)
        return done, [p for p, c in zip(pages, chosen) if not c], mass[~chosen]

    def _blocks_wanted(self) -> int:
        """Blocks this step may allocate: each decode's next page, each prefill's next chunk,
        and what admitting the next waiting request takes (so that admission does not stall
        while cold pages could make room)."""
        bs, chunk = self.layout.block_size, self.max_num_scheduled_tokens
        want = 0
        for r in self.running:
            todo = r.num_prompt_tokens - r.num_computed_tokens
            want += -(-min(todo, chunk) // bs) if todo > 0 else int(r.num_computed_tokens % bs == 0)
        if self.waiting and len(self.running) < self.max_num_running_reqs:
            # vLLM admits a request only if its whole prompt fits (scheduler_reserve_full_isl,
            # on by default), plus its admission watermark.
            head = self.waiting.peek_request().num_tokens
            tokens = head if self.scheduler_reserve_full_isl else min(head, chunk)
            want += -(-tokens // bs) + self.kv_cache_manager.watermark_blocks
        return want

    def _demotable_counts(self, request) -> tuple[int, int]:
        """(pages in the policy's demotable range, lo pages): every lo page lies in that
        range, which only grows while the request runs."""
        bs = self.layout.block_size
        return (len(self.mikv_policy.demotable(request.num_computed_tokens, bs)),
                self.demoter.num_lo_pages(request.request_id))

    def _has_hi_demotable(self, request) -> bool:
        """Whether ranking the request can find a page to demote, decided without ranking it:
        its demotable range must hold a hi page, and it must not have been found all shared
        at the same counts. Ranking a request with nothing to move cost ~0.5 ms, and the
        pressure loop did it for all 64 requests of 64 x 32K on every step of the decode
        tail."""
        counts = self._demotable_counts(request)
        return counts[0] > counts[1] and self._nothing_movable.get(request.request_id) != counts

    def _movable(self, request) -> tuple[list[int], np.ndarray]:
        """The request's pages a demotion can take now, in page order, and their accumulated
        mass: in the policy's demotable range, hi (a lo page's entry is vLLM's null block) and
        held by this request alone (a prefix-cache block shared with another request would
        free nothing). Only those are ranked: under lasting pressure most of a long request's
        pages are lo already, and ranking all of them cost ~0.25 ms a request."""
        rid = request.request_id
        blocks = self.demoter.manager.req_to_blocks.get(rid, ())
        span = self.mikv_policy.demotable(request.num_computed_tokens, self.layout.block_size)
        start = max(span.start, self._first_hi.get(rid, 0))
        while start < span.stop and start < len(blocks) and blocks[start].is_null:
            start += 1
        self._first_hi[rid] = start
        pairs = [(p, b.block_id) for p, b in zip(range(start, span.stop),
                                                 blocks[start:span.stop])
                 if not b.is_null and b.ref_cnt == 1]
        if not pairs:
            return [], np.zeros(0, dtype=np.float32)
        pages, ids = zip(*pairs)
        return list(pages), request_page_mass(self.block_mass, list(ids)).numpy()

    def _coldest(self, request, count: int) -> tuple[list[int], np.ndarray]:
        """Up to `count` movable pages of the request, coldest first, and their mass."""
        pages, mass = self._movable(request)
        order = self.mikv_policy.coldest_of(mass, count)
        return [pages[i] for i in order], mass[order]


class MikvScheduler(MikvSchedulerMixin, Scheduler):
    pass


class MikvAsyncScheduler(MikvSchedulerMixin, AsyncScheduler):
    pass
