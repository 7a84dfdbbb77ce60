"""Saturating cast to float8 with one dynamic scale per row (row-major output) or per column
(column-major output).

Reference: `naive.quantize_rowwise_ref` (same results bit for bit on the GPU).

Three kernels, each one read of x:
- `row_kernel`: one program per block of BLOCK_M rows. A row's scale needs that row only: rows up
  to 16384 wide fit one tile, loaded once for the amaxes and the cast; wider rows are read twice
  (the second time from L2, just read).
- `col_amax_kernel`: each column's max(|x|), per slice of the rows, folded into `col_amax` (fp32
  bits in int32, zeroed by the caller) by one atomic max per column and slice.
- `col_kernel`: casts x column-major (stored as the transpose's row-major bytes, [N, M]) with the
  scales of `col_amax`; one program per BLOCK_N columns and a slice of the rows.

A column-major operand scaled per column (the weight-gradient GEMM's operands, the weight in the
input-gradient GEMM) needs every row's contribution to a column's amax before the first element
can be cast, so its cast cannot share the amax pass's read. The column amaxes are the record the
caller keeps: Float8Linear takes the weight's in forward and casts the weight column-major in
backward from it. Folding the column amaxes into the row pass instead (an atomic per column and
row block) measured 3x slower than a pass of their own on the H200 (docs/benchmarks.md).

Atomic max on non-negative int32 bit patterns is order independent: the results are deterministic.
"""

import torch
import triton
import triton.language as tl

from .amax import cdiv, magnitude_bits
from .cast import FORMAT_BITS, FP8_MAX, next_power_of_2
from .launch import launch_kernel
from .naive import EPS, INPUT_DTYPES, scale_from_amax_ref
from .scale import INTERPRETING, saturate_to_float8, scale_from_amax


@triton.jit
def _cast_tile(x, multiplier, out_ty: tl.constexpr, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr,
               MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr):
    return saturate_to_float8(x.to(tl.float32) * multiplier, out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)


@triton.jit
def row_kernel(
    x_ptr, row_ptr, row_scale_ptr, M, N, stride_m, stride_n,
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
    MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, ONE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_m
    out_rows = row_ptr + rows[:, None].to(tl.int64) * N
    if ONE_PASS:  # the whole row block fits one tile: one load serves the amax and the cast
        cols = tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols[None, :] < N)
        x = tl.load(x_rows + cols[None, :].to(tl.int64) * stride_n, mask=mask, other=0.0)
        amax = tl.max(magnitude_bits(x), 1).to(tl.float32, bitcast=True)
        multiplier, scale = scale_from_amax(amax, FP8_MAX, EPS, POWER_OF_2)
        tl.store(row_scale_ptr + rows, scale, mask=row_ok)
        q = _cast_tile(x, multiplier[:, None], row_ptr.dtype.element_ty, FP8_MAX, MANT_BITS,
                       MIN_NORMAL_EXP, EXACT_ROUND)
        tl.store(out_rows + cols[None, :], q, mask=mask)
    else:  # rows read twice: for the amax, then (L2 hits) to cast
        acc = tl.zeros([BLOCK_M], dtype=tl.int32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols[None, :] < N)
            bits = magnitude_bits(tl.load(x_rows + cols[None, :].to(tl.int64) * stride_n, mask=mask, other=0.0))
            acc = tl.maximum(acc, tl.max(bits, 1))
        multiplier, scale = scale_from_amax(acc.to(tl.float32, bitcast=True), FP8_MAX, EPS, POWER_OF_2)
        tl.store(row_scale_ptr + rows, scale, mask=row_ok)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols[None, :] < N)
            x = tl.load(x_rows + cols[None, :].to(tl.int64) * stride_n, mask=mask)
            q = _cast_tile(x, multiplier[:, None], row_ptr.dtype.element_ty, FP8_MAX, MANT_BITS,
                           MIN_NORMAL_EXP, EXACT_ROUND)
            tl.store(out_rows + cols[None, :], q, mask=mask)


