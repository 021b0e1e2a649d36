"""mikv's page counters on vLLM's metrics path: SchedulerStats (engine core) -> msgpack ->
stat logger plugin (API server) -> Prometheus, with vLLM 0.26's real classes."""
from __future__ import annotations

from mikv_vllm.integration import patches
from mikv_vllm.integration.metrics import MikvStatLogger
from mikv_vllm.stats import PageStats, last_logged

COUNTERS = PageStats(resident_tokens=900, max_resident_tokens=1000, hi_pages=40, lo_pages=12,
                     pack_blocks=3, demotions_total=12, pressure_demotions_total=8,
                     bytes_saved=12 * 55808, left_requests=2, left_pages=30, left_lo_pages=12,
                     left_kv_bytes_ratio=0.48).as_dict()


def test_scheduler_stats_carry_page_counters_through_msgpack():
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    patches.add_scheduler_stats_field()
    stats = SchedulerStats(num_running_reqs=3)
    assert stats.mikv is None
    stats.mikv = COUNTERS
    decoded = MsgpackDecoder(EngineCoreOutputs).decode(
        MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats)))
    assert decoded.scheduler_stats.mikv == COUNTERS
    assert decoded.scheduler_stats.num_running_reqs == 3


def test_stat_logger_plugin_is_found_by_vllm():
    from vllm.v1.metrics.loggers import load_stat_logger_plugin_factories

    assert MikvStatLogger in load_stat_logger_plugin_factories()


def _sample(name: str, engine: str = "0") -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"model_name": "mikv-metrics-test", "engine": engine})


def test_prometheus_metrics_follow_the_counters(serve_engine_config):
    from vllm.v1.metrics.stats import SchedulerStats

    _, cfg = serve_engine_config("--kv-cache-dtype", "mikv",
                                 "--served-model-name", "mikv-metrics-test")
    stat_logger = MikvStatLogger(cfg, engine_index=0)
    stats = SchedulerStats()
    stats.mikv = COUNTERS
    stat_logger.record(stats, None)
    assert _sample("vllm:mikv_lo_pages") == 12
    assert _sample("vllm:mikv_hi_pages") == 40
    assert _sample("vllm:mikv_kv_bytes_saved") == 12 * 55808
    assert _sample("vllm:mikv_demotions_total") == 12
    assert _sample("vllm:mikv_preemptions_avoided_total") == 8
    assert _sample("vllm:mikv_kv_bytes_ratio") == 0.48
    stats.mikv = {**COUNTERS, "demotions_total": 20, "lo_pages": 20}
    stat_logger.record(stats, None)
    assert _sample("vllm:mikv_demotions_total") == 20   # counters add the difference
    assert _sample("vllm:mikv_lo_pages") == 20
    assert _sample("vllm:mikv_demotions_per_second") > 0


def test_stat_logger_is_inert_without_mikv(serve_engine_config):
    from vllm.v1.metrics.stats import SchedulerStats

    _, cfg = serve_engine_config("--kv-cache-dtype", "fp8",
                                 "--served-model-name", "mikv-metrics-test")
    stats = SchedulerStats()
    stats.mikv = COUNTERS
    MikvStatLogger(cfg, engine_index=7).record(stats, None)
    assert _sample("vllm:mikv_lo_pages", engine="7") is None


def test_benchmarks_read_the_last_logged_counters():
    text = ("x\nINFO mikv stats: {\"lo_pages\": 1}\nmore\n"
            "(EngineCore) INFO mikv stats: {\"lo_pages\": 2, \"preemptions_total\": 0}\nend")
    assert last_logged(text) == {"lo_pages": 2, "preemptions_total": 0}
    assert last_logged("nothing") is None


def test_serve_sweep_reads_vllms_counters(monkeypatch):
    """benchmarks/e2e_serve_sweep.py's counters come from the Prometheus text format, as
    prometheus_client (vLLM's exporter) writes it: `_total` suffix, label sets summed."""
    import os
    import urllib.request

    from prometheus_client import CollectorRegistry, Counter, generate_latest

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import e2e_serve_sweep

    registry = CollectorRegistry()
    per_engine = {"vllm:prefix_cache_hits": (496, 4), "vllm:prefix_cache_queries": (1000, 8),
                  "vllm:num_preemptions": (3, 0)}
    for name, values in per_engine.items():
        counter = Counter(name, "", ["engine"], registry=registry)
        for engine, value in enumerate(values):
            counter.labels(engine=str(engine)).inc(value)
    text = generate_latest(registry)
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda *a, **k: type("R", (), {"read": lambda self: text})())
    assert e2e_serve_sweep.counters("http://x") == {
        "num_preemptions": 3.0, "prefix_cache_queries": 1008.0, "prefix_cache_hits": 500.0}
