"""The PyTorch reference quantization against independent oracles: scale, data, layout, edges."""

import pytest
import torch
from f8utils import FLOAT8_DTYPES, HP_DTYPES, nearest_float8, spanning_values

from f8tensor.kernels import EPS, fp8_max, quantize_ref, scale_from_amax_ref

SHAPES = [(17, 48), (1, 16), (4096, 16), (64, 1)]


def expected_scale(x: torch.Tensor, float8_dtype) -> torch.Tensor:
    """fp8_max / amax in float64, rounded once to fp32 (exact: 53 >= 2*24 + 2 bits), inverted."""
    amax = max(x.abs().max().double().item(), EPS)
    multiplier = torch.tensor(fp8_max(float8_dtype) / amax, dtype=torch.float64).float()
    return multiplier, torch.tensor(1.0 / multiplier.double().item()).float()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hp_dtype", HP_DTYPES)
@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES)
def test_scale_and_data_match_oracle(shape, hp_dtype, float8_dtype):
    x = (torch.randn(shape) * 3).to(hp_dtype)
    row, col, scale = quantize_ref(x, float8_dtype, "both")
    multiplier, want_scale = expected_scale(x, float8_dtype)
    assert scale.dtype == torch.float32 and scale.shape == ()
    assert torch.equal(scale, want_scale)
    y = (x.float() * multiplier).clamp(-fp8_max(float8_dtype), fp8_max(float8_dtype))
    assert torch.equal(row.float(), nearest_float8(y, float8_dtype).float().view(shape))
    assert torch.equal(col.float(), row.float())


@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES)
def test_values_spanning_the_range_round_to_nearest_even(float8_dtype):
    x = spanning_values((257, 96), torch.float32, device="cpu")
    row, _, scale = quantize_ref(x, float8_dtype, "row")
    multiplier, _ = scale_from_amax_ref(x.abs().amax(), float8_dtype)
    want = nearest_float8((x * multiplier).clamp(-fp8_max(float8_dtype), fp8_max(float8_dtype)), float8_dtype)
    assert torch.equal(row.float().flatten(), want.float())
    assert row.float().abs().max() == fp8_max(float8_dtype)  # the amax element lands on fp8_max
    assert (row.float() == 0).any() and (row.float().abs() < 2 ** -6).any()  # subnormals reached


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["row", "col", "both"])
def test_layouts_and_strides(shape, layout):
    M, N = shape
    x = torch.randn(shape, dtype=torch.bfloat16)
    row, col, _ = quantize_ref(x, torch.float8_e4m3fn, layout)
    assert (row is not None) == (layout in ("row", "both"))
    assert (col is not None) == (layout in ("col", "both"))
    if row is not None:
        assert row.shape == (M, N) and row.stride() == (N, 1) and row.dtype == torch.float8_e4m3fn
    if col is not None:
        assert col.shape == (M, N) and col.stride() == (1, M) and col.dtype == torch.float8_e4m3fn
        assert torch.equal(col.float(), quantize_ref(x, torch.float8_e4m3fn, "row")[0].float())


@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES)
def test_all_zero_tensor_gets_finite_scale_and_zero_data(float8_dtype):
    row, _, scale = quantize_ref(torch.zeros(16, 32), float8_dtype)
    assert torch.equal(scale, torch.tensor(EPS, dtype=torch.float32) / torch.tensor(fp8_max(float8_dtype)))
    assert scale.isfinite() and scale > 0
    assert (row.float() == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES)
def test_non_finite_input_poisons_the_whole_tensor(bad, float8_dtype):
    x = torch.randn(16, 32)
    x[3, 7] = bad
    row, col, scale = quantize_ref(x, float8_dtype, "both")
    assert scale.isnan()
    assert row.float().isnan().all() and col.float().isnan().all()


@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES)
def test_power_of_2_scale(float8_dtype):
    x = torch.randn(32, 64) * 5
    row, _, scale = quantize_ref(x, float8_dtype, power_of_2=True)
    multiplier, _ = scale_from_amax_ref(x.abs().amax(), float8_dtype)
    mant, exp = torch.frexp(scale)
    assert mant == 0.5  # a power of two
    assert 1 / scale <= multiplier < 2 / scale  # the largest power of two not above the multiplier
    assert torch.equal(row.float(), nearest_float8(x / scale, float8_dtype).float().view(x.shape))


def test_empty_tensor():
    row, col, scale = quantize_ref(torch.empty(0, 16), torch.float8_e4m3fn, "both")
    assert row.shape == (0, 16) and col.shape == (0, 16) and scale.isfinite()


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="layout must be one of"):
        quantize_ref(torch.randn(4, 16), torch.float8_e4m3fn, "diagonal")
    with pytest.raises(ValueError, match="2-D"):
        quantize_ref(torch.randn(16), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="float8_e4m3fn or torch.float8_e5m2"):
        quantize_ref(torch.randn(4, 16), torch.bfloat16)
