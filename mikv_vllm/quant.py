"""The lo page format and its torch reference: asymmetric 2-bit (or 4-bit) quantization of one
page (one vLLM block of one layer: all KV heads, K and V).

Keys are grouped per channel over the page's tokens (key outliers live in channels, as KIVI and
KVQuant observed); values are grouped per token over `value_group_size` channels.

Everything is stored in the order the decode kernel's tensor-core fragments want it
(csrc/paged_decode.cu, mma.m16n8k16): per 16-token tile of a KV head, lane L of a warp finds
all of its codes in one contiguous run of D * bits / 16 bytes (a 16-byte load at D = 128,
2-bit) and its scales and zero points in short runs, so a lo page is read with wide loads and no shuffles.
With g = L // 4 and j = L % 4, lane L's codes are pairs (two elements of one fp16x2 register):
    K, pair (chunk c, r):  token 16T + g + 8 (r & 1),  channels 16c + 2j + 8 (r >> 1) + {0, 1}
    V, pair (tile n, r):   channel 16n + g + 8 (r & 1), tokens 16T + 2j + 8 (r >> 1) + {0, 1}
A 32-bit word holds 16 / bits pairs: first elements in its low half, second elements in its
high half, the pair in slot i at bit i * bits of each half. Pair (chunk c, r) sits in word
(r & 1) + 2 (q % (W / 2)), slot q // (W / 2), with q = 2c + (r >> 1) and W = D * bits / 64 words
per lane (`pair_slot`): the two registers that share a zero point share a slot, so the kernel
turns codes into fp16 in place (a mask and an or into fp16 1024, then one fma whose scale and
offset depend on the slot only) instead of shifting every pair down first. A lane's scales of
a chunk are one 8-byte run, its zero points one 4-byte run.

Byte layout of a lo page (offsets: `PageLayout.lo_offsets`), all little-endian:
    K codes  [H, B / 16, 32 lanes, D * bits / 16]
    V codes  [H, B / 16, 32 lanes, D * bits / 16]
    K scales [H, 4 (j), D / 16 (c), 2 (+0 | +8 channels), 2] fp16, channel 16c + 2j + {0, 8} + {0, 1}
    V scales [H, B / 16, D / g, 4 (j), 2 (+0 | +8 tokens), 2] fp16, token 16T + 2j + {0, 8} + {0, 1}
    K zeros, V zeros: the same shapes in int8
    K outliers [H, slots] int32, with `PageLayout.key_outliers` only: position t * D + c in the
             low 16 bits, an fp16 correction in the high 16, in order of position
    value = (code - zero) * scale (+ the correction of an outlier key)
With key outliers, each page and KV head keeps `PageLayout.outlier_slots` keys exact
(`select_outliers`; KVQuant's dense-and-sparse split): a key channel's grid then spans its
page's other keys, which halves the perplexity loss of 2-bit pages at equal bytes
(benchmarks/results/QUALITY.md).
With MiKV outlier balancing, K is multiplied per (head, channel) by `balance` before
quantization, and dequantized K is divided by it again (the kernel divides Q instead)."""
from __future__ import annotations

import functools

import torch

from mikv_vllm.layout import PageLayout


