"""Property tests of dynamic tensorwise quantization (hypothesis): random shapes, strides, dtypes,
magnitudes from 1e-30 to 1e30 and NaN / inf / zero placed anywhere. For every example:

- the Triton kernels give the reference's bits (`kernels/naive.py`), data and scale;
- where every input is finite, dequantization (data * scale) is within the float8 error bound of
  the input: half a float8 spacing at the scaled value, times the scale, plus the fp32 roundings of
  the multiplier and the scale (relative 2^-21 of |x|, a bound with room to spare);
- a non-finite input poisons the tensor (scale NaN, every code NaN), and an all-zero tensor
  quantizes to zeros with a finite scale.

Examples are derandomized (the same on every run; CI must not flake) and few on CPU, where the
kernels run in the interpreter; the GPU runs more."""

import math

import pytest
import torch
from f8utils import DEVICE

pytest.importorskip("triton")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from f8tensor.kernels import quantize_ref  # noqa: E402
from f8tensor.kernels.naive import EPS, fp8_max  # noqa: E402
from f8tensor.kernels.quantize import quantize_triton  # noqa: E402
from test_kernels import assert_same_fp8  # noqa: E402

ON_GPU = DEVICE.type == "cuda"
EXAMPLES = 300 if ON_GPU else 80
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
HP = (torch.bfloat16, torch.float16, torch.float32)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@st.composite
def inputs(draw, specials: bool):
    """(x, float8 dtype, layout): x 2-D of a high-precision dtype, any of four stride patterns,
    magnitudes 2^lo..2^hi inside 1e-30..1e30 (fp16's range where x is fp16), specials placed at random."""
    dtype = draw(st.sampled_from(HP))
    m, n = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    lo_limit, hi_limit = (-24, 15) if dtype is torch.float16 else (-99, 99)  # 2^99 ~ 6e29
    lo = draw(st.integers(lo_limit, hi_limit))
    hi = draw(st.integers(lo, min(hi_limit, lo + 40)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shape = draw(st.sampled_from(["contiguous", "transposed", "sliced", "strided"]))
    rows, cols = {"contiguous": (m, n), "transposed": (n, m), "sliced": (m, n + 5), "strided": (2 * m, 3 * n)}[shape]
    mag = torch.exp2(torch.empty(rows, cols, dtype=torch.float64).uniform_(lo, hi, generator=g))
    base = (mag * (torch.randint(0, 2, (rows, cols), generator=g) * 2 - 1)).to(dtype)
    zeros = draw(st.sampled_from([0.0, 0.1, 1.0]))  # fraction of exact zeros (1.0: an all-zero tensor)
    base[torch.rand(rows, cols, generator=g) < zeros] = 0
    base = base.to(DEVICE)  # the views below keep their strides on the device
    x = {"contiguous": base, "transposed": base.t(), "sliced": base[:, 2:2 + n], "strided": base[::2, ::3]}[shape]
    if specials:  # written through the view, so they are inside x
        for value in draw(st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), min_size=1, max_size=3)):
            x[draw(st.integers(0, x.shape[0] - 1)), draw(st.integers(0, x.shape[1] - 1))] = value
    return x, draw(st.sampled_from(FP8)), draw(st.sampled_from(["row", "col", "both"]))


def matches_reference(x, float8_dtype, layout):
    got = quantize_triton(x, float8_dtype, layout)
    want = quantize_ref(x, float8_dtype, layout)
    assert torch.equal(got[2], want[2]) or bool(got[2].isnan() and want[2].isnan())
    for g, w in zip(got[:2], want[:2]):
        assert (g is None) == (w is None)
        if g is not None:
            assert_same_fp8(g, w)
    return want


def spacing(y: torch.Tensor, float8_dtype) -> torch.Tensor:
    """The float8 format's spacing at |y| (float64): 2^(exponent - mantissa bits), or the subnormal
    spacing below the smallest normal."""
    info = torch.finfo(float8_dtype)
    exponent = torch.floor(torch.log2(y.abs().clamp_min(info.tiny)))
    return torch.exp2(exponent) * info.eps


@PROPERTY
@given(inputs(specials=False))
def test_finite_inputs_match_the_reference_within_the_float8_bound(case):
    x, float8_dtype, layout = case
    row, col, scale = matches_reference(x, float8_dtype, layout)
    data = row if row is not None else col
    x64, scale64 = x.double().cpu(), scale.double().cpu()
    assert torch.isfinite(scale) and scale > 0
    if not x.abs().amax() > 0:  # all zeros: zeros, and the scale of amax EPS
        assert not data.float().any() and scale.item() == pytest.approx(EPS / fp8_max(float8_dtype), rel=1e-6)
        return
    dequant = data.double().cpu() * scale64
    y = x64 / scale64  # the scaled value, |y| <= fp8_max
    bound = 0.5 * spacing(y, float8_dtype) * scale64 * (1 + 2**-20) + x64.abs() * 2**-21
    err = (dequant - x64).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"x={x64.flatten()[worst].item()!r} dequant={dequant.flatten()[worst].item()!r} "
        f"bound={bound.flatten()[worst].item()!r}")


@PROPERTY
@given(inputs(specials=True))
def test_non_finite_inputs_poison_the_tensor(case):
    x, float8_dtype, layout = case
    row, col, scale = matches_reference(x, float8_dtype, layout)
    assert scale.isnan()
    for data in (row, col):
        if data is not None:
            assert bool(data.float().isnan().all())
