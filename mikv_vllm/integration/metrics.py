"""Prometheus metrics of mikv, through vLLM's metrics path: a stat logger plugin
(`vllm.stat_logger_plugins`) that the API server loads beside vLLM's own loggers; it reads the
page counters the mikv scheduler puts on SchedulerStats (`mikv_vllm.stats`) and exports them on
vLLM's /metrics endpoint. For other kv-cache dtypes it does nothing."""
from __future__ import annotations

import functools
import time

from vllm.v1.metrics.loggers import StatLoggerBase

from mikv_vllm.config import KV_CACHE_DTYPE


@functools.cache
def _metrics():
    """Created once per process (prometheus_client rejects duplicate names)."""
    from prometheus_client import Counter, Gauge

    labels = ["model_name", "engine"]
    return {
        "hi_pages": Gauge("vllm:mikv_hi_pages", "KV blocks holding a hi-precision page.", labels),
        "lo_pages": Gauge("vllm:mikv_lo_pages",
                          "Pages demoted to low precision (either lo tier).", labels),
        "pack_blocks": Gauge("vllm:mikv_pack_blocks", "KV blocks holding packed lo pages.", labels),
        "mid_pages": Gauge("vllm:mikv_mid_pages",
                           "Of the lo pages, those in the 4-bit middle tier.", labels),
        "mid_pack_blocks": Gauge("vllm:mikv_mid_pack_blocks",
                                 "Of the pack blocks, the 4-bit middle tier's.", labels),
        "resident_tokens": Gauge("vllm:mikv_resident_tokens",
                                 "Tokens of running requests whose K/V is in the cache.", labels),
        "bytes_saved": Gauge("vllm:mikv_kv_bytes_saved",
                             "Bytes freed by demotion, per layer and rank.", labels),
        "demotions_total": Counter("vllm:mikv_demotions", "Pages demoted.", labels),
        "pressure_demotions_total": Counter(
            "vllm:mikv_preemptions_avoided",
            "Pages demoted under memory pressure, where vLLM would have had to preempt.", labels),
        "left_kv_bytes_ratio": Gauge(
            "vllm:mikv_kv_bytes_ratio",
            "KV bytes of the requests that have left the cache, at the moment they left, over "
            "bf16's bytes for the same pages.", labels),
        "demotion_rate": Gauge("vllm:mikv_demotions_per_second",
                               "Pages demoted per second since the last record.", labels),
    }


class MikvStatLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0) -> None:
        self.enabled = (vllm_config.additional_config or {}).get(KV_CACHE_DTYPE) is not None
        self.labels = (vllm_config.model_config.served_model_name, str(engine_index))
        self.last: dict[str, int] = {}
        self.last_time = time.monotonic()

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
               engine_idx: int = 0) -> None:
        page_stats = getattr(scheduler_stats, KV_CACHE_DTYPE, None) if self.enabled else None
        if not page_stats:
            return
        metrics = _metrics()
        for name in ("hi_pages", "lo_pages", "pack_blocks", "mid_pages", "mid_pack_blocks",
                     "resident_tokens", "bytes_saved",
                     "left_kv_bytes_ratio"):
            metrics[name].labels(*self.labels).set(page_stats[name])
        delta = {name: page_stats[name] - self.last.get(name, 0)
                 for name in ("demotions_total", "pressure_demotions_total")}
        for name, d in delta.items():
            if d > 0:
                metrics[name].labels(*self.labels).inc(d)
        now = time.monotonic()
        metrics["demotion_rate"].labels(*self.labels).set(
            delta["demotions_total"] / max(now - self.last_time, 1e-3))
        self.last, self.last_time = dict(page_stats), now

    def log_engine_initialized(self) -> None:
        pass
