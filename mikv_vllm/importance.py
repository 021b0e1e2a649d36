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
ModelRunnerOutput (mikv_vllm.integration.protocol).

At the end of every prefill chunk the same layers also score the request's pages by the
attention of the chunk's last `prefill_window` tokens (`window_page_mass`, SnapKV's observation
window): a prompt's closing question points at the pages its answer needs, before any decode
step is measured. A step with such scores always reports, and the scheduler ranks a request's
pages only once its prefill's report is in."""
from __future__ import annotations

import numpy as np
import torch

REPORT_EVERY = 8           # steps between measured steps (one report each)


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
        # Set by a sampled layer that scored prefill pages this step (window_page_mass).
        self.observed = False

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
        self.observed = False
        if all_reduce is not None:
            all_reduce(self.mass)
        on_gpu = self.mass.is_cuda
        host = torch.empty(self.mass.shape, dtype=self.mass.dtype, pin_memory=on_gpu)
        host.copy_(self.mass, non_blocking=on_gpu)
        self.mass.zero_()
        done = None
        if on_gpu:
            done = torch.cuda.Event()
            done.record()
        return PendingMass(host, done)


class PendingMass:
    """A block-mass report whose copy may still be in flight (`done`: its CUDA event)."""

    def __init__(self, host: torch.Tensor, done: torch.cuda.Event | None) -> None:
        self.host, self.done = host, done

    def result(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
        return self.host.numpy()


def window_page_mass(mass: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_len: int, scale: float, weight: float,
                     k_scale: float = 1.0) -> None:
    """Add to `mass` (fp32, one entry per block) the attention mass that the last query tokens
    of one sequence's prefill chunk give each of its hi pages: `query` [w, q_heads, D] are the
    chunk's last w tokens, ending at position seq_len - 1; `key_cache` [blocks, block_size,
    kv_heads, D] (fp8 caches as bytes, dequantized with `k_scale`); `block_table` the
    sequence's row (a prefill's pages are all hi; lo entries, negative, and the null block 0
    are left out of the scores). A page's mass is averaged over the window's queries and the
    query heads of each KV head, summed over KV heads, times `weight` (the meter's: one step
    of one request then adds 1 over all layers and ranks, as a measured decode step does)."""
    w, q_heads, d = query.shape
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    pages = -(-seq_len // block_size)
    blocks = block_table[:pages].long()
    keys = key_cache[blocks.clamp_min(0)]
    if keys.dtype == torch.uint8:
        keys = keys.view(torch.float8_e4m3fn)
    keys = keys.float().flatten(0, 1)[:seq_len] * k_scale                 # [T, kv_heads, D]
    q = query.float().reshape(w, kv_heads, q_heads // kv_heads, d)
    scores = torch.einsum("wkgd,tkd->kgwt", q, keys) * scale               # [kv, g, w, T]
    hi = blocks > 0
    pos = torch.arange(seq_len - w, seq_len, device=query.device)
    hidden = torch.arange(seq_len, device=query.device)[None, :] > pos[:, None]   # causal
    hidden = hidden | ~hi[:, None].expand(pages, block_size).reshape(-1)[None, :seq_len]
    probs = scores.masked_fill(hidden, float("-inf")).softmax(-1).mean(2)  # [kv, g, T]
    padded = probs.new_zeros(kv_heads, q_heads // kv_heads, pages * block_size)
    padded[..., :seq_len] = probs
    per_page = padded.reshape(kv_heads, -1, pages, block_size).sum(-1).mean(1).sum(0)
    # Masked by multiplication, not by boolean indexing (which waits for the GPU to count the
    # entries, a host sync inside the forward): lo entries and the null block add 0 to block 0.
    mass.index_add_(0, blocks.clamp_min(0), per_page * hi * weight)


def request_page_mass(block_mass, block_ids: list[int]) -> torch.Tensor:
    """Per-page mass of the pages in `block_ids` from a block-indexed array (a report or the
    scheduler's accumulated mass; numpy or a CPU tensor). Null/lo pages read block 0, which no
    hi page uses, so they get 0."""
    ids = np.asarray(block_ids, dtype=np.int64)
    out = np.asarray(block_mass, dtype=np.float32)[ids]
    out[ids == 0] = 0.0
    return torch.from_numpy(out)
