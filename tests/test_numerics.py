"""Rounding float64 results once: correct even where PyTorch's cast rounds twice."""

import pytest
import torch

from dmerge.numerics import round_to, widen


@pytest.mark.parametrize("dtype,mant", [(torch.bfloat16, 8), (torch.float16, 11)])
@pytest.mark.parametrize("side", [1, -1])
def test_values_just_off_a_midpoint_round_to_the_nearer_neighbour(dtype, mant, side):
    g = torch.Generator().manual_seed(1)
    lo = torch.randn(200_000, generator=g).to(dtype).double()
    lo = lo[(lo.abs() > 1e-3) & (lo.abs() != torch.pow(2.0, torch.floor(torch.log2(lo.abs()))))]
    ulp = torch.pow(2.0, torch.floor(torch.log2(lo.abs())) - (mant - 1))
    hi = lo + ulp
    # 2^-30 of an ulp off the midpoint: float32 cannot see the difference, float64 can
    offset = (0.5 + torch.rand(lo.shape, generator=g, dtype=torch.float64)) * ulp * 2.0**-30
    x = lo + ulp / 2 + side * offset
    expected = hi if side > 0 else lo
    naive_wrong = int((x.to(dtype).double() != expected).sum())
    assert naive_wrong > 0.3 * len(x)  # the double-rounding problem is real
    assert torch.equal(round_to(x, dtype).double(), expected)


def test_round_to_float32_and_same_dtype():
    x = torch.tensor([1.0 + 2.0**-30, -3.5], dtype=torch.float64)
    assert torch.equal(round_to(x, torch.float32), x.to(torch.float32))
    assert round_to(x, torch.float64) is x


def test_widen_is_exact():
    b = torch.randn(1000).to(torch.bfloat16)
    assert torch.equal(widen(b, torch.float64).to(torch.bfloat16), b)
    assert widen(b, torch.float64).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_count_nonfinite_every_16_bit_pattern(dtype):
    from dmerge.numerics import count_nonfinite

    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    expected = int((~torch.isfinite(patterns)).sum())
    assert expected > 0
    assert count_nonfinite(patterns) == expected
    for part in torch.split(patterns, 4099):  # pieces with and without specials
        assert count_nonfinite(part) == int((~torch.isfinite(part)).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_count_nonfinite_wide_types(dtype):
    from dmerge.numerics import count_nonfinite

    g = torch.Generator().manual_seed(3)
    t = torch.randn(10_000, generator=g, dtype=torch.float64).to(dtype)
    assert count_nonfinite(t) == 0
    t[[5, 77, 9000]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    assert count_nonfinite(t) == 3
    assert count_nonfinite(t[::2]) == int((~torch.isfinite(t[::2])).sum())  # non-contiguous
    assert count_nonfinite(torch.arange(5)) == 0
