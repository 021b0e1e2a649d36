"""The KV simulation: each attention layer of the real model attends over the past KV *as the
method stores it*, in pages of `block_size` tokens, with demotion decided by the plugin's
DemotionPolicy from accumulated page mass.

Timeline (what vLLM does): prefill runs at full precision and records the outlier-balancing
statistics; every later forward is a decode step (one token, or a small chunk in perplexity
runs). During a step each layer reads the stored view; the layers the GPU samples (see
mikv_vllm.importance) add their per-page attention mass (reference.page_mass over the query
heads); after the step their mean is accumulated with decay and the policy demotes pages over
budget, so mass from steps < t decides what step t reads (the kernel emits mass, the scheduler
acts at the next step). The GPU also samples in time (one step in REPORT_EVERY); the harness
measures every step unless told otherwise (`measure_every`). A prefill can also score its
pages from the attention of its last tokens (`window`), as the GPU does at a prefill's end.
A demoted page is replaced by its quantize_page -> dequantize_page round trip, computed once."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache

from mikv_vllm.importance import sampled_layers
from benchmarks.harness.methods import (PRODUCT, Method, hadamard, hi_cost, hi_roundtrip,
                                    lo_cost, make_policy, method_lo_cost)
from mikv_vllm.layout import PageLayout
from mikv_vllm.quant import CLIP_RATIOS, dequantize_page, quantize_page, roundtrip_pages
from mikv_vllm.reference import page_mass

ATTN_IMPL = "mikv_sim"
_ACTIVE = None  # the Prefill or KVSim the attention function routes to; None = exact attention


def _attend(q, k, v, scaling, keep=None):
    """q [Hq, Tq, D], k/v [Hkv, T, D] -> (out [Hq, Tq, D], probs [Hq, Tq, T]); queries are the
    last Tq positions (causal), `keep` [T] masks evicted tokens."""
    hq, tq, d = q.shape
    hkv, t, _ = k.shape
    qg = q.reshape(hkv, hq // hkv, tq, d)
    scores = torch.einsum("hgqd,htd->hgqt", qg, k) * scaling
    pos = torch.arange(t, device=q.device)
    mask = pos[None, :] > pos[t - tq:, None]  # [Tq, T]
    if keep is not None:
        mask = mask | ~keep[None, :]
    probs = scores.masked_fill(mask, float("-inf")).softmax(dim=-1, dtype=torch.float32)
    out = torch.einsum("hgqt,htd->hgqd", probs, v)
    return out.reshape(hq, tq, d), probs.reshape(hq, tq, t)


def sim_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """transformers attention function (batch 1): routes to the active simulation."""
    if query.shape[0] != 1:
        raise ValueError("the KV simulation runs batch size 1")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if _ACTIVE is None:
        out, _ = _attend(query[0], key[0], value[0], scaling)
    else:
        out = _ACTIVE.attend(module.layer_idx, query[0], key[0], value[0], scaling)
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None


AttentionInterface.register(ATTN_IMPL, sim_attention)


class _Active:
    def __init__(self, obj):
        self.obj = obj

    def __enter__(self):
        global _ACTIVE
        self.prev, _ACTIVE = _ACTIVE, self.obj

    def __exit__(self, *exc):
        global _ACTIVE
        _ACTIVE = self.prev


@dataclass
class Prefill:
    """A prompt prefilled at full precision: its cache and per-layer max |q|, max |k| per
    (KV head, channel) for MiKV outlier balancing; with a `window`, also the pages' scores
    from the attention of the prompt's last `window` tokens on the layers the GPU samples
    (what mikv_vllm.importance.window_page_mass reports at the end of a prefill in vLLM)."""
    cache: DynamicCache
    qmax: dict
    kmax: dict
    logits: torch.Tensor | None = None
    window: int = 0
    block_size: int = 16
    window_mass: torch.Tensor | None = None  # [pages], summed over the sampled layers
    mass_layers: frozenset = frozenset()

    def attend(self, layer, q, k, v, scaling):
        hkv, d = k.shape[0], k.shape[-1]
        self.qmax[layer] = q.abs().reshape(hkv, -1, d).amax(1)
        self.kmax[layer] = k.abs().amax(1)
        out, probs = _attend(q, k, v, scaling)
        if self.window and layer in self.mass_layers:
            m = page_mass(probs[:, -self.window:].mean(1), self.block_size).cpu()
            self.window_mass = m if self.window_mass is None else self.window_mass + m
        return out

    def balance(self, layer) -> torch.Tensor:
        return (self.qmax[layer] / self.kmax[layer].clamp_min(1e-6)).clamp_min(1e-6).sqrt()


@torch.no_grad()
def prefill(model, ids: list[int], last_only: bool = False, window: int = 0,
            block_size: int = 16) -> Prefill:
    layers = frozenset(sampled_layers(model.config.num_hidden_layers))
    state = Prefill(DynamicCache(config=model.config), {}, {}, window=window,
                    block_size=block_size, mass_layers=layers)
    with _Active(state):
        out = model(input_ids=torch.tensor([ids], device=model.device),
                    past_key_values=state.cache, use_cache=True,
                    logits_to_keep=1 if last_only else 0)
    state.logits = out.logits[0]
    return state


def layout_of(model, block_size: int, method: Method | None = None, lo_bits: int | None = None,
              value_group_size: int = 64) -> PageLayout:
    """The page layout a method stores (lo bits: the method's lo tier unless given)."""
    c = model.config
    if lo_bits is None:
        lo_bits = method.lo_bits if method is not None else 2
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    hi_bytes = 1 if method is not None and method.hi == "fp8" else 2
    return PageLayout(block_size, c.num_key_value_heads, d, hi_bytes, lo_bits,
                      min(value_group_size, d),
                      key_outliers=method is not None and method.k_outliers)


class KVSim:
    """One request decoding under one method, continuing from a (copied) prefill."""

    def __init__(self, model, method: Method, pre: Prefill, block_size: int = 16,
                 sink_pages: int = PRODUCT.sink_pages,
                 recent_pages: int = PRODUCT.recent_pages, measure_every: int = 1,
                 window_scores: bool = True):
        """`measure_every`: decode steps between measured ones (the GPU measures 1 in
        importance.REPORT_EVERY); a prefill with a window starts the ranking from its scores
        (unless `window_scores` is off: the prefill_window = 0 knob)."""
        self.model, self.method, self.bs = model, method, block_size
        self.measure_every, self.steps = measure_every, 0
        self.layout = layout_of(model, block_size, method)
        self.policy = make_policy(method, self.layout, sink_pages, recent_pages)
        self.pre = pre
        self.cache = copy.deepcopy(pre.cache)
        self.n_layers = len(self.cache.layers)
        self.mass_layers = set(sampled_layers(self.n_layers))  # the layers the GPU measures
        self.k = [hi_roundtrip(method, l.keys[0].float()) for l in self.cache.layers]
        self.v = [hi_roundtrip(method, l.values[0].float()) for l in self.cache.layers]
        self.keep = torch.ones(self.k[0].shape[1], dtype=torch.bool, device=model.device)
        self.is_lo = torch.zeros(0, dtype=torch.bool)   # per page: demoted (lo or evicted)
        self.is_mid = torch.zeros(0, dtype=torch.bool)  # of those, in the 4-bit tier (tiered)
        self.mid_layout = layout_of(model, block_size, method, lo_bits=4) if method.mid else None
        self.acc = torch.zeros(0)
        # Tiered: a 4-bit page's mass when it left hi. The GPU measures hi pages only, so the
        # product ranks a 4-bit page's move on to 2-bit by that, and so does the simulation.
        self.frozen = torch.zeros(0)
        if window_scores and pre.window_mass is not None and self.policy is not None:
            self.acc = pre.window_mass / len(self.mass_layers)
        self.step_mass = None
        self.ratios: list[float] = []                    # bytes vs bf16, per step
        self.h = hi_cost(method, self.layout.head_size)
        self.lc = method_lo_cost(method, self.layout)
        self.mc = lo_cost(self.mid_layout) if method.mid else None

    # -- inside the model forward --
    def attend(self, layer, q, k, v, scaling):
        n = self.k[layer].shape[1]
        if k.shape[1] > n:  # this step's tokens are written to hi pages
            self.k[layer] = torch.cat([self.k[layer], hi_roundtrip(self.method, k[:, n:])], 1)
            self.v[layer] = torch.cat([self.v[layer], hi_roundtrip(self.method, v[:, n:])], 1)
        t = self.k[layer].shape[1]
        if self.keep.numel() < t:
            self.keep = torch.cat([self.keep, self.keep.new_ones(t - self.keep.numel())])
        keep = None if bool(self.keep.all()) else self.keep
        out, probs = _attend(q, self.k[layer], self.v[layer], scaling, keep)
        if layer not in self.mass_layers or self.steps % self.measure_every:
            return out
        # mean over the step's queries, then page_mass averages over the query heads (equal
        # groups per KV head, so this is the mean over the heads of each KV head, then KV heads)
        m = page_mass(probs.mean(1), self.bs).cpu()  # the policy's bookkeeping is on the CPU
        self.step_mass = m if self.step_mass is None else self.step_mass + m
        return out

    # -- around it --
    def _grow(self, pages: int):
        if self.is_lo.numel() < pages:
            grow = torch.zeros(pages - self.is_lo.numel(), dtype=torch.bool)
            self.is_lo, self.is_mid = torch.cat([self.is_lo, grow]), torch.cat([self.is_mid, grow])
            self.frozen = torch.cat([self.frozen, self.frozen.new_zeros(grow.numel())])

    def demote(self, pages: list[int], to_mid: bool = False):
        """Demote pages: each is replaced by its lo page's values (all of a step's pages in
        one pass per layer: quant.roundtrip_pages, the page format's arithmetic without its
        byte layout; with key balancing, page by page through the stored bytes). Tiered:
        hi pages `to_mid` become 4-bit; mid pages go on to 2-bit from their 4-bit values, the
        only copy the GPU would still have."""
        if not pages:
            return
        from_mid = bool(self.is_mid[pages].any())
        self.is_lo[pages] = True
        self.is_mid[pages] = to_mid
        if to_mid:
            self.frozen[pages] = self.acc[pages]
        rows = (torch.tensor(pages)[:, None] * self.bs + torch.arange(self.bs)).reshape(-1)
        if self.method.lo == "evict":
            self.keep[rows.to(self.keep.device)] = False
            return
        lay = self.layout
        for i, l in enumerate(self.cache.layers):
            if self.method.balance:
                for p in pages:
                    r = slice(p * self.bs, (p + 1) * self.bs)
                    b = self.pre.balance(i)
                    page = quantize_page(l.keys[0, :, r].permute(1, 0, 2),
                                         l.values[0, :, r].permute(1, 0, 2), lay, b,
                                         e4m3_scales=self.method.scale8)
                    dk, dv = dequantize_page(page, lay, b)
                    self.k[i][:, r], self.v[i][:, r] = dk.permute(1, 0, 2), dv.permute(1, 0, 2)
                continue
            idx = rows.to(l.keys.device)
            k, v = (self.k[i], self.v[i]) if from_mid else (l.keys[0], l.values[0])
            rot = hadamard(v.shape[-1]).to(v) if self.method.rotate_v else None
            dk, dv = roundtrip_pages(k[:, idx], v[:, idx] if rot is None else v[:, idx] @ rot,
                                     self.mid_layout if to_mid else lay,
                                     e4m3_scales=self.method.scale8,
                                     k_zero_fp16=self.method.k_zero16,
                                     v_clip=CLIP_RATIOS if self.method.clip_v else ())
            self.k[i][:, idx], self.v[i][:, idx] = dk, dv if rot is None else dv @ rot.T

    def begin_step(self, n_new: int):
        n_past = self.cache.get_seq_length()
        total = n_past + n_new
        self._grow(-(-total // self.bs))
        if self.method.all_lo:  # KIVI: every page full before this step is lo
            self.demote([p for p in range(n_past // self.bs) if not self.is_lo[p]])
        lo_pages, mid_pages = int(self.is_lo.sum()), int(self.is_mid.sum())
        lo_tok = lo_pages * self.bs
        lo_bytes = 0.0 if self.method.lo == "evict" else \
            ((lo_pages - mid_pages) * self.lc + mid_pages * (self.mc or 0.0)) * self.bs
        self.ratios.append(((total - lo_tok) * self.h + lo_bytes) / total)
        self.step_mass = None
        self.steps += 1

    def end_step(self):
        if self.policy is None:
            return
        if self.step_mass is not None:
            self.acc = self.policy.accumulate(self.acc, self.step_mass / len(self.mass_layers))
        n = self.cache.get_seq_length()
        self._grow(-(-n // self.bs))
        missing = self.is_lo.numel() - self.acc.numel()  # pages no measured step has seen
        if missing > 0:
            self.acc = torch.cat([self.acc, self.acc.new_zeros(missing)])
        if self.method.mid:
            self._demote_tiers(n)
        else:
            self.demote(self.policy.over_budget(self.acc, self.is_lo, n, self.bs))

    def _demote_tiers(self, n: int):
        """The coldest hi pages to 4-bit, then the coldest 4-bit pages (by their mass when
        they left hi) to 2-bit, as far as the byte budget needs (DemotionPolicy.tier_limits);
        a hi page that would pass through 4-bit within one step is quantized to 2-bit from its
        original values."""
        hi_max, mid_max = self.policy.tier_limits(n, self.bs, self.method.budget, self.h,
                                                  self.mc, self.lc)
        pages = -(-n // self.bs)
        to_mid = self.policy.coldest(self.acc, self.is_lo, n, self.bs,
                                     pages - int(self.is_lo[:pages].sum()) - hi_max)
        mid_after = self.is_mid.clone()
        mid_after[to_mid] = True
        rank = self.acc.clone()  # 4-bit pages by their frozen mass
        m = min(rank.numel(), self.is_mid.numel())
        rank[:m] = torch.where(self.is_mid[:m], self.frozen[:m], rank[:m])
        to_lo = self.policy.coldest(rank, ~mid_after, n, self.bs,
                                    int(mid_after[:pages].sum()) - mid_max)
        direct = sorted(set(to_mid) & set(to_lo))
        self.demote(sorted(set(to_mid) - set(direct)), to_mid=True)
        self.demote(direct)
        self.demote(sorted(set(to_lo) - set(direct)))

    @torch.no_grad()
    def step(self, ids: list[int], last_only: bool = False) -> torch.Tensor:
        """One decode step (or chunk): logits [len(ids), vocab] (or [1, vocab])."""
        self.begin_step(len(ids))
        with _Active(self):
            out = self.model(input_ids=torch.tensor([ids], device=self.model.device),
                             past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1 if last_only else 0)
        self.end_step()
        return out.logits[0]

    @property
    def kv_bytes_ratio(self) -> float:
        return sum(self.ratios) / len(self.ratios) if self.ratios else self.h
