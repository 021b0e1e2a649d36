"""Demote, don't evict: move cold pages of running requests into 2-bit packs inside vLLM's own
block pool (scheduler side), or by degrees: into 4-bit packs first, and from there on to 2-bit.

A pack is one ordinary vLLM block holding N lo pages of one tier (N = the tier's
`pack_factor`). Demoting N pages takes one pack block and gives N hi blocks back: N - 1 blocks
net. The page's entry in the request's block list becomes vLLM's null block (as the
sliding-window manager does for blocks it drops), and the move (source block -> pack slot) is
handed to the workers, which quantize all of a step's moves in one launch before the step's
forward. So no block may be a source and a pack of the same step: sources are freed only once
the step's demotions are all planned (`free_sources`), after every pack of the step was taken
(vLLM's pool hands a freed, unhashed block out first). A freed source can then only be
rewritten by cache writes of a later forward, so the order holds under async scheduling too.
Packs belong to their request and go back to the pool when it finishes, is aborted or
preempted. A middle-tier page that moves on leaves a hole in its pack; the pack goes back to
the pool (with the step's sources) once all its pages have left, which is why middle-tier
pages move on pack by pack, and a pack that took pages this step waits for the next."""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from mikv_vllm.layout import PageLayout


@dataclass(frozen=True)
class Demotion:
    """One page move for the workers: the page's table entry `src` (a hi block id, or a
    middle-tier entry < 0 that moves on to the last tier) -> lo slot `dst_code`."""
    req_id: str
    page: int
    src: int
    dst_code: int  # PageLayout.lo_code; the block-table entry becomes -(1 + dst_code)


@dataclass
class TierPacks:
    """A request's packs of one tier."""
    packs: list = field(default_factory=list)  # KVCacheBlocks owned as packs, in order
    used_slots: int = 0                        # slots used in the last pack
    # Middle tier only: pack block id -> its pages there now, and their summed mass (what
    # ranks the pack's move on to the last tier).
    pages: dict[int, list[int]] = field(default_factory=dict)
    mass: dict[int, float] = field(default_factory=dict)
    version: dict[int, int] = field(default_factory=dict)  # pack -> changes (stale rankings)


@dataclass
class RequestPacks:
    lo: TierPacks = field(default_factory=TierPacks)
    mid: TierPacks = field(default_factory=TierPacks)
    lo_pages: dict[int, int] = field(default_factory=dict)  # page -> dst_code, either tier
    # Middle-tier page -> its accumulated mass when it left hi: lo pages are not measured,
    # so this ranks the page's move on to the last tier.
    mid_mass: dict[int, float] = field(default_factory=dict)


