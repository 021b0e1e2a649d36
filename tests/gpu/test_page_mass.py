"""Per-page attention mass (decode kernel lse + page_mass over the keys, GPU only) against the
torch reference."""
from __future__ import annotations

import math

import pytest
import torch

from mikv_vllm import ops, reference
from mikv_vllm.layout import PageLayout, encode_lo
from mikv_vllm.quant import quantize_page

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("group,head_dim", [(4, 128), (1, 64), (8, 128)])
def test_page_mass_matches_reference(splits, group, head_dim):
    gen = torch.Generator().manual_seed(splits * 100 + group + head_dim)
    bs, heads, seqs = 16, 2, 3
    layout = PageLayout(bs, heads, head_dim, 2)
    n = layout.pack_factor
    lens = torch.tensor([300, 17, 160])
    pages = ((lens + bs - 1) // bs).tolist()
    total = sum(pages)
    num_blocks = total + total // n + 2
    kv = torch.randn(num_blocks, bs, heads, 2 * head_dim, generator=gen).to(torch.bfloat16).cuda()
    k, v = kv.split(head_dim, dim=-1)
    raw = kv.view(torch.uint8).reshape(num_blocks, -1)
    table = torch.zeros(seqs, max(pages), dtype=torch.int32)
    code, used = total * n, 0
    for i, p in enumerate(pages):
        for j in range(p):
            table[i, j] = used
            if j % 3 == 1:  # every third page lo
                pack, slot = divmod(code, n)
                page = quantize_page(k[used].float().cpu(), v[used].float().cpu(), layout)
                raw[pack, slot * layout.lo_page_bytes:(slot + 1) * layout.lo_page_bytes] = page.cuda()
                table[i, j] = encode_lo(pack, slot, n)
                code += 1
            used += 1
    table_d, lens_d = table.cuda(), lens.to(torch.int32).cuda()
    q = torch.randn(seqs, heads * group, head_dim, generator=gen).to(torch.bfloat16).cuda()
    scale = 1 / math.sqrt(head_dim)
    lse = torch.full((seqs, heads * group), float("nan"), device="cuda")
    out = torch.empty_like(q)
    ops.paged_decode(out, q, k, v, table_d, lens_d, scale, 1.0, 1.0, splits, layout, lse)
    mass = torch.zeros(num_blocks, device="cuda")
    ops.page_mass(mass, q, k, table_d, lens_d, lse, scale, weight=1.0 / heads)

    want = torch.zeros(num_blocks)
    k_all, v_all = reference.cache_to_float(k).cpu(), reference.cache_to_float(v).cpu()
    for i in range(seqs):
        kk, _ = reference.gather_kv(k_all, v_all, table[i], int(lens[i]), raw.cpu(), layout)
        for h in range(heads):
            qh = q[i, h * group:(h + 1) * group].float().cpu()
            probs = (qh @ kk[:, h].T * scale).softmax(-1)
            for p, m in enumerate(reference.page_mass(probs, bs).tolist()):
                if table[i, p] >= 0:
                    want[table[i, p]] += m / heads
    assert torch.allclose(mass.cpu(), want, atol=2e-3), (mass.cpu() - want).abs().max()
