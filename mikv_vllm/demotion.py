"""Demote, don't evict: move cold pages of running requests into 2-bit packs inside vLLM's own
block pool (scheduler side).

A pack is one ordinary vLLM block holding N lo pages (N = `PageLayout.pack_factor`). Demoting
N pages takes one pack block and gives N hi blocks back: N - 1 blocks net. The page's entry in
the request's block list becomes vLLM's null block (as the sliding-window manager does for
blocks it drops), and the move (source block -> pack slot) is handed to the workers, which
quantize all of a step's moves in one launch before the step's forward. So no block may be a
source and a pack of the same step: sources are freed only once the step's demotions are all
planned (`free_sources`), after every pack of the step was taken (vLLM's pool hands a freed,
unhashed block out first). A freed source can then only be rewritten by cache writes of a later
forward, so the order holds under async scheduling too. Packs belong to their request and go
back to the pool when it finishes, is aborted or preempted."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mikv_vllm.layout import PageLayout


@dataclass(frozen=True)
class Demotion:
    """One page move for the workers: hi block `src_block` -> lo slot `dst_code`."""
    req_id: str
    page: int
    src_block: int
    dst_code: int  # pack_block * N + slot; the block-table entry becomes -(1 + dst_code)


@dataclass
class RequestPacks:
    packs: list = field(default_factory=list)  # KVCacheBlocks owned as packs, in order
    used_slots: int = 0                        # slots used in the last pack
    lo_pages: dict[int, int] = field(default_factory=dict)  # page -> dst_code


class PageDemoter:
    """Owns the lo-page bookkeeping of every running request for one KV cache group."""

    def __init__(self, kv_cache_manager, layout: PageLayout, group: int = 0):
        coordinator = kv_cache_manager.coordinator
        self.manager = coordinator.single_type_managers[group]
        self.block_pool = kv_cache_manager.block_pool
        self.pack_factor = layout.pack_factor
        if self.pack_factor < 2:
            raise ValueError(f"mikv: a lo page of {layout.lo_page_bytes} B frees nothing in a "
                             f"{layout.hi_page_bytes} B block")
        self.requests: dict[str, RequestPacks] = {}
        self.total_demoted = 0
        self._sources: list = []  # this step's demoted hi blocks, freed by free_sources()

    def is_lo(self, req_id: str, page: int) -> bool:
        state = self.requests.get(req_id)
        return state is not None and page in state.lo_pages

    def lo_mask(self, req_id: str, num_pages: int) -> torch.Tensor:
        """[num_pages] bool: which of a request's pages are lo (the policy's `is_lo`)."""
        mask = np.zeros(num_pages, dtype=bool)
        state = self.requests.get(req_id)
        if state is not None and state.lo_pages:
            # numpy, not a tensor indexed by a list: 7x faster at thousands of lo pages, and
            # the pressure loop asks this on the engine's critical path.
            pages = np.fromiter(state.lo_pages, dtype=np.int64, count=len(state.lo_pages))
            mask[pages[pages < num_pages]] = True
        return torch.from_numpy(mask)

    def shared_mask(self, req_id: str, num_pages: int) -> torch.Tensor:
        """[num_pages] bool: hi pages whose block another request holds too (a prefix-cache
        hit): demoting one would free nothing, so `demotable` refuses them."""
        blocks = self.manager.req_to_blocks.get(req_id, [])[:num_pages]
        refs = np.fromiter((b.ref_cnt for b in blocks), dtype=np.int64, count=len(blocks))
        mask = np.zeros(num_pages, dtype=bool)
        mask[:len(blocks)] = refs > 1
        return torch.from_numpy(mask)

    def num_lo_pages(self, req_id: str | None = None) -> int:
        """Lo pages of one request, or of all."""
        if req_id is not None:
            state = self.requests.get(req_id)
            return len(state.lo_pages) if state is not None else 0
        return sum(len(s.lo_pages) for s in self.requests.values())

    def num_pack_blocks(self) -> int:
        return sum(len(s.packs) for s in self.requests.values())

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

    def demote(self, req_id: str, pages: list[int]) -> list[Demotion]:
        """Move `pages` of `req_id` to lo slots; returns the moves for the workers."""
        pages = self.demotable(req_id, pages)
        state = self.requests.setdefault(req_id, RequestPacks())
        n = self.pack_factor
        open_slots = n - state.used_slots if state.packs else 0
        need = max(0, -(-(len(pages) - open_slots) // n))
        need = min(need, self.block_pool.get_num_free_blocks())
        pages = pages[:open_slots + need * n]
        if not pages:
            return []
        new_packs = self.block_pool.get_new_blocks(need)
        blocks = self.manager.req_to_blocks[req_id]
        moves = []
        for p in pages:
            if not state.packs or state.used_slots == n:
                state.packs.append(new_packs.pop(0))
                state.used_slots = 0
            code = state.packs[-1].block_id * n + state.used_slots
            state.used_slots += 1
            state.lo_pages[p] = code
            moves.append(Demotion(req_id, p, blocks[p].block_id, code))
            self._sources.append(blocks[p])
            blocks[p] = self.block_pool.null_block
        self.total_demoted += len(moves)
        return moves

    def free_sources(self) -> int:
        """End of a step's planning: the demoted pages' hi blocks leave the prefix cache (their
        hi copy is about to be reused) and go back to the pool. Returns how many."""
        sources, self._sources = self._sources, []
        self.block_pool.evict_blocks({b.block_id for b in sources})
        self.block_pool.free_blocks(sources)
        return len(sources)

    def release(self, req_id: str) -> None:
        """Give a finished, aborted or preempted request's packs back to the pool."""
        state = self.requests.pop(req_id, None)
        if state is not None:
            self.block_pool.free_blocks(reversed(state.packs))