@triton.jit
def col_amax_kernel(
    x_ptr, col_amax_ptr, M, N, stride_m, stride_n, ROWS_PER_PROGRAM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """max(|x|) of BLOCK_N columns over a slice of the rows, folded into col_amax (atomic max)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(1) * ROWS_PER_PROGRAM
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offsets = rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_n
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        acc = tl.maximum(acc, magnitude_bits(x))
    tl.atomic_max(col_amax_ptr + cols, tl.max(acc, 0), mask=cols < N, sem="relaxed")


@triton.jit
def col_kernel(
    x_ptr, col_amax_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n, ROWS_PER_PROGRAM,
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
    MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    amax = tl.load(col_amax_ptr + cols, mask=col_ok, other=0).to(tl.float32, bitcast=True)
    multiplier, scale = scale_from_amax(amax, FP8_MAX, EPS, POWER_OF_2)
    first = tl.program_id(1) * ROWS_PER_PROGRAM
    if first == 0:
        tl.store(col_scale_ptr + cols, scale, mask=col_ok)
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_n, mask=mask)
        q = _cast_tile(x, multiplier[None, :], col_ptr.dtype.element_ty, FP8_MAX, MANT_BITS,
                       MIN_NORMAL_EXP, EXACT_ROUND)
        tl.store(col_ptr + rows[:, None] + cols[None, :].to(tl.int64) * M, q, mask=mask)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # interpreter: enough to exercise the row split
    from .quantize import num_sms

    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _format(float8_dtype: torch.dtype, power_of_2: bool, exact_round: bool, x: torch.Tensor):
    mant_bits, min_normal_exp = FORMAT_BITS[float8_dtype]
    # Triton 3.6 on sm90 misconverts fp32 inputs in some small layouts (cast.py): round first.
    exact_round = exact_round or x.dtype == torch.float32
    return dict(FP8_MAX=FP8_MAX[float8_dtype], EPS=EPS, POWER_OF_2=power_of_2, MANT_BITS=mant_bits,
                MIN_NORMAL_EXP=min_normal_exp, EXACT_ROUND=exact_round)


def _check(x: torch.Tensor, float8_dtype: torch.dtype, name: str = "rowwise"):
    if x.dim() != 2:
        raise ValueError(f"{name} quantization takes a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"can quantize bfloat16, float16 or float32 tensors, got {x.dtype}")
    if float8_dtype not in FORMAT_BITS:
        raise ValueError(f"float8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {float8_dtype}")


ONE_PASS_TILE = 8192  # elements of a one-pass row tile (rows x the row's width, padded to a power of 2)
MAX_ONE_PASS_WIDTH = 16384


def _split_rows(M: int, col_programs: int, block_m: int, device) -> tuple[int, int]:
    """(row slices, rows per slice): enough programs to keep every SM's loads in flight when the
    columns alone give too few."""
    split = max(1, min(cdiv(M, block_m), cdiv(4 * _num_sms(device), col_programs)))
    rows_per_program = cdiv(cdiv(M, split), block_m) * block_m
    return cdiv(M, rows_per_program), rows_per_program


def row_cast_triton(
    x: torch.Tensor, float8_dtype: torch.dtype, power_of_2: bool = False, *, write_row: bool = True,
    col_amax: bool = False, exact_round: bool = INTERPRETING, block_m: int | None = None,
    block_n: int | None = None, num_warps: int | None = None, amax_blocks: tuple[int, int, int] = (128, 64, 8),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(row [M, N] row-major | None, row_scale [M, 1] | None, col_amax [N] fp32 | None) of a 2-D x.

    Rows up to MAX_ONE_PASS_WIDTH wide are read once (a tile holds whole rows); wider ones, or
    block_n < N, twice (the second read from L2). col_amax: the column amaxes too, by a pass of
    their own (`col_amax_kernel`, blocks amax_blocks = (rows, columns, warps))."""
    _check(x, float8_dtype)
    if not (write_row or col_amax):
        raise ValueError("row_cast_triton: nothing to do (write_row and col_amax both off)")
    M, N = x.shape
    device = x.device
    row = torch.empty((M, N), dtype=float8_dtype, device=device) if write_row else None
    row_scale = torch.empty((M, 1), dtype=torch.float32, device=device) if write_row else None
    amax = torch.zeros(N, dtype=torch.int32, device=device) if col_amax else None
    if not (M and N):
        if write_row:
            row_scale.copy_(_empty_scale(float8_dtype, power_of_2, device))
        return row, row_scale, None if amax is None else amax.view(torch.float32)
    if write_row:
        if block_n is None:
            width = next_power_of_2(N)
            if width <= MAX_ONE_PASS_WIDTH:
                block_n, block_m = width, block_m or max(1, min(16, ONE_PASS_TILE // width))
            else:
                block_n, block_m = 256, block_m or 16
        block_m = block_m or 16
        warps = num_warps or (8 if block_m * block_n >= 4096 else 4)
        launch_kernel(row_kernel, (cdiv(M, block_m),), (x, row, row_scale, M, N, x.stride(0), x.stride(1)), warps,
                      **_format(float8_dtype, power_of_2, exact_round, x), ONE_PASS=block_n >= N,
                      BLOCK_M=block_m, BLOCK_N=block_n)
    if col_amax:
        bm, bn, warps = amax_blocks
        split, rows_per_program = _split_rows(M, cdiv(N, bn), bm, device)
        launch_kernel(col_amax_kernel, (cdiv(N, bn), split),
                      (x, amax, M, N, x.stride(0), x.stride(1), rows_per_program), warps, BLOCK_M=bm, BLOCK_N=bn)
    return row, row_scale, None if amax is None else amax.view(torch.float32)


def col_cast_triton(
    x: torch.Tensor, float8_dtype: torch.dtype, col_amax: torch.Tensor, power_of_2: bool = False, *,
    exact_round: bool = INTERPRETING, block_m: int = 64, block_n: int = 64, num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(col [M, N] column-major, col_scale [1, N]) of a 2-D x given its column amaxes (the record
    `row_cast_triton(..., col_amax=True)` returned for x's very values)."""
    _check(x, float8_dtype)
    M, N = x.shape
    if col_amax.dtype != torch.float32 or col_amax.shape != (N,) or col_amax.device != x.device:
        raise ValueError(f"col_amax must be the fp32 [{N}] record of this tensor's column amaxes, got "
                         f"{col_amax.dtype} {tuple(col_amax.shape)} on {col_amax.device}")
    col_amax = col_amax.contiguous()  # the kernel reads it as laid out
    device = x.device
    col_t = torch.empty((N, M), dtype=float8_dtype, device=device)
    col_scale = torch.empty((1, N), dtype=torch.float32, device=device)
    if M and N:
        col_programs = cdiv(N, block_n)
        split, rows_per_program = _split_rows(M, col_programs, block_m, device)
        launch_kernel(col_kernel, (col_programs, split),
                      (x, col_amax.view(torch.int32), col_t, col_scale, M, N, x.stride(0),
                       x.stride(1), rows_per_program), num_warps,
                      **_format(float8_dtype, power_of_2, exact_round, x), BLOCK_M=block_m, BLOCK_N=block_n)
    elif N:  # no rows: the given amaxes set the scales, as the reference's
        col_scale.copy_(scale_from_amax_ref(col_amax, float8_dtype, power_of_2)[1].reshape(1, N))
    return col_t.t(), col_scale


def _empty_scale(float8_dtype, power_of_2, device) -> torch.Tensor:
    """The scale of an empty row or column (amax 0): the policy's, from the reference."""
    from .naive import scale_from_amax_ref

    return scale_from_amax_ref(torch.zeros((), device=device), float8_dtype, power_of_2)[1]
