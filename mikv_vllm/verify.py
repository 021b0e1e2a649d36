"""A debugging aid for the worker side of demotion (MIKV_VERIFY_DEMOTIONS=1; it synchronizes
the GPU every step, never use it to measure).

For the first attention layer it checks, on the device, that (1) every demoted page's pack slot
dequantizes (torch reference, mikv_vllm.quant) to its source page within the error the format
allows each group (`quantization_error_bound`: half a step, where a group far from zero, like a
biased key channel, gets a coarser step), and (2) on every later step, the block-table entries
of the demoted pages still name their slots and the slots' bytes are unchanged (the decode path
reads them with the worker's own layout object, which it hands every attention layer). One log
line per step with demotions, one per broken page."""
from __future__ import annotations

import logging
import os

import torch

from mikv_vllm.layout import PageLayout, split_kv_cache
from mikv_vllm.quant import dequantize_page, quantization_error_bound
from mikv_vllm.reference import cache_to_float, lo_slot

logger = logging.getLogger("vllm.mikv")  # a child of vLLM's logger: its handlers and format
ENV = "MIKV_VERIFY_DEMOTIONS"


def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


class DemotionVerifier:
    def __init__(self) -> None:
        # (req_id, page) -> (table row, block-table entry, byte sum of the slot)
        self.live: dict[tuple[str, int], tuple[int, int, int]] = {}
        self.sources: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _slot(layer, layout: PageLayout, dst_code: int) -> tuple[torch.Tensor, PageLayout]:
        """A lo slot's bytes in the layer's cache and its tier's layout (reference.lo_slot over
        the cache's bytes as [blocks, block bytes])."""
        key_cache, _ = split_kv_cache(layer.kv_cache, layer.head_size)
        raw = torch.empty(0, dtype=torch.uint8, device=key_cache.device).set_(
            key_cache.untyped_storage())
        blocks, block_bytes = key_cache.shape[0], key_cache.stride(0) * key_cache.element_size()
        start = key_cache.storage_offset() * key_cache.element_size()
        return lo_slot(raw[start:start + blocks * block_bytes].view(blocks, block_bytes),
                       -1 - dst_code, layout)

    def check_live(self, layer, layout: PageLayout, table: torch.Tensor, gone) -> None:
        """Step start: the earlier demotions of live requests (not finished or preempted, in
        `gone`) are still in place."""
        for key in [k for k in self.live if k[0] in gone]:
            del self.live[key]
        bad = 0
        for (req_id, page), (row, entry, checksum) in self.live.items():
            now_entry = int(table[row, page])
            now_sum = int(self._slot(layer, layout, -entry - 1)[0].sum())
            if now_entry != entry or now_sum != checksum:
                bad += 1
                logger.warning("mikv verify: %s page %d: table entry %d (want %d), slot bytes "
                               "sum %d (was %d)", req_id, page, now_entry, entry, now_sum,
                               checksum)
        if bad:
            logger.warning("mikv verify: %d of %d demoted pages changed since their demotion",
                           bad, len(self.live))

    def save_sources(self, layer, layout: PageLayout, moves) -> None:
        """Each move's source values (fp32 K and V) before the launch rewrites anything: a hi
        block's, or a middle-tier page's dequantized ones."""
        key_cache, value_cache = split_kv_cache(layer.kv_cache, layer.head_size)
        ks, vs = [], []
        for m in moves:
            if m.src >= 0:
                ks.append(cache_to_float(key_cache[m.src], layer._k_scale_float))
                vs.append(cache_to_float(value_cache[m.src], layer._v_scale_float))
            else:
                k, v = dequantize_page(*self._slot(layer, layout, -1 - m.src))
                ks.append(k)
                vs.append(v)
        self.sources = (torch.stack(ks), torch.stack(vs))

    def check_moves(self, layer, layout: PageLayout, moves, rows: dict[str, int]) -> None:
        """After quantize + table write: each slot round-trips to its saved source."""
        k_src, v_src = self.sources
        worst_k = worst_v = 0.0
        for i, m in enumerate(moves):
            slot, tier = self._slot(layer, layout, m.dst_code)
            k, v = dequantize_page(slot, tier)
            worst_k = max(worst_k, _worst_over_bound(k, k_src[i], tier, 0))  # per channel
            v_src_groups = v_src[i].unflatten(-1, (-1, layout.value_group_size))
            worst_v = max(worst_v, _worst_over_bound(  # per token and group of channels
                v.unflatten(-1, (-1, layout.value_group_size)), v_src_groups, tier, -1))
            if m.req_id in rows:
                self.live[(m.req_id, m.page)] = (rows[m.req_id], -(1 + m.dst_code),
                                                 int(slot.sum()))
        level = logger.info if max(worst_k, worst_v) <= 1.0 else logger.warning
        level("mikv verify: %d moves, worst error / the format's bound: K %.3f, V %.3f (<= 1 "
              "as the format allows)", len(moves), worst_k, worst_v)


def _worst_over_bound(got: torch.Tensor, src: torch.Tensor, layout: PageLayout, dim: int
                      ) -> float:
    """Largest |got - src| over what the format allows its group (groups along `dim`)."""
    lo, hi = src.amin(dim, keepdim=True), src.amax(dim, keepdim=True)
    bound = quantization_error_bound(hi - lo, layout.lo_bits, lo)
    return float(((got - src).abs() / bound).max())
