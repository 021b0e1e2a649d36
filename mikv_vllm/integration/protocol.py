"""What mikv's scheduler and worker tell each other every step, and where it rides.

Both messages travel on vLLM's own step objects, so they cross process boundaries (the
multiprocessing and Ray executors, tensor-parallel ranks) the way those objects do:

- scheduler -> every worker: the step's page moves (`Demotion`s), on the `SchedulerOutput`;
  every tensor-parallel rank receives the same list and demotes the same pages of its own KV
  heads;
- worker (rank 0's answer) -> scheduler: a page-mass report, one fp32 per physical block summed
  over ranks, on the `ModelRunnerOutput` of a measured step (mikv_vllm.importance).

This module alone knows the attribute names; scheduler and worker use the put/get pairs."""
from __future__ import annotations

import numpy as np
from vllm.v1.outputs import AsyncModelRunnerOutput

from mikv_vllm.demotion import Demotion
from mikv_vllm.importance import PendingMass

_DEMOTIONS = "mikv_demotions"
_BLOCK_MASS = "mikv_block_mass"


def put_demotions(scheduler_output, moves: list[Demotion]) -> None:
    setattr(scheduler_output, _DEMOTIONS, moves)


def get_demotions(scheduler_output) -> list[Demotion]:
    return getattr(scheduler_output, _DEMOTIONS, None) or []


def put_block_mass(runner_output, mass: np.ndarray) -> None:
    setattr(runner_output, _BLOCK_MASS, mass)


def send_block_mass(runner_output, pending: PendingMass):
    """Make `runner_output` (a ModelRunnerOutput, or an async one) carry a report whose copy
    may still be in flight; returns the output to hand back to vLLM (an async one wrapped)."""
    if isinstance(runner_output, AsyncModelRunnerOutput):
        return _AsyncOutputWithMass(runner_output, pending)
    if runner_output is not None:
        put_block_mass(runner_output, pending.result())
    return runner_output


def get_block_mass(runner_output) -> np.ndarray | None:
    return getattr(runner_output, _BLOCK_MASS, None)


class _AsyncOutputWithMass(AsyncModelRunnerOutput):
    """An async step output that adds the report once the output is ready."""

    def __init__(self, inner: AsyncModelRunnerOutput, pending: PendingMass) -> None:
        self.inner, self.pending = inner, pending

    def get_output(self):
        output = self.inner.get_output()
        put_block_mass(output, self.pending.result())
        return output
