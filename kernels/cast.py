"""Saturating cast to float8 with dynamic tensorwise scale: row-major, column-major, or both from one read.

Reference: `naive.quantize_ref`. The prologue of every program reduces the amax partials written by
`amax.amax_kernel` (a few hundred words, L2-resident) and derives the scale through
`scale.scale_from_amax`, so quantizing costs exactly two launches and never reads amax on the host.
Tiles are visited in the reverse of the amax pass's order: the tiles it read last are still in L2.
"""

import torch
import triton
import triton.language as tl

from .amax import tile_grid
from .scale import saturate_to_float8, scale_from_amax


@triton.jit
def cast_kernel(
    x_ptr, partials_ptr, NUM_PARTIALS, row_ptr, col_ptr, scale_ptr,
    M, N, stride_m, stride_n, NUM_TILES, TILES_N,
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr,
    MANT_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr,
    WRITE_ROW: tl.constexpr, WRITE_COL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_PARTIALS: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_PARTIALS)
    partials = tl.load(partials_ptr + offs, mask=offs < NUM_PARTIALS, other=0)
    amax = tl.max(partials, 0).to(tl.float32, bitcast=True)
    multiplier, scale = scale_from_amax(amax, FP8_MAX, EPS, POWER_OF_2)
    if pid == 0:
        tl.store(scale_ptr, scale)

    tile = NUM_TILES - 1 - pid
    rows = (tile // TILES_N) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    # One mask in (row, col) coordinates serves both stores: the column-major store only changes
    # the address arithmetic, never which elements are in bounds.
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_n, mask=mask)
    y = x.to(tl.float32) * multiplier
    q = saturate_to_float8(y, row_ptr.dtype.element_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
    if WRITE_ROW:
        tl.store(row_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], q, mask=mask)
    if WRITE_COL:
        # Stored as bytes, through a uint8 view of the same buffer: the same bits as a float8 store, and
        # faster in a probe (docs/design.md, "Block sizes").
        tl.store(col_ptr + rows[:, None] + cols[None, :].to(tl.int64) * M,
                 q.to(tl.uint8, bitcast=True), mask=mask)


# (mantissa bits, exponent of the smallest normal) of each float8 format.
FORMAT_BITS = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}
FP8_MAX = {dtype: torch.finfo(dtype).max for dtype in FORMAT_BITS}


def next_power_of_2(n: int) -> int:
    # triton.next_power_of_2 is a constexpr_function in 3.6: microseconds of host time per call.
    return 1 << (n - 1).bit_length()


def launch_cast(
    x: torch.Tensor, partials: torch.Tensor, float8_dtype: torch.dtype, *,
    write_row: bool, write_col: bool, power_of_2: bool, exact_round: bool, eps: float,
    block_m: int = 64, block_n: int = 128, num_warps: int = 8,
    row_out: torch.Tensor | None = None, col_out: torch.Tensor | None = None,
    launched: list | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Cast a 2-D tensor; returns (row [M, N] contiguous | None, col [M, N] strides (1, M) | None, scale).

    row_out / col_out: optional preallocated outputs of exactly those layouts (tests pass views
    into guarded buffers to catch stray writes). launched: a list that receives (CompiledKernel
    Triton ran, grid, parameters after the six pointer/count ones) for a later direct relaunch.
    """
    M, N = x.shape
    row = col = None
    if write_row:
        row = torch.empty((M, N), dtype=float8_dtype, device=x.device) if row_out is None else row_out
    if write_col:
        col = torch.empty((N, M), dtype=float8_dtype, device=x.device).t() if col_out is None else col_out
    for out, strides in ((row, (N, 1)), (col, (1, M))):
        if out is not None and (out.shape != (M, N) or out.stride() != strides or out.dtype != float8_dtype):
            raise ValueError(f"output buffer must be {float8_dtype} [{M}, {N}] with strides {strides}")
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    # Triton 3.6 on sm90 misplaces hardware-converted fp32 -> float8 values in some small layouts
    # (seen for fp32 inputs of 1x16, 17x48, 64x1; never for bf16/fp16); converting values already
    # on the float8 grid avoids it, and tests/test_kernels.py checks every case bit for bit.
    exact_round = exact_round or x.dtype == torch.float32
    num_tiles, tiles_n = tile_grid(M, N, block_m, block_n)
    mant_bits, min_normal_exp = FORMAT_BITS[float8_dtype]
    # Every parameter after (x, partials, NUM_PARTIALS, row, col, scale) in signature order,
    # constexprs included (as replayed).
    args = (M, N, x.stride(0), x.stride(1), num_tiles, tiles_n, FP8_MAX[float8_dtype], eps, power_of_2,
            mant_bits, min_normal_exp, exact_round, write_row, write_col, block_m, block_n,
            next_power_of_2(partials.numel()))
    names = ("FP8_MAX", "EPS", "POWER_OF_2", "MANT_BITS", "MIN_NORMAL_EXP", "EXACT_ROUND",
             "WRITE_ROW", "WRITE_COL", "BLOCK_M", "BLOCK_N", "BLOCK_PARTIALS")
    any_out = row if row is not None else col
    grid = (num_tiles,)  # one program per tile
    kernel = cast_kernel[grid](
        x, partials, partials.numel(),
        any_out if row is None else row, (any_out if col is None else col).view(torch.uint8), scale,
        *args[:6], **dict(zip(names, args[6:])), num_warps=num_warps,
    )
    if launched is not None:
        launched.append((kernel, grid, args))
    return row, col, scale

