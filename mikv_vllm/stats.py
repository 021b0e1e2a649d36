"""What the mikv scheduler reports about its pages: one dict per step on vLLM's SchedulerStats
(field `mikv`, for the Prometheus logger in `mikv_vllm.integration.metrics`) and a throttled log
line (`mikv stats: {...}`) that benchmarks parse. The same counters describe any vLLM scheduler
(`observe` needs no demoter), so a benchmark can log them for the stock dtypes too."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

logger = logging.getLogger("vllm.mikv")  # a child of vLLM's logger: its handlers and format
LOG_PREFIX = "mikv stats: "
LOG_EVERY_S = 2.0


@dataclass
class PageStats:
    resident_tokens: int = 0       # tokens whose K/V is in the cache now (running requests)
    max_resident_tokens: int = 0
    hi_pages: int = 0              # blocks holding one hi page each
    lo_pages: int = 0              # pages in either lo tier
    pack_blocks: int = 0           # blocks holding lo pages, either tier
    mid_pages: int = 0             # of lo_pages, those in the middle (4-bit) tier
    mid_pack_blocks: int = 0       # of pack_blocks, the middle tier's
    demotions_total: int = 0
    pressure_demotions_total: int = 0  # pages demoted because free blocks ran short
    preemptions_total: int = 0
    bytes_saved: int = 0           # per layer and rank: lo pages x (hi page - their tier's bytes)
    # Requests that left the cache (finished, aborted or preempted) and their pages then: the
    # KV bytes they were answered from, over bf16's for the same pages.
    left_requests: int = 0
    left_pages: int = 0
    left_lo_pages: int = 0
    left_mid_pages: int = 0
    left_kv_bytes_ratio: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class PageStatsRecorder:
    """Updates a PageStats after every `schedule()` (its page counts again after every step's
    frees) and logs it at most every LOG_EVERY_S."""

    def __init__(self, hi_page_bytes: int = 0, lo_page_bytes: int = 0,
                 bf16_page_bytes: int = 0, mid_page_bytes: int = 0) -> None:
        self.stats = PageStats()
        self.page_bytes = (hi_page_bytes, lo_page_bytes, bf16_page_bytes or hi_page_bytes,
                           mid_page_bytes)
        self._last_log = 0.0
        self._busy = False

    def observe(self, scheduler, output, demoter=None, new_moves: int = 0,
                pressure_moves: int = 0) -> None:
        s = self.stats
        s.preemptions_total += len(getattr(output, "preempted_req_ids", None) or ())
        if demoter is not None:
            s.demotions_total += new_moves
            s.pressure_demotions_total += pressure_moves
        self.count_pages(scheduler, demoter)
        s.max_resident_tokens = max(s.max_resident_tokens, s.resident_tokens)
        now = time.monotonic()
        went_idle = self._busy and not scheduler.running
        self._busy = bool(scheduler.running)
        if went_idle or now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            self.log()

    def count_pages(self, scheduler, demoter=None) -> None:
        """The pool's page and pack counts as they are now. Also called after a step's
        finished requests were freed, so that once the engine idles every counter reads 0 and a
        block that leaked shows as a hi page no request holds."""
        s = self.stats
        s.resident_tokens = sum(r.num_computed_tokens for r in scheduler.running)
        pool = scheduler.kv_cache_manager.block_pool
        used = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()  # block 0 is the null block
        if demoter is not None:
            s.lo_pages, s.pack_blocks = demoter.num_lo_pages(), demoter.num_pack_blocks()
            s.mid_pages, s.mid_pack_blocks = demoter.num_mid_pages(), demoter.num_pack_blocks(True)
        s.hi_pages = used - s.pack_blocks
        s.bytes_saved = self._stored(s.lo_pages, 0, 0) - self._stored(
            s.lo_pages, s.mid_pages, s.lo_pages)

    def _stored(self, pages: int, mid_pages: int, lo_pages: int) -> int:
        """Bytes of `pages` pages of which `lo_pages` are lo, `mid_pages` of those 4-bit."""
        hi, lo, _, mid = self.page_bytes
        return (pages - lo_pages) * hi + (lo_pages - mid_pages) * lo + mid_pages * mid

    def request_left(self, pages: int, lo_pages: int, mid_pages: int = 0) -> None:
        """Count a request leaving the cache with `pages` pages, `lo_pages` of them lo
        (`mid_pages` of those in the middle tier)."""
        s = self.stats
        s.left_requests += 1
        s.left_pages += pages
        s.left_lo_pages += lo_pages
        s.left_mid_pages += mid_pages
        s.left_kv_bytes_ratio = self.bytes_ratio(s.left_pages, s.left_lo_pages,
                                                 s.left_mid_pages) or 0.0

    def bytes_ratio(self, pages: int, lo_pages: int, mid_pages: int = 0) -> float | None:
        """The bytes of `pages` pages (`lo_pages` lo, `mid_pages` of those 4-bit) over bf16's
        for the same pages."""
        bf16 = self.page_bytes[2]
        if not pages or not bf16:
            return None
        return self._stored(pages, mid_pages, lo_pages) / (pages * bf16)

    def log(self) -> None:
        logger.info("%s%s", LOG_PREFIX, json.dumps(self.stats.as_dict()))


def last_logged(text: str) -> dict | None:
    """The last `mikv stats` dict in a log text (for benchmarks)."""
    at = text.rfind(LOG_PREFIX)
    if at < 0:
        return None
    line = text[at + len(LOG_PREFIX):].split("\n", 1)[0]
    return json.loads(line)
