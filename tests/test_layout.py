"""Page byte layout, and the mikv cache as vLLM's V2 runner allocates and views it."""
from __future__ import annotations

import pytest
import torch

from mikv_vllm.integration.attention.backend import MikvAttentionBackend
from mikv_vllm.layout import split_kv_cache
from mikv_vllm.layout import PageLayout, decode_entry, encode_lo


# --- head_dim 128, block 32, one KV head: codes, fp16 scales, int8 zero points -----------------

def test_design_numbers_bf16():
    layout = PageLayout(block_size=32, num_kv_heads=1, head_size=128, hi_elem_bytes=2)
    assert layout.hi_page_bytes == 16384
    # K/V codes, K scales (per channel), V scales (per token x 2 groups), then the zeros
    assert layout.lo_page_bytes == 1024 + 1024 + 256 + 128 + 128 + 64 == 2624
    assert layout.pack_factor == 6
    assert layout.bytes_per_token(lo=False) == 512
    assert layout.bytes_per_token(lo=True) == pytest.approx(16384 / 6 / 32)


def test_design_numbers_fp8():
    layout = PageLayout(block_size=32, num_kv_heads=1, head_size=128, hi_elem_bytes=1)
    assert layout.hi_page_bytes == 8192
    assert layout.lo_page_bytes == 2624
    assert layout.pack_factor == 3


def test_block_16_packs_five():
    """The default block size: 5 lo pages per bf16 block (4 with fp16 zero points)."""
    layout = PageLayout(block_size=16, num_kv_heads=8, head_size=128, hi_elem_bytes=2)
    assert layout.lo_page_bytes == 8 * (512 + 512 + 256 + 64 + 128 + 32)
    assert layout.pack_factor == 5


def test_four_bit_pages():
    layout = PageLayout(block_size=32, num_kv_heads=1, head_size=128, hi_elem_bytes=2, lo_bits=4)
    assert layout.lo_page_bytes == 4096 + 256 + 128 + 128 + 64
    assert layout.pack_factor == 3


@pytest.mark.parametrize("block_size,heads,head_size,group", [
    (16, 1, 64, 64), (32, 8, 128, 32), (64, 2, 256, 128), (128, 4, 64, 32)])
def test_pack_fits_in_a_block(block_size, heads, head_size, group):
    layout = PageLayout(block_size, heads, head_size, hi_elem_bytes=2, value_group_size=group)
    assert layout.pack_factor >= 1
    assert layout.pack_factor * layout.lo_page_bytes <= layout.hi_page_bytes
    assert (layout.pack_factor + 1) * layout.lo_page_bytes > layout.hi_page_bytes


def test_group_must_divide_head_size():
    with pytest.raises(ValueError, match="value_group_size 128 must divide head_size 64"):
        PageLayout(block_size=16, num_kv_heads=1, head_size=64, hi_elem_bytes=2,
                   value_group_size=128)


def test_describe_prints_ratios():
    text = PageLayout(block_size=32, num_kv_heads=1, head_size=128, hi_elem_bytes=2).describe()
    assert "hi page 16384 B" in text
    assert "2-bit lo page 2624 B" in text
    assert "6 lo pages per block" in text
    assert "6.00x fewer than bf16" in text
    assert "3.00x fewer than fp8" in text
    assert "\n" not in text


# --- block-table codes ----------------------------------------------------------------------------

@pytest.mark.parametrize("pack_factor", [1, 2, 5, 6, 11])
def test_lo_codes_round_trip(pack_factor):
    seen = set()
    for block in range(40):
        for slot in range(pack_factor):
            code = encode_lo(block, slot, pack_factor)
            assert code < 0
            assert decode_entry(code, pack_factor) == (block, slot)
            seen.add(code)
    assert len(seen) == 40 * pack_factor
    assert max(seen) == -1  # the codes are dense: -1, -2, ...


@pytest.mark.parametrize("entry", [0, 1, 7, 12345])
def test_hi_entries_decode_to_slot_minus_one(entry):
    assert decode_entry(entry, 5) == (entry, -1)


@pytest.mark.parametrize("slot", [-1, 5])
def test_slot_outside_pack(slot):
    with pytest.raises(ValueError, match="outside a pack of 5"):
        encode_lo(3, slot, 5)


