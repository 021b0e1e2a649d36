"""The lo page format and its torch reference: asymmetric 2-bit (or 4-bit) quantization of one
page (one vLLM block of one layer: all KV heads, K and V).

Keys are grouped per channel over the page's tokens (key outliers live in channels, as KIVI and
KVQuant observed); values are grouped per token over `value_group_size` channels. Codes are
packed token-major like hi rows, so a decode kernel reads a lo row where it would read a hi row.

Byte layout of a lo page (offsets: `PageLayout.lo_offsets`), all little-endian:
    K codes  [H, B, D * bits / 8]   element d of a row in byte d // (8 / bits), low bits first
    V codes  [H, B, D * bits / 8]
    K params [H, D, 2] fp16         (scale, zero): k = code * scale + zero
    V params [H, B, D / g, 2] fp16
With MiKV outlier balancing, K is multiplied per (head, channel) by `balance` before
quantization, and dequantized K is divided by it again (the kernel divides Q instead)."""
from __future__ import annotations

import torch

from mikv_vllm.layout import PageLayout


def e4m3_up(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float8-e4m3 value >= each (positive) scale, as fp32."""
    s = scale.float().clamp(2.0 ** -9, 448.0)
    q = s.to(torch.float8_e4m3fn)
    bump = q.float() < s
    return torch.where(bump, (q.view(torch.uint8) + 1).view(torch.float8_e4m3fn), q).float()


def _quantize_groups(x: torch.Tensor, bits: int, dim: int, e4m3_scales: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes and fp16 (scale, zero) of `x` with one group along `dim`."""
    levels = (1 << bits) - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    # Floor at fp16's smallest normal: a constant group must not divide by zero.
    scale = ((hi - lo) / levels).clamp_min(2.0 ** -14)
    # Rounded up, a coarser scale still spans the group (codes stay in range).
    scale = (e4m3_up(scale) if e4m3_scales else scale).half()
    zero = lo.half()
    codes = torch.round((x - zero.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


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
    k_codes, k_scale, k_zero = _quantize_groups(kf, bits, 1, e4m3_scales)    # over tokens
    vg = vf.reshape(h, b, d // g, g)
    v_codes, v_scale, v_zero = _quantize_groups(vg, bits, 3, e4m3_scales)    # over channels
    k_params = torch.stack([k_scale.reshape(h, d), k_zero.reshape(h, d)], dim=-1)
    v_params = torch.stack([v_scale.reshape(h, b, d // g), v_zero.reshape(h, b, d // g)], -1)
    out = torch.cat([
        _pack(k_codes, bits).reshape(-1),
        _pack(v_codes.reshape(h, b, d), bits).reshape(-1),
        k_params.contiguous().view(torch.uint8).reshape(-1),
        v_params.contiguous().view(torch.uint8).reshape(-1),
    ])
    assert out.numel() == layout.lo_page_bytes
    return out


def dequantize_page(page: torch.Tensor, layout: PageLayout,
                    balance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lo page bytes -> (K, V) in fp32, each [block_size, kv_heads, D]."""
    h, b, d, g, bits = (layout.num_kv_heads, layout.block_size, layout.head_size,
                        layout.value_group_size, layout.lo_bits)
    o = layout.lo_offsets
    row = d * bits // 8
    k_codes = _unpack(page[o.k_codes:o.v_codes].reshape(h, b, row), bits).float()
    v_codes = _unpack(page[o.v_codes:o.k_params].reshape(h, b, row), bits).float()
    k_params = page[o.k_params:o.v_params].contiguous().view(torch.float16).reshape(h, 1, d, 2)
    v_params = page[o.v_params:o.end].contiguous().view(torch.float16).reshape(h, b, d // g, 1, 2)
    k = k_codes * k_params[..., 0].float() + k_params[..., 1].float()
    v = (v_codes.reshape(h, b, d // g, g) * v_params[..., 0].float()
         + v_params[..., 1].float()).reshape(h, b, d)
    if balance is not None:
        k = k / balance.float().reshape(h, 1, d)
    return k.permute(1, 0, 2), v.permute(1, 0, 2)


def quantization_error_bound(x_range: torch.Tensor, bits: int) -> torch.Tensor:
    """Largest |x - dequant(x)| for a group spanning `x_range`: half a step, plus fp16 rounding
    of scale and zero (relative 2^-11 each, scaled by the codes they multiply)."""
    levels = (1 << bits) - 1
    step = x_range / levels
    return step / 2 + x_range * 2.0 ** -10 + 1e-6
