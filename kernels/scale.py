"""Triton twins of `naive.scale_from_amax_ref`, and a cast helper the interpreter evaluates exactly.

Every kernel computes its scale through `scale_from_amax`; nothing re-derives a scale inline.
"""

import os

import triton
import triton.language as tl

# jit functions are bound to the interpreter at decoration time, so this is read once, here too.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def scale_from_amax(amax, FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr):
    """(multiplier, scale) from a 0-d fp32 amax; see naive.scale_from_amax_ref for the policy."""
    one = tl.full([], 1.0, tl.float32)
    # div_rn: Triton's plain `/` on fp32 is an approximate division; the reference rounds correctly.
    multiplier = tl.math.div_rn(one * FP8_MAX, tl.maximum(amax, EPS))
    if POWER_OF_2:
        multiplier = (multiplier.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    # amax is inf or NaN here only when the input was non-finite; amax - amax is then NaN.
    multiplier = tl.where(amax <= FLOAT32_MAX, multiplier, amax - amax)
    return multiplier, tl.math.div_rn(one, multiplier)


@triton.jit
def round_to_float8_grid(y, MANT_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr):
    """Round fp32 `y` (|y| <= fp8 max, or NaN) to the nearest float8 value, ties to even, in fp32.

    The CPU interpreter's fp32->float8 conversion mis-rounds values whose rounding carries into the
    exponent (126.1 -> 64 instead of 128 in e4m3); it converts already representable values exactly.
    Kernels call this first when interpreting. On the GPU it gives the hardware cast's result.
    """
    bits = y.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    shift: tl.constexpr = 23 - MANT_BITS
    # Normal range: round the fp32 mantissa to MANT_BITS bits, ties to even, carry into the exponent.
    lsb = (mag >> shift) & 1
    normal = (mag + ((1 << (shift - 1)) - 1) + lsb) & (-(1 << shift))
    # Subnormal range: adding 2^(23 + MIN_NORMAL_EXP - MANT_BITS) makes fp32's own rounding snap
    # to the fp8 subnormal spacing 2^(MIN_NORMAL_EXP - MANT_BITS).
    magic: tl.constexpr = 2.0 ** (23 + MIN_NORMAL_EXP - MANT_BITS)
    a = mag.to(tl.float32, bitcast=True)
    sub = ((a + magic) - magic).to(tl.int32, bitcast=True)
    rounded = tl.where(mag >= ((127 + MIN_NORMAL_EXP) << 23), normal, sub)
    rounded = tl.where(mag > 0x7F800000, mag, rounded)  # NaN stays NaN
    return (rounded | (bits & (-0x7FFFFFFF - 1))).to(tl.float32, bitcast=True)


@triton.jit
def round_to(y, dtype: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """fp32 y rounded to the nearest value of dtype (bfloat16, float16 or float32), ties to even, as
    fp32: y.to(dtype).to(float32). EXACT_ROUND does it in integer arithmetic (round_to_float8_grid
    with dtype's bits), for the CPU interpreter, whose casts to bfloat16 mis-round; float16 beyond
    its range becomes inf, as the cast makes it."""
    if dtype == tl.float32:
        return y
    if EXACT_ROUND:
        if dtype == tl.bfloat16:
            return round_to_float8_grid(y, 7, -126)
        r = round_to_float8_grid(y, 10, -14)
        return tl.where(tl.abs(r) > 65504.0, y * float("inf"), r)
    return y.to(dtype).to(tl.float32)


# Triton's own flag as a constant the jit functions below can read.
INTERPRETING_C = tl.constexpr(INTERPRETING)


@triton.jit
def saturate_to_float8(y, out_dtype: tl.constexpr, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr,
                       MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """fp32 y -> float8 as `naive.quantize_ref` casts: clamped to +-FP8_MAX, NaN kept, rounded to
    nearest even.

    Compiled for a CUDA GPU (the Triton paths run only on sm_89 and newer), Triton converts fp32 to
    float8 with `cvt.rn.satfinite`, which saturates finite values and infinities to +-FP8_MAX and
    keeps NaN: the clamp's results, so the clamp is left out (one instruction per element;
    tests/test_kernels.py checks the compiled conversion). In the interpreter, and under
    EXACT_ROUND, the clamp is explicit: the interpreter's conversion does not saturate."""
    if EXACT_ROUND or INTERPRETING_C:
        y = tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    if EXACT_ROUND:
        q = round_to_float8_grid(y, MANT_BITS, MIN_NORMAL_EXP).to(out_dtype)
        # The interpreter also turns NaN into 384 for e4m3fn; 0x7F is NaN in both formats.
        nan = tl.full(y.shape, 0x7F, tl.uint8).to(out_dtype, bitcast=True)
        return tl.where(y != y, nan, q)
    return y.to(out_dtype)