def test_two_tiers_keep_their_own_packs_and_codes():
    """A 4-bit middle tier packs 3 pages per block at block 16 (bf16 hi), the 2-bit tier 5;
    a code names its tier, and entries of both tiers never collide."""
    layout = PageLayout(block_size=16, num_kv_heads=2, head_size=128, hi_elem_bytes=2,
                        mid_bits=4)
    assert (layout.mid.lo_bits, layout.mid.pack_factor, layout.pack_factor) == (4, 3, 5)
    assert layout.tier(False) == PageLayout(16, 2, 128, 2)
    seen = set()
    for mid in (False, True):
        tier = layout.tier(mid)
        for block in range(30):
            for slot in range(tier.pack_factor):
                entry = -1 - layout.lo_code(block, slot, mid)
                assert entry < 0 and layout.locate(entry) == (block, slot, tier)
                seen.add(entry)
    assert len(seen) == 30 * (3 + 5)
    assert layout.lo_code(2, 1) == 2 * 5 + 1  # the 2-bit tier keeps the one-tier codes
    assert "4-bit mid page" in layout.describe() and "3 per block" in layout.describe()
    with pytest.raises(ValueError, match="outside a pack of 3"):
        layout.lo_code(0, 3, mid=True)
    with pytest.raises(ValueError, match="no middle tier"):
        PageLayout(16, 2, 128, 2).lo_code(0, 0, mid=True)


@pytest.mark.parametrize("mid_bits,lo_bits", [(2, 4), (4, 4), (8, 2)])
def test_a_middle_tier_is_4_bit_before_2_bit(mid_bits, lo_bits):
    with pytest.raises(ValueError, match="must be 4-bit pages before 2-bit"):
        PageLayout(16, 2, 128, 2, lo_bits=lo_bits, mid_bits=mid_bits)


# --- the cache tensor as vLLM allocates it ------------------------------------------------------

CACHES = [
    # block_size, kv heads, head_size, vLLM cache dtype, PageLayout element bytes
    (16, 2, 64, torch.bfloat16, 2),
    (32, 1, 128, torch.bfloat16, 2),
    (32, 8, 128, torch.uint8, 1),   # fp8 caches are uint8 tensors in vLLM
    (16, 4, 256, torch.float16, 2),
]


def _allocate(num_blocks, block_size, heads, head_size, dtype):
    """vLLM's V2 runner: one int8 buffer per layer, viewed with the backend's shape and stride
    order by vllm.v1.worker.gpu.attn_utils._reshape_attention_kv_cache."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode
    from vllm.v1.worker.gpu.attn_utils import _reshape_attention_kv_cache

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=heads, head_size=head_size,
                             dtype=dtype,
                             kv_quant_mode=get_kv_quant_mode("fp8" if dtype == torch.uint8
                                                             else "auto"))
    raw = torch.zeros(num_blocks * spec.page_size_bytes, dtype=torch.int8)
    shape = MikvAttentionBackend.get_kv_cache_shape(num_blocks, block_size, heads, head_size)
    order = MikvAttentionBackend.get_kv_cache_stride_order()
    assert len(order) == len(shape)
    kv = _reshape_attention_kv_cache(raw, spec, shape, order, num_blocks, None)
    return spec, raw, kv


@pytest.mark.parametrize("block_size,heads,head_size,dtype,elem_bytes", CACHES)
def test_vllm_page_size_is_hi_page(block_size, heads, head_size, dtype, elem_bytes):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=heads, head_size=head_size,
                             dtype=dtype)
    layout = PageLayout(block_size, heads, head_size, hi_elem_bytes=elem_bytes)
    assert spec.page_size_bytes == layout.hi_page_bytes


@pytest.mark.parametrize("block_size,heads,head_size,dtype,elem_bytes", CACHES)
def test_one_block_is_one_contiguous_page(block_size, heads, head_size, dtype, elem_bytes):
    num_blocks = 5
    layout = PageLayout(block_size, heads, head_size, hi_elem_bytes=elem_bytes)
    spec, raw, kv = _allocate(num_blocks, block_size, heads, head_size, dtype)
    assert spec.page_size_bytes == layout.hi_page_bytes
    assert raw.numel() == num_blocks * layout.hi_page_bytes
    assert kv.shape == (num_blocks, heads, block_size, 2 * head_size)
    assert kv.data_ptr() == raw.data_ptr()
    # Logical [blocks, heads, tokens, 2D], physical [blocks, tokens, heads, 2D] (NHD).
    assert kv.stride() == (block_size * heads * 2 * head_size, 2 * head_size,
                           heads * 2 * head_size, 1)
    pages = raw.view(num_blocks, layout.hi_page_bytes)
    for block in range(num_blocks):
        kv[block].view(torch.int8).fill_(1)  # every byte of the logical block
        touched = (pages != 0).all(dim=1)
        assert touched[:block + 1].all() and not touched[block + 1:].any(), (
            f"block {block} is not exactly bytes [{block} * page, {block + 1} * page)")


@pytest.mark.parametrize("block_size,heads,head_size,dtype,elem_bytes", CACHES)
def test_split_kv_cache_rows_are_k_then_v(block_size, heads, head_size, dtype, elem_bytes):
    num_blocks = 3
    _, raw, kv = _allocate(num_blocks, block_size, heads, head_size, dtype)
    k, v = split_kv_cache(kv, head_size)
    assert k.shape == v.shape == (num_blocks, block_size, heads, head_size)
    row = heads * 2 * head_size
    assert k.stride() == v.stride() == (block_size * row, row, 2 * head_size, 1)
    assert v.data_ptr() - k.data_ptr() == head_size * elem_bytes
    # Byte check: token t, head h of block b is row (t * heads + h) of the page, K then V.
    values = torch.arange(kv.numel()).reshape(kv.shape)
    kv.copy_((values % 97).to(kv.dtype))
    page_rows = kv.permute(0, 2, 1, 3).reshape(num_blocks, block_size, heads, 2 * head_size)
    b, t, h = num_blocks - 1, block_size - 1, heads - 1
    assert torch.equal(k[b, t, h], page_rows[b, t, h, :head_size])
    assert torch.equal(v[b, t, h], page_rows[b, t, h, head_size:])
    elem = raw.view(kv.dtype).view(num_blocks, block_size, heads, 2 * head_size)
    assert torch.equal(elem[b, t, h, :head_size], k[b, t, h])
    assert torch.equal(elem[b, t, h, head_size:], v[b, t, h])


def test_backend_rejects_block_sizes_not_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        MikvAttentionBackend.get_kv_cache_shape(4, 24, 2, 64)


def test_backend_declares_what_vllm_validates():
    from vllm.v1.attention.backend import MultipleOf

    sizes = MikvAttentionBackend.get_supported_kernel_block_sizes()
    assert len(sizes) == 1 and isinstance(sizes[0], MultipleOf) and sizes[0].base == 16
    assert MikvAttentionBackend.supports_head_size(128)
    assert not MikvAttentionBackend.supports_head_size(32)
    assert MikvAttentionBackend.forward_includes_kv_cache_update is False


def test_layout_from_engine_config(serve_engine_config):
    """The layout mikv prints at startup is vLLM's page for the tiny model's KV heads."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from mikv_vllm.integration import patches
    from mikv_vllm.config import MikvConfig

    _, cfg = serve_engine_config("--kv-cache-dtype", "mikv", "--block-size", "32")
    layout = patches.check_model_and_device(cfg, MikvConfig())
    assert (layout.block_size, layout.num_kv_heads, layout.head_size) == (32, 2, 64)
    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    assert layout.hi_page_bytes == spec.page_size_bytes == 16384


