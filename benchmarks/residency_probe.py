"""A stock vLLM scheduler that logs the same `mikv stats` line as the mikv scheduler (resident
tokens, preemptions), so that the end-to-end benchmark measures every kv-cache dtype the same
way. Benchmark-only: select it with `scheduler_cls="residency_probe.ProbeAsyncScheduler"` and
this folder on PYTHONPATH."""
from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from mikv_vllm.stats import PageStatsRecorder


class _Probe:
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.page_stats = PageStatsRecorder()

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        self.page_stats.observe(self, output)
        return output


class ProbeScheduler(_Probe, Scheduler):
    pass


class ProbeAsyncScheduler(_Probe, AsyncScheduler):
    pass
