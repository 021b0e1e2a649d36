"""The Python side of mikv_vllm.ops: split heuristics, argument checks, kernel loading."""
from __future__ import annotations

import inspect
import itertools
import sys

import pytest
import torch

from mikv_vllm import ops

SHAPES = list(itertools.product([0, 1, 2, 3, 7, 16, 64, 256, 1024],  # sequences
                                [1, 2, 4, 8],                         # KV heads
                                [1, 2, 4, 6, 8, 16],                  # GQA group
                                [1, 78, 108, 132]))                   # SMs


def test_num_splits_in_range():
    for shape in SHAPES:
        for ctas_per_sm in (1, 2, 3, 4):
            splits = ops.decode_num_splits(*shape, ctas_per_sm)
            assert isinstance(splits, int) and 1 <= splits <= ops.MAX_SPLITS == 64, (shape, splits)


def wave_use(ctas: int, splits: int, capacity: int) -> float:
    """Share of the launched waves' CTA slots that hold work."""
    return ctas * splits / (-(-ctas * splits // capacity) * capacity)


def test_num_splits_fills_whole_waves():
    """The grid never wastes more of its waves than one split would, and a small batch fills
    at least half a wave."""
    for (seqs, heads, group, sms), per_sm in itertools.product(SHAPES, (2, 3, 4)):
        if not seqs:
            continue
        ctas, capacity = seqs * heads * -(-group // 8), sms * per_sm
        splits = ops.decode_num_splits(seqs, heads, group, sms, per_sm)
        assert wave_use(ctas, splits, capacity) >= min(wave_use(ctas, 1, capacity), 0.5) - 1e-9
        if ctas * ops.MAX_SPLITS >= capacity:
            assert ctas * splits >= capacity / 2, (seqs, heads, group, sms, per_sm, splits)


def test_num_splits_at_measured_shapes():
    """H200 (132 SMs), 8 KV heads: GQA 4 runs 3 CTAs per SM, GQA 8 runs 2."""
    assert ops.decode_num_splits(16, 8, 4, 132, 3) == 3   # 384 of 396 slots
    assert ops.decode_num_splits(16, 8, 8, 132, 2) == 2   # 256 of 264 (3 splits: 1.45 waves)
    assert ops.decode_num_splits(64, 8, 4, 132, 3) == 3   # 1536 of 1584 (1 split: 1.29 waves)
    assert ops.decode_num_splits(1, 1, 1, 132) == 64
    assert ops.decode_num_splits(1, 8, 4, 132) > 1
    assert ops.decode_num_splits(1024, 8, 4, 132, 3) <= 2


def test_empty_gate_only_where_it_costs_less_than_the_launches():
    """H100, 8 KV heads, GQA 4 (3 CTAs per SM): the gate skips split decode's empty lo pass from
    batch 64 (3 splits, 1,536 CTAs), not at 32 (768), nor at 96 (one split: no reduce)."""
    def pays(seqs):
        return ops.empty_gate_pays(seqs, 8, 4, ops.decode_num_splits(seqs, 8, 4, 132, 3))

    assert [pays(b) for b in (16, 32, 64, 96, 128, 256)] == [False, False, True, False, True,
                                                             True]
    assert not ops.empty_gate_pays(4096, 8, 4, 1)


def test_num_splits_depends_only_on_batch_shape():
    """One value per captured CUDA graph: no sequence length or content enters the choice."""
    assert list(inspect.signature(ops.decode_num_splits).parameters) == [
        "num_seqs", "num_kv_heads", "group", "num_sms", "ctas_per_sm"]
    for shape in SHAPES[::7]:
        assert ops.decode_num_splits(*shape) == ops.decode_num_splits(*shape)


# --- paged_decode argument checks -------------------------------------------------------------

class KernelsTouched(Exception):
    pass


@pytest.fixture
def no_kernels(monkeypatch):
    """Fail loudly if a call gets as far as loading the kernels."""
    def touched():
        raise KernelsTouched
    monkeypatch.setattr(ops, "load_kernels", touched)


def decode_args(*, seqs=3, q_heads=8, kv_heads=2, head_dim=64, block_size=16, blocks=10,
                pages=4, table_dtype=torch.int32, lens_dtype=torch.int32, q_dims=3):
    kv = torch.zeros(blocks, block_size, kv_heads, 2 * head_dim, dtype=torch.bfloat16)
    k_cache, v_cache = kv.split(head_dim, dim=-1)
    query = torch.zeros(seqs, q_heads, head_dim, dtype=torch.bfloat16)
    if q_dims == 2:
        query = query.flatten(1)
    out = torch.zeros_like(query)
    table = torch.zeros(seqs, pages, dtype=table_dtype)
    lens = torch.ones(seqs, dtype=lens_dtype)
    return out, query, k_cache, v_cache, table, lens


@pytest.mark.parametrize("kwargs,extra,match", [
    ({"q_dims": 2}, {}, r"query must be 3-D and caches 4-D"),
    ({"q_heads": 6, "kv_heads": 4}, {}, r"head_dim, GQA"),
    ({"table_dtype": torch.int64}, {}, r"must be int32"),
    ({"lens_dtype": torch.int64}, {}, r"must be int32"),
    ({}, {"num_splits": 0}, r"num_splits must be in \[1, 64\]"),
    ({}, {"num_splits": 65}, r"num_splits must be in \[1, 64\]"),
    # split decode's merge: FlashAttention's lse is [q_heads, rows], not [rows, q_heads]
    ({}, {"merge_lse": torch.zeros(3, 8)}, r"merge_lse must be \[q_heads, >= seqs\]"),
    ({}, {"merge_lse": torch.zeros(8, 2)}, r"merge_lse must be \[q_heads, >= seqs\]"),
    ({}, {"skip_empty": True}, r"skip_empty needs merge_lse"),
    ({}, {"skip_empty": True, "merge_lse": torch.zeros(8, 3), "lse": torch.zeros(3, 8)},
     r"skip_empty needs merge_lse and neither lse nor slab_lse"),
])
def test_paged_decode_rejects_bad_arguments(no_kernels, kwargs, extra, match):
    with pytest.raises(ValueError, match=match):
        ops.paged_decode(*decode_args(**kwargs), 0.125, **extra)


def test_paged_decode_rejects_3d_cache(no_kernels):
    out, query, k_cache, v_cache, table, lens = decode_args()
    with pytest.raises(ValueError, match=r"query must be 3-D and caches 4-D"):
        ops.paged_decode(out, query, k_cache[0], v_cache[0], table, lens, 0.125)


def test_paged_decode_rejects_head_dim_mismatch(no_kernels):
    out, query, _, _, table, lens = decode_args(head_dim=64)
    _, _, k_cache, v_cache, _, _ = decode_args(head_dim=128)
    with pytest.raises(ValueError, match=r"head_dim, GQA"):
        ops.paged_decode(out, query, k_cache, v_cache, table, lens, 0.125)


def test_paged_decode_valid_arguments_reach_the_kernels(no_kernels):
    with pytest.raises(KernelsTouched):
        ops.paged_decode(*decode_args(), 0.125, num_splits=4)


# --- missing extension ------------------------------------------------------------------------

def test_missing_extension_names_the_build_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mikv_vllm._C", None)  # `import mikv_vllm._C` now fails
    ops.load_kernels.cache_clear()
    try:
        with pytest.raises(ops.KernelsUnavailableError,
                           match=r"pip install --no-build-isolation") as excinfo:
            ops.load_kernels()
        assert isinstance(excinfo.value, ImportError)
        assert "mikv_vllm._C" in str(excinfo.value)
        # The failure is not cached: a later call tries again.
        with pytest.raises(ops.KernelsUnavailableError):
            ops.load_kernels()
    finally:
        ops.load_kernels.cache_clear()


def test_paged_decode_without_extension_raises_kernels_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "mikv_vllm._C", None)
    ops.load_kernels.cache_clear()
    try:
        with pytest.raises(ops.KernelsUnavailableError, match=r"--no-build-isolation"):
            ops.paged_decode(*decode_args(), 0.125)
    finally:
        ops.load_kernels.cache_clear()


# --- callers stay in step with the wrappers ------------------------------------------------------

def _ops_calls():
    """Every `ops.<function>(...)` call in the mikv_vllm package, as (file:line, name, node)."""
    import ast
    from pathlib import Path

    import mikv_vllm

    root = Path(mikv_vllm.__file__).parent
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ops"):
                yield f"{path.relative_to(root)}:{node.lineno}", node.func.attr, node


def test_package_calls_bind_to_ops_signatures():
    import ast

    calls = list(_ops_calls())
    assert any(name == "paged_decode" for _, name, _ in calls), "no caller of ops.paged_decode?"
    for where, name, node in calls:
        func = getattr(ops, name, None)
        assert callable(func), f"{where} calls ops.{name}, which does not exist"
        if any(isinstance(a, ast.Starred) for a in node.args) or any(
                k.arg is None for k in node.keywords):
            continue  # *args / **kwargs: cannot bind statically
        args = [object()] * len(node.args)
        kwargs = {k.arg: object() for k in node.keywords}
        try:
            inspect.signature(func).bind(*args, **kwargs)
        except TypeError as e:
            raise AssertionError(f"{where}: ops.{name} call does not fit its signature: {e}")


# --- the built extension's schemas ------------------------------------------------------------

@pytest.fixture
def kernels():
    """The compiled ops, where this checkout has them (pip install builds them, GPU or not)."""
    try:
        ops.load_kernels()
    except ops.KernelsUnavailableError as e:
        pytest.skip(f"extension not built: {e}")


def _reaches_cuda_dispatch(call):
    """The wrappers' arguments fit the registered schema: with CPU tensors the call gets past
    schema binding and stops at the missing CPU kernel."""
    with pytest.raises(NotImplementedError, match=r"CPU"):
        call()


def test_extension_schemas_fit_the_wrappers(kernels):
    from mikv_vllm.layout import PageLayout

    out, query, k_cache, v_cache, table, lens = decode_args(head_dim=128)
    layout = PageLayout(16, 2, 128, 2)
    lse = torch.zeros(3, 8)
    slab_lse = torch.zeros(10, ops.slabs_per_block(16, 128), 8)
    gate = torch.ones(1, dtype=torch.int32)
    _reaches_cuda_dispatch(lambda: ops.paged_decode(
        out, query, k_cache, v_cache, table, lens, 0.125, 1.0, 1.0, 2, layout, lse, slab_lse,
        gate))
    _reaches_cuda_dispatch(lambda: ops.paged_decode(
        out, query, k_cache, v_cache, table, lens, 0.125, 1.0, 1.0, 2, layout,
        merge_lse=torch.zeros(8, 3), skip_empty=True))
    _reaches_cuda_dispatch(lambda: ops.page_mass(
        torch.zeros(10), slab_lse, table, lens, lse, 16, 2, 0.5))
    _reaches_cuda_dispatch(lambda: ops.quantize_pages(
        k_cache, v_cache, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
        layout))