def e4m3_up(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float8-e4m3 value >= each (positive) scale, as fp32."""
    s = scale.float().clamp(2.0 ** -9, 448.0)
    q = s.to(torch.float8_e4m3fn)
    bump = q.float() < s
    return torch.where(bump, (q.view(torch.uint8) + 1).view(torch.float8_e4m3fn), q).float()


# A candidate lo quantizer (harness only): a group's range may shrink about its middle by one of
# these ratios where that round-trips it with less squared error (`_quantize_groups`).
CLIP_RATIOS = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)


def _quantize_groups(x: torch.Tensor, bits: int, dim: int, e4m3_scales: bool = False,
                     clip_ratios: tuple[float, ...] = ()
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, fp16 scales and int8 zero points of `x` with one group along `dim`:
    x ~ (code - zero) * scale. The zero point is the whole number of steps from 0 to the
    group's minimum, so the grid (shifted by at most half a step) still spans the group; where
    the offset needs more than ~127 steps the scale grows instead. `clip_ratios` (a candidate
    format measured in the harness): each group's range may also shrink about its middle by
    one of these ratios, whichever round-trips the group with the least squared error."""
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    best = _quantize_range(x, bits, dim, lo, hi, e4m3_scales)
    if clip_ratios:
        def sse(q):
            err = _dequantize(*q) - x
            return err.square().sum(dim, keepdim=True)

        err = sse(best)
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        for ratio in clip_ratios:
            q = _quantize_range(x, bits, dim, mid - half * ratio, mid + half * ratio, e4m3_scales)
            e = sse(q)
            better = e < err
            err = torch.where(better, e, err)
            best = tuple(torch.where(better, new, old) for new, old in zip(q, best))
    return best


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(code - zero) * scale in fp32: the grid value of each code."""
    return (codes.float() - zero.float()) * scale.float()


def _quantize_range(x: torch.Tensor, bits: int, dim: int, lo: torch.Tensor, hi: torch.Tensor,
                    e4m3_scales: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_quantize_groups` with each group's grid spanning [lo, hi] (values outside clamp)."""
    levels = (1 << bits) - 1
    # Floor at fp16's smallest normal: a constant group must not divide by zero.
    scale = ((hi - lo) / levels).clamp_min(2.0 ** -14)
    # Room for fp16 rounding below the int8 limits.
    scale = torch.maximum(torch.maximum(scale, (-lo).clamp_min(0) / 126), lo.clamp_min(0) / 127)
    # Rounded up, a coarser scale still spans the group (codes stay in range).
    scale = (e4m3_up(scale) if e4m3_scales else scale).half().float()
    zero = torch.round(-lo / scale).clamp_(-128, 127)
    codes = torch.round((x + zero * scale) / scale).clamp_(0, levels).to(torch.uint8)
    return codes, scale.half(), zero.to(torch.int8)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] codes -> [..., D * bits / 8] bytes, element i in the low bits first."""
    per_byte = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], -1)


def _lane_pairs(b: int, d: int) -> tuple[torch.Tensor, ...]:
    """Tile, lane g / j, chunk and register index r of every code pair, broadcastable to
    [B / 16, 32, D / 16, 4, 2 (element)]."""
    tile = torch.arange(b // 16).reshape(-1, 1, 1, 1, 1)
    lane = torch.arange(32).reshape(1, -1, 1, 1, 1)
    chunk = torch.arange(d // 16).reshape(1, 1, -1, 1, 1)
    r = torch.arange(4).reshape(1, 1, 1, -1, 1)
    e = torch.arange(2).reshape(1, 1, 1, 1, -1)
    return tile, lane // 4, lane % 4, chunk, r, e


def pair_slot(chunk: int, r: int, d: int, bits: int) -> tuple[int, int]:
    """(word, slot) of a lane's code pair (chunk or m-tile `chunk`, fragment register `r`)."""
    half_words = d * bits // 128
    q = 2 * chunk + (r >> 1)
    return (r & 1) + 2 * (q % half_words), q // half_words