class PageDemoter:
    """Owns the lo-page bookkeeping of every running request for one KV cache group."""

    def __init__(self, kv_cache_manager, layout: PageLayout, group: int = 0):
        coordinator = kv_cache_manager.coordinator
        self.manager = coordinator.single_type_managers[group]
        self.block_pool = kv_cache_manager.block_pool
        self.layout = layout
        tier = layout.unpackable()
        if tier is not None:
            raise ValueError(f"mikv: a lo page of {tier.lo_page_bytes} B frees nothing in a "
                             f"{tier.hi_page_bytes} B block")
        self.pack_factor = layout.pack_factor
        self.tiered = layout.mid is not None
        self.requests: dict[str, RequestPacks] = {}
        self.total_demoted = 0
        self._sources: list = []  # this step's freed blocks (hi sources, emptied packs)
        # Middle-tier packs, cheapest first to move on (cost, first page, request, pack block,
        # version): entries go stale when the pack changes and are skipped then.
        self._ranking: list[tuple[float, int, str, int, int]] = []
        # (request, pack) that took pages this step: their slots are written by this step's
        # launch, so they move on next step at the earliest (deferred: their entries).
        self._fresh: set[tuple[str, int]] = set()
        self._deferred: list[tuple[float, int, str, int, int]] = []
        self._compact_at = 1024
        self._versions = 0  # every pack change gets a new number (no stale entry matches it)
        # Totals over every request, kept as pages and packs come and go: the stats read them
        # twice a step, and summing over thousands of requests' packs took ~0.5 ms each time.
        self._lo_total = 0
        self._mid_total = 0
        self._pack_totals = {False: 0, True: 0}  # by tier: middle (True) or last

    def is_lo(self, req_id: str, page: int) -> bool:
        state = self.requests.get(req_id)
        return state is not None and page in state.lo_pages

    def num_lo_pages(self, req_id: str | None = None) -> int:
        """Lo pages (either tier) of one request, or of all."""
        if req_id is None:
            return self._lo_total
        state = self.requests.get(req_id)
        return len(state.lo_pages) if state is not None else 0

    def num_mid_pages(self, req_id: str | None = None) -> int:
        """Middle-tier pages of one request, or of all."""
        if req_id is None:
            return self._mid_total
        state = self.requests.get(req_id)
        return len(state.mid_mass) if state is not None else 0

    def num_pack_blocks(self, mid: bool | None = None) -> int:
        """Pack blocks of one tier (`mid`), or of both, over every request."""
        return (self._pack_totals[False] + self._pack_totals[True] if mid is None
                else self._pack_totals[mid])

    def demotable(self, req_id: str, pages: list[int]) -> list[int]:
        """The pages among `pages` whose block can move: hi, held by this request alone."""
        blocks = self.manager.req_to_blocks.get(req_id, [])
        out = []
        for p in pages:
            if p >= len(blocks) or self.is_lo(req_id, p):
                continue
            block = blocks[p]
            if block.is_null or block.ref_cnt != 1:  # shared prefix blocks free nothing
                continue
            out.append(p)
        return out

    def demote(self, req_id: str, pages: list[int], mass: list[float] | None = None,
               to_last: bool = False) -> list[Demotion]:
        """Move hi `pages` of `req_id` to the first lo tier (the middle one where there are
        two, unless `to_last`; `mass`: each page's accumulated mass, kept to rank it there);
        returns the moves for the workers."""
        keep = dict(zip(pages, mass)) if mass is not None else {}
        pages = self.demotable(req_id, pages)
        state = self.requests.setdefault(req_id, RequestPacks())
        mid = self.tiered and not to_last
        slots = self._take_slots(state, mid, len(pages))
        blocks = self.manager.req_to_blocks[req_id]
        moves = []
        for p, (pack, code) in zip(pages, slots):
            state.lo_pages[p] = code
            if mid:
                m = state.mid_mass[p] = float(keep.get(p, 0.0))
                state.mid.pages.setdefault(pack, []).append(p)
                state.mid.mass[pack] = state.mid.mass.get(pack, 0.0) + m
                self._fresh.add((req_id, pack))
            moves.append(Demotion(req_id, p, blocks[p].block_id, code))
            self._sources.append(blocks[p])
            blocks[p] = self.block_pool.null_block
        for pack in {pack for pack, _ in slots} if mid else ():
            self._rank(req_id, state.mid, pack)
        self._lo_total += len(moves)
        self._mid_total += len(moves) if mid else 0
        self.total_demoted += len(moves)
        return moves

    def mid_packs(self, req_id: str) -> list[tuple[float, list[int]]]:
        """The request's middle-tier packs as (cost, pages), in the order they should move on
        (`_cost`); packs that took pages this step stay."""
        state = self.requests.get(req_id)
        if state is None:
            return []
        tier = state.mid
        return sorted(((self._cost(tier, b), list(v)) for b, v in tier.pages.items()
                       if (req_id, b) not in self._fresh), key=lambda c: (c[0], c[1][0]))

    def cheapest_mid_page_mass(self, req_id: str | None = None) -> float:
        """The mean mass of a page of the middle-tier pack that would move on next, of any
        request or of `req_id`'s (inf: no such pack): a hi page no warmer than this gains
        nothing from a stay in the middle tier while packs are moving on."""
        if req_id is not None:
            packs = self.mid_packs(req_id)
            if not packs:
                return float("inf")
            pages, masses = packs[0][1], self.requests[req_id].mid_mass
            return sum(masses[p] for p in pages) / len(pages)
        while self._ranking:
            _, _, req_id, pack, version = self._ranking[0]
            state = self.requests.get(req_id)
            if state is not None and state.mid.version.get(pack) == version:
                return state.mid.mass[pack] / len(state.mid.pages[pack])
            heapq.heappop(self._ranking)
        return float("inf")

    def move_on_cheapest(self) -> list[Demotion]:
        """Move the cheapest middle-tier pack of any request on to the last tier; [] when none
        can move (none left, or no block for a 2-bit pack)."""
        while self._ranking:
            entry = heapq.heappop(self._ranking)
            _, _, req_id, pack, version = entry
            state = self.requests.get(req_id)
            if state is None or state.mid.version.get(pack) != version:
                continue  # stale: the request left, or the pack changed since
            if (req_id, pack) in self._fresh:
                self._deferred.append(entry)
                continue
            moves = self.demote_mid(req_id, list(state.mid.pages[pack]))
            if not moves:
                heapq.heappush(self._ranking, entry)
            return moves
        return []

    def demote_mid(self, req_id: str, pages: list[int]) -> list[Demotion]:
        """Move middle-tier `pages` on to the last tier (the workers requantize them from their
        4-bit codes). A pack whose pages have all left goes back to the pool with this step's
        sources. Pages of packs that took pages this step stay."""
        state = self.requests.get(req_id)
        if state is None:
            return []
        pack_of = {p: self.layout.locate(-1 - state.lo_pages[p])[0]
                   for p in pages if p in state.mid_mass}
        pages = [p for p, b in pack_of.items() if (req_id, b) not in self._fresh]
        slots = self._take_slots(state, False, len(pages))
        moves = []
        for p, (_, code) in zip(pages, slots):
            old, pack = state.lo_pages[p], pack_of[p]
            state.mid.pages[pack].remove(p)
            state.mid.mass[pack] -= state.mid_mass.pop(p)
            state.lo_pages[p] = code
            moves.append(Demotion(req_id, p, -1 - old, code))
        for pack in {pack_of[m.page] for m in moves}:
            if state.mid.pages[pack]:
                self._rank(req_id, state.mid, pack)
            else:
                self._free_pack(state.mid, pack)
        self._mid_total -= len(moves)
        self.total_demoted += len(moves)
        return moves

    def _cost(self, tier: TierPacks, pack: int) -> float:
        """What moving a middle-tier pack on costs per block it frees: its pages' mass, over the
        share of a block that they do not take again as 2-bit pages."""
        return tier.mass[pack] / (1 - len(tier.pages[pack]) / self.pack_factor)

    def _rank(self, req_id: str, tier: TierPacks, pack: int) -> None:
        """(Re)enter a changed middle-tier pack in the ranking."""
        self._versions += 1
        version = tier.version[pack] = self._versions
        heapq.heappush(self._ranking, (self._cost(tier, pack), min(tier.pages[pack]), req_id,
                                       pack, version))
        if len(self._ranking) > self._compact_at:  # drop the stale entries
            self._ranking = [e for e in self._ranking if (s := self.requests.get(e[2]))
                             is not None and s.mid.version.get(e[3]) == e[4]]
            heapq.heapify(self._ranking)
            self._compact_at = 2 * len(self._ranking) + 1024

    def _take_slots(self, state: RequestPacks, mid: bool, count: int) -> list[tuple[int, int]]:
        """Up to `count` fresh (pack block, code) slots of one tier for a request (fewer where
        the pool runs out of blocks for packs)."""
        tier = state.mid if mid else state.lo
        n = self.layout.tier(mid).pack_factor
        open_slots = n - tier.used_slots if tier.packs else 0
        need = max(0, -(-(count - open_slots) // n))
        need = min(need, self.block_pool.get_num_free_blocks())
        count = min(count, open_slots + need * n)
        new_packs = self.block_pool.get_new_blocks(need) if need else []
        self._pack_totals[mid] += len(new_packs)
        slots = []
        for _ in range(count):
            if not tier.packs or tier.used_slots == n:
                tier.packs.append(new_packs.pop(0))
                tier.used_slots = 0
            block = tier.packs[-1].block_id
            slots.append((block, self.layout.lo_code(block, tier.used_slots, mid)))
            tier.used_slots += 1
        return slots

    def _free_pack(self, tier: TierPacks, block_id: int) -> None:
        """A middle-tier pack all of whose pages left: freed with the step's sources (a new
        pack is opened for the next page, never the rest of an emptied one)."""
        del tier.pages[block_id], tier.mass[block_id], tier.version[block_id]
        i = next(i for i, b in enumerate(tier.packs) if b.block_id == block_id)
        if i == len(tier.packs) - 1:
            tier.used_slots = self.layout.mid.pack_factor  # no open slots
        self._sources.append(tier.packs.pop(i))
        self._pack_totals[True] -= 1

    def free_sources(self) -> int:
        """End of a step's planning: the demoted pages' hi blocks leave the prefix cache (their
        hi copy is about to be reused) and go back to the pool with the emptied packs. Returns
        how many blocks."""
        sources, self._sources = self._sources, []
        self._fresh.clear()
        for entry in self._deferred:
            heapq.heappush(self._ranking, entry)
        self._deferred.clear()
        self.block_pool.evict_blocks({b.block_id for b in sources})
        self.block_pool.free_blocks(sources)
        return len(sources)

    @property
    def pending_free(self) -> int:
        """Blocks this step's planning has freed so far (back in the pool at `free_sources`)."""
        return len(self._sources)

    def release(self, req_id: str) -> None:
        """Give a finished, aborted or preempted request's packs back to the pool."""
        state = self.requests.pop(req_id, None)
        if state is not None:
            self._lo_total -= len(state.lo_pages)
            self._mid_total -= len(state.mid_mass)
            self._pack_totals[False] -= len(state.lo.packs)
            self._pack_totals[True] -= len(state.mid.packs)
            self.block_pool.free_blocks(reversed(state.lo.packs + state.mid.packs))
