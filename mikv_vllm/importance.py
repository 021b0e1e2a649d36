"""The importance signal: how much attention each hi page receives, measured on the GPU during
decode and handed to the scheduler, which ranks pages by it (H2O at page granularity).

Fused into decode and sampled: on two layers, `paged_decode`'s hi pass also leaves the
log-sum-exp of every slab of a hi page it reads (and each head's final one), and `page_mass`
turns them into every hi page's probability mass, added into one fp32 entry per physical block
without reading a key again. The report goes to the scheduler on one decode step out of
`REPORT_EVERY`; on the other steps a device flag turns the slab output off and zeroes the
lengths page_mass sees, so the captured CUDA graphs stay the same and only measured steps pay
(the slab output costs the hi pass up to ~18% on the H200, see benchmarks/results).
Indexing by block id needs no row -> request map on the GPU; the scheduler knows which request
owns which block (a prefix-cache block that several decode rows share keeps the slab values of
one of them, so its mass is approximate; shared blocks are never demoted). After a measured
step the worker sums the buffer over tensor-parallel ranks, copies it to the host without
stalling the stream and zeroes it; the copy rides to the scheduler on the step's
ModelRunnerOutput (attribute `BLOCK_MASS_ATTR`)."""
from __future__ import annotations

import numpy as np
import torch
from vllm.v1.outputs import AsyncModelRunnerOutput

REPORT_EVERY = 8           # steps between measured steps (one report each)
BLOCK_MASS_ATTR = "mikv_block_mass"


def sampled_layers(num_layers: int) -> list[int]:
    """The layers that measure page mass: at a third and two thirds of the depth (the first
    layers attend broadly, the last ones narrowly; the quality harness ranks pages as well with
    these two as with all layers)."""
    return sorted({num_layers // 3, (2 * num_layers) // 3})


class PageMassMeter:
    """Worker-side buffers of the importance signal, shared by the sampled layers."""

    def __init__(self, num_blocks: int, max_rows: int, num_q_heads: int,
                 num_kv_heads: int, num_sampled_layers: int, tp_size: int,
                 block_size: int, head_dim: int, device: torch.device) -> None:
        from mikv_vllm.ops import slabs_per_block

        self.mass = torch.zeros(num_blocks, dtype=torch.float32, device=device)
        self.lse = torch.zeros(max_rows, num_q_heads, dtype=torch.float32, device=device)
        # Written by paged_decode for the pages it reads, read by page_mass for the same pages
        # within the step (shared by the sampled layers, which run one after the other).
        self.slab_lse = torch.zeros(num_blocks, slabs_per_block(block_size, head_dim),
                                    num_q_heads, dtype=torch.float32, device=device)
        # Average over every KV head of the model (all ranks) and the sampled layers, so one
        # step's masses of a request sum to at most 1.
        self.weight = 1.0 / (num_kv_heads * tp_size * num_sampled_layers)
        # 1 on measured steps, 0 otherwise: page_mass reads seq_lens * active, and the decode
        # kernel writes slab_lse only while it is 1 (its slab_gate).
        self.active = torch.zeros(1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.steps = 0
        self._active = False

    def step(self) -> bool:
        """Count one forward and arm (or disarm) the measurement for it; True when this step
        is measured, i.e. its output should carry a report."""
        self.steps += 1
        measure = self.steps % REPORT_EVERY == 0
        if measure != self._active:
            self.active.fill_(int(measure))
            self._active = measure
        return measure

    def lengths(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """The decode lengths page_mass should see this step (all 0 on unmeasured steps)."""
        return torch.mul(seq_lens, self.active, out=self.seq_lens[:seq_lens.shape[0]])

    def take(self, all_reduce=None) -> "PendingMass":
        """Start the device-to-host copy of the accumulated mass and restart accumulation."""
        if all_reduce is not None:
            all_reduce(self.mass)
        host = torch.empty(self.mass.shape, dtype=self.mass.dtype, pin_memory=True)
        host.copy_(self.mass, non_blocking=True)
        self.mass.zero_()
        done = torch.cuda.Event()
        done.record()
        return PendingMass(host, done)


class PendingMass:
    """A block-mass report whose copy may still be in flight."""

    def __init__(self, host: torch.Tensor, done: torch.cuda.Event) -> None:
        self.host, self.done = host, done

    def result(self) -> np.ndarray:
        self.done.synchronize()
        return self.host.numpy()


class AsyncOutputWithMass(AsyncModelRunnerOutput):
    """An async step output that adds the report once the output is ready."""

    def __init__(self, inner: AsyncModelRunnerOutput, pending: PendingMass) -> None:
        self.inner, self.pending = inner, pending

    def get_output(self):
        output = self.inner.get_output()
        setattr(output, BLOCK_MASS_ATTR, self.pending.result())
        return output


def attach(output, pending: PendingMass):
    """Make `output` (a ModelRunnerOutput, or an async one) carry the report to the scheduler."""
    if isinstance(output, AsyncModelRunnerOutput):
        return AsyncOutputWithMass(output, pending)
    if output is not None:
        setattr(output, BLOCK_MASS_ATTR, pending.result())
    return output


def request_page_mass(block_mass, block_ids: list[int]) -> torch.Tensor:
    """Per-page mass of the pages in `block_ids` from a block-indexed array (a report or the
    scheduler's accumulated mass; numpy or a CPU tensor). Null/lo pages read block 0, which no
    hi page uses, so they get 0."""
    ids = np.asarray(block_ids, dtype=np.int64)
    out = np.asarray(block_mass, dtype=np.float32)[ids]
    out[ids == 0] = 0.0
    return torch.from_numpy(out)