@functools.cache
def code_order(kind: str, b: int, d: int, bits: int) -> torch.Tensor:
    """Flat index t * D + c of the code at each position of a head's packed code stream
    (before `_pack`), for K (`kind` "k") or V codes."""
    tile, g, j, chunk, r, e = _lane_pairs(b, d)
    if kind == "k":
        tok, ch = 16 * tile + g + 8 * (r & 1), 16 * chunk + 2 * j + 8 * (r >> 1) + e
    else:
        ch, tok = 16 * chunk + g + 8 * (r & 1), 16 * tile + 2 * j + 8 * (r >> 1) + e
    pairs_per_word = 16 // bits
    # Pair 4c + r of a lane goes to position word * pairs_per_word + slot of its run.
    order = torch.empty(d // 4, dtype=torch.long)
    for c in range(d // 16):
        for reg in range(4):
            word, slot = pair_slot(c, reg, d, bits)
            order[word * pairs_per_word + slot] = 4 * c + reg
    idx = (tok * d + ch).reshape(b // 16, 32, -1, 2)[:, :, order]
    idx = idx.reshape(b // 16, 32, -1, pairs_per_word, 2)
    return idx.transpose(-1, -2).reshape(-1)  # per word: first elements, then second elements


@functools.cache
def _k_param_channels(d: int) -> torch.Tensor:
    """Channel of each K (scale, zero) slot, [4 (j), D / 16, 2 (+0 | +8), 2]."""
    j = torch.arange(4).reshape(-1, 1, 1, 1)
    chunk = torch.arange(d // 16).reshape(1, -1, 1, 1)
    half = torch.arange(2).reshape(1, 1, -1, 1)
    e = torch.arange(2).reshape(1, 1, 1, -1)
    return 16 * chunk + 2 * j + 8 * half + e


@functools.cache
def _v_param_tokens(b: int) -> torch.Tensor:
    """Token of each V (scale, zero) slot, [B / 16, 4 (j), 2 (+0 | +8), 2]."""
    tile = torch.arange(b // 16).reshape(-1, 1, 1, 1)
    j = torch.arange(4).reshape(1, -1, 1, 1)
    half = torch.arange(2).reshape(1, 1, -1, 1)
    e = torch.arange(2).reshape(1, 1, 1, -1)
    return 16 * tile + 2 * j + 8 * half + e


def _pack_codes(codes: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """[H, B, D] codes -> the page section's bytes in fragment order."""
    h, b, d = codes.shape
    return _pack(codes.reshape(h, b * d)[:, code_order(kind, b, d, bits)], bits).reshape(-1)


def _unpack_codes(packed: torch.Tensor, kind: str, h: int, b: int, d: int, bits: int
                  ) -> torch.Tensor:
    out = torch.empty(h, b * d, dtype=torch.int32, device=packed.device)
    out[:, code_order(kind, b, d, bits).to(packed.device)] = _unpack(packed.reshape(h, -1), bits)
    return out.reshape(h, b, d)


def quantize_page(k: torch.Tensor, v: torch.Tensor, layout: PageLayout,
                  balance: torch.Tensor | None = None, e4m3_scales: bool = False) -> torch.Tensor:
    """One page's K and V [block_size, kv_heads, D] -> its lo page bytes [lo_page_bytes].

    `e4m3_scales` is a measurement aid for the quality harness: scales rounded up to
    float8-e4m3 values (still stored as fp16), to see what 1-byte scales would cost."""
    h, b, d, g, bits = (layout.num_kv_heads, layout.block_size, layout.head_size,
                        layout.value_group_size, layout.lo_bits)
    if k.shape != (b, h, d) or v.shape != (b, h, d):
        raise ValueError(f"quantize_page: expected K and V of shape {(b, h, d)}, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    kf = k.float().permute(1, 0, 2)  # [H, B, D]
    vf = v.float().permute(1, 0, 2)
    if balance is not None:
        kf = kf * balance.float().reshape(h, 1, d)
    outliers = []
    if layout.key_outliers:
        if e4m3_scales:
            raise ValueError("quantize_page: e4m3_scales and key outliers do not combine")
        k_codes, k_scale, k_zero, keep, fix = (
            t.squeeze(1) for t in quantize_with_outliers(kf.unsqueeze(1), bits, 2,
                                                         layout.outlier_slots))
        outliers = [_outlier_words(keep, fix).view(torch.uint8).reshape(-1)]
    else:
        k_codes, k_scale, k_zero = _quantize_groups(kf, bits, 1, e4m3_scales)  # over tokens
    vg = vf.reshape(h, b, d // g, g)
    v_codes, v_scale, v_zero = _quantize_groups(vg, bits, 3, e4m3_scales)    # over channels
    k_slots, v_slots = _k_param_channels(d), _v_param_tokens(b)

    def k_runs(x):  # [H, D] -> [H, 4, D / 16, 2, 2]
        return x.reshape(h, d)[:, k_slots]

    def v_runs(x):  # [H, B, D / g] -> [H, B / 16, D / g, 4, 2, 2]
        return x.reshape(h, b, d // g).transpose(1, 2)[:, :, v_slots].permute(0, 2, 1, 3, 4, 5)

    out = torch.cat([
        _pack_codes(k_codes, "k", bits),
        _pack_codes(v_codes.reshape(h, b, d), "v", bits),
        k_runs(k_scale).contiguous().view(torch.uint8).reshape(-1),
        v_runs(v_scale).contiguous().view(torch.uint8).reshape(-1),
        k_runs(k_zero).contiguous().view(torch.uint8).reshape(-1),
        v_runs(v_zero).contiguous().view(torch.uint8).reshape(-1),
        *outliers,
    ])
    assert out.numel() == layout.lo_page_bytes
    return out


def _outlier_words(keep: torch.Tensor, fix: torch.Tensor) -> torch.Tensor:
    """[H, B, D] mask and fp16 corrections -> [H, slots] int32 words, each head's in order of
    position t * D + c (low 16 bits), the correction's fp16 bits above it."""
    h = keep.shape[0]
    pos = keep.reshape(h, -1).nonzero()[:, 1].reshape(h, -1)  # ascending per head
    bits = fix.reshape(h, -1).gather(1, pos).view(torch.int16).to(torch.int32)
    return pos.to(torch.int32) | (bits << 16)


def _add_outliers(k: torch.Tensor, page: torch.Tensor, layout: PageLayout) -> torch.Tensor:
    """k [H, B, D] fp32 from the grid plus the page's exact key corrections."""
    o, h = layout.lo_offsets, layout.num_kv_heads
    words = page[o.k_outliers:o.end].contiguous().view(torch.int32).reshape(h, -1)
    fix = (words >> 16).to(torch.int16).view(torch.float16).float()
    return k.reshape(h, -1).scatter_add(1, (words & 0xFFFF).long(), fix).reshape(k.shape)


def dequantize_page(page: torch.Tensor, layout: PageLayout,
                    balance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lo page bytes -> (K, V) in fp32, each [block_size, kv_heads, D]."""
    h, b, d, g, bits = (layout.num_kv_heads, layout.block_size, layout.head_size,
                        layout.value_group_size, layout.lo_bits)
    o, dev = layout.lo_offsets, page.device
    k_codes = _unpack_codes(page[o.k_codes:o.v_codes], "k", h, b, d, bits).float()
    v_codes = _unpack_codes(page[o.v_codes:o.k_scales], "v", h, b, d, bits).float()
    k_slots, v_slots = _k_param_channels(d).to(dev), _v_param_tokens(b).to(dev)

    def k_params(lo_byte, hi_byte, dtype):  # -> [H, 1, D] fp32
        runs = page[lo_byte:hi_byte].contiguous().view(dtype).reshape(h, 4, d // 16, 2, 2)
        out = torch.empty(h, d, dtype=dtype, device=dev)
        out[:, k_slots] = runs
        return out.float().unsqueeze(1)

    def v_params(lo_byte, hi_byte, dtype):  # -> [H, B, D / g, 1] fp32
        runs = page[lo_byte:hi_byte].contiguous().view(dtype).reshape(h, b // 16, d // g, 4, 2, 2)
        out = torch.empty(h, d // g, b, dtype=dtype, device=dev)
        out[:, :, v_slots] = runs.permute(0, 2, 1, 3, 4, 5)
        return out.float().transpose(1, 2).unsqueeze(-1)

    k = (k_codes - k_params(o.k_zeros, o.v_zeros, torch.int8)) * k_params(
        o.k_scales, o.v_scales, torch.float16)
    if layout.key_outliers:
        k = _add_outliers(k, page, layout)
    v = ((v_codes.reshape(h, b, d // g, g) - v_params(o.v_zeros, o.k_outliers, torch.int8))
         * v_params(o.v_scales, o.k_zeros, torch.float16)).reshape(h, b, d)
    if balance is not None:
        k = k / balance.float().reshape(h, 1, d)
    return k.permute(1, 0, 2), v.permute(1, 0, 2)


def roundtrip_fp16_zero(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """A candidate lo format's round trip (measured in the harness, not stored): an fp16 zero
    at each group's minimum, so the grid's ends sit on the group's extremes."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(2.0 ** -14).half().float()
    zero = lo.half().float()
    return torch.round((x - zero) / scale).clamp(0, (1 << bits) - 1) * scale + zero


def select_outliers(x: torch.Tensor, dim: int, count: int) -> torch.Tensor:
    """x [H, P, ...] with quantization groups along `dim` -> a bool mask of the `count` elements
    per (head, page) that are kept exact: one at a time, a group's maximum or minimum, whichever
    shrinks its group's squared range most. Ties go to the first group, then the first element
    (argmax's), and the gains are plain fp32 products and differences: csrc/quantize.cu makes
    the same picks."""
    xs = x.float().movedim(dim, -1)
    shape = xs.shape
    xs = xs.reshape(shape[0], shape[1], -1, shape[-1])  # [H, P, groups, n]
    keep = torch.zeros(xs.shape, dtype=torch.bool, device=xs.device)
    inf = float("inf")
    for _ in range(count):
        top = torch.where(keep, -inf, xs)
        bottom = torch.where(keep, inf, xs)
        i_hi, i_lo = top.argmax(-1, keepdim=True), bottom.argmin(-1, keepdim=True)
        t0, b0 = top.gather(-1, i_hi), bottom.gather(-1, i_lo)
        t1 = top.scatter(-1, i_hi, -inf).amax(-1, keepdim=True)
        b1 = bottom.scatter(-1, i_lo, inf).amin(-1, keepdim=True)
        span, span_hi, span_lo = t0 - b0, t1 - b0, t0 - b1
        gain_hi = span * span - span_hi * span_hi  # the maximum taken out
        gain_lo = span * span - span_lo * span_lo  # the minimum taken out
        use_hi = gain_hi >= gain_lo
        gain = torch.where(use_hi, gain_hi, gain_lo).squeeze(-1)  # [H, P, groups]
        at = torch.where(use_hi, i_hi, i_lo).squeeze(-1)
        group = gain.argmax(-1, keepdim=True)
        flat = group * shape[-1] + at.gather(-1, group)
        keep.view(shape[0], shape[1], -1).scatter_(-1, flat, True)
    return keep.reshape(shape).movedim(-1, dim)


def quantize_with_outliers(x: torch.Tensor, bits: int, dim: int, count: int
                           ) -> tuple[torch.Tensor, ...]:
    """`_quantize_groups` of x [H, P, ...] with `count` elements per (head, page) kept exact
    (`select_outliers`): each group's grid spans what remains, and a kept element stores its
    fp16 correction from the grid (its code clamps to the grid's end). Returns codes, scales,
    zeros, the mask and the corrections (fp16, 0 elsewhere)."""
    keep = select_outliers(x, dim, count)
    inf = torch.tensor(float("inf"), device=x.device)
    lo = torch.where(keep, inf, x).amin(dim, keepdim=True)
    hi = torch.where(keep, -inf, x).amax(dim, keepdim=True)
    codes, scale, zero = _quantize_range(x, bits, dim, lo, hi, False)
    grid = _dequantize(codes, scale, zero)
    fix = torch.where(keep, x - grid, torch.zeros_like(grid)).half()
    return codes, scale, zero, keep, fix


def roundtrip_with_outliers(x: torch.Tensor, bits: int, dim: int, count: int) -> torch.Tensor:
    """What `quantize_with_outliers` stores of x, dequantized (fp32)."""
    codes, scale, zero, _, fix = quantize_with_outliers(x, bits, dim, count)
    return _dequantize(codes, scale, zero) + fix.float()


def roundtrip_pages(k: torch.Tensor, v: torch.Tensor, layout: PageLayout,
                    e4m3_scales: bool = False, k_zero_fp16: bool = False,
                    k_clip: tuple[float, ...] = (), v_clip: tuple[float, ...] = ()
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [kv_heads, pages * block_size, D] of whole pages -> what their lo pages hold
    (fp32, same shape): dequantize_page(quantize_page(...)) without the byte layout, for many
    pages at once (the quality harness demotes hundreds per step). `k_zero_fp16` measures the
    candidate format of `roundtrip_fp16_zero` for keys; `k_clip` / `v_clip` the clipped ranges
    of `_quantize_groups`. Exact key outliers where `layout.key_outliers` says so."""
    h, t, d = k.shape
    b, g, bits = layout.block_size, layout.value_group_size, layout.lo_bits

    def roundtrip(x, dim, clip):
        codes, scale, zero = _quantize_groups(x, bits, dim, e4m3_scales, clip)
        return _dequantize(codes, scale, zero)

    k_pages = k.float().reshape(h, t // b, b, d)
    if layout.key_outliers:
        dk = roundtrip_with_outliers(k_pages, bits, 2, layout.outlier_slots)
    elif k_zero_fp16:
        dk = roundtrip_fp16_zero(k_pages, bits, 2)
    else:
        dk = roundtrip(k_pages, 2, k_clip)
    dv = roundtrip(v.float().reshape(h, t // b, b, d // g, g), 4, v_clip)  # per token, group
    return dk.reshape(h, t, d), dv.reshape(h, t, d)


def quantization_error_bound(x_range: torch.Tensor, bits: int,
                             x_min: torch.Tensor | None = None) -> torch.Tensor:
    """Largest |x - dequant(x)| for a group spanning `x_range` (starting at `x_min`, whose
    offset can force a coarser step, see `_quantize_groups`): half a step (never finer than
    fp16's smallest normal), plus fp16 rounding of the scale (relative 2^-11, times the steps
    it multiplies)."""
    levels = (1 << bits) - 1
    step = (x_range / levels).clamp_min(2.0 ** -14)
    if x_min is not None:
        step = torch.maximum(torch.maximum(step, (-x_min).clamp_min(0) / 126),
                             x_min.clamp_min(0) / 127)
    return step / 2 + (x_range + (x_min.abs() if x_min is not None else 0)) * 2.0 ** -10 + 1e-6
