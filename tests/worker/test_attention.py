"""Single-query attention: the CPU's low-precision path against fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.attention import _attend_one_query


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True], ids=["same length", "ragged"])
def test_low_precision_single_query_matches_fp32(dtype, masked):
    """Rows of different lengths (keys past each row's own masked off), grouped
    query heads: the matrix-product path gives fp32's answer to within the
    dtype's rounding, and masked keys get no weight at all."""
    torch.manual_seed(0)
    rows, heads, kv_heads, num_keys, head_dim = 5, 6, 2, 37, 16
    q = torch.randn(rows, heads, head_dim).to(dtype)
    keys = torch.randn(rows, kv_heads, num_keys, head_dim).to(dtype)
    values = torch.randn(rows, kv_heads, num_keys, head_dim).to(dtype)
    mask = None
    if masked:
        lengths = torch.tensor([37, 1, 20, 36, 9])
        mask = (torch.arange(num_keys)[None] < lengths[:, None])[:, None, None]
        # Garbage past each row's length must not leak into its output.
        values = values.masked_fill(~mask[:, :, 0, :, None].expand_as(values), 1e4)

    got = _attend_one_query(q, keys, values, mask, 0.25)
    expected = F.scaled_dot_product_attention(
        q.float()[:, :, None],
        keys.float(),
        values.float(),
        attn_mask=mask,
        scale=0.25,
        enable_gqa=True,
    )[:, :, 0]
    assert got.dtype == dtype and got.shape == (rows, heads, head_dim)
    tolerance = 2**-6 if dtype == torch.bfloat16 else 2**-9
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


def test_fp16_scores_beyond_the_dtype_range_before_scaling_stay_finite():
    """q . k here is 102,400, over fp16's 65,504; scaled first, it is 12,800."""
    q = torch.full((1, 2, 64), 40.0, dtype=torch.float16)
    keys = torch.full((1, 1, 3, 64), 40.0, dtype=torch.float16)
    values = torch.arange(3.0).repeat_interleave(64).view(1, 1, 3, 64).half()
    got = _attend_one_query(q, keys, values, None, 64**-0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), torch.full((1, 2, 64), 1.0))