def test_key_outliers_reach_the_layout_and_oversized_pages_stop_at_startup(serve_engine_config):
    """`key_outliers` makes the engine's lo pages keep exact keys (at block 32, head size 64:
    16 per head, 64 more bytes each, which costs a slot: 5 per block instead of 6; at block
    16 and head size 128 it costs none); a page per head larger than the quantize kernel
    stages is refused with the block size that fits."""
    from mikv_vllm.integration import patches
    from mikv_vllm.config import MikvConfig, MikvConfigError

    _, cfg = serve_engine_config("--kv-cache-dtype", "mikv", "--block-size", "32")
    plain = patches.check_model_and_device(cfg, MikvConfig())
    layout = patches.check_model_and_device(cfg, MikvConfig(key_outliers=True))
    assert layout.outlier_slots == 16 and plain.outlier_slots == 0
    assert layout.lo_page_bytes == plain.lo_page_bytes + 2 * 16 * 4
    assert (layout.pack_factor, plain.pack_factor) == (5, 6)
    assert (PageLayout(16, 8, 128, 2, key_outliers=True).pack_factor
            == PageLayout(16, 8, 128, 2).pack_factor == 5)
    with pytest.raises(MikvConfigError, match="use --block-size 128 or less"):
        serve_engine_config("--kv-cache-dtype", "mikv", "--block-size", "256")


def test_startup_hint_names_the_smallest_block_size_that_packs_more():
    from mikv_vllm.integration.patches import _better_block_size

    hint = _better_block_size(PageLayout(16, 8, 128, 2))   # 5 per block at 16 tokens
    assert (hint.block_size, hint.pack_factor) == (32, 6)
    assert _better_block_size(PageLayout(64, 8, 128, 2)) is None


def test_the_backend_view_has_the_layouts_shape():
    """The kernels read a layer's keys as [blocks, block_size, kv_heads, D] with the spec's
    element size: the PageLayout the worker derives from the spec describes that view."""
    from mikv_vllm.layout import split_kv_cache

    for dtype, elem in ((torch.bfloat16, 2), (torch.uint8, 1)):
        kv_cache = torch.zeros(5, 4, 32, 2 * 128, dtype=dtype)  # logical [blocks, H, B, 2D]
        key_cache, _ = split_kv_cache(kv_cache, 128)
        layout = PageLayout(32, 4, 128, elem, 2, 64)
        assert key_cache.shape[1:] == (layout.block_size, layout.num_kv_heads,
                                       layout.head_size)
        assert key_cache.element_size() == layout.hi_elem_bytes
