"""RMSNorm over the last dim, forward and backward each in one pass; forward also measures the amax
of what it writes, so the Float8Linear layers reading the norm's output (q/k/v, w1/w3) skip their
amax pass.

Reference: `naive.rms_norm_ref`, `naive.rms_norm_backward_ref` (fp32 math, one rounding to the
output dtype). The sum of squares and the backward's row dot product are summed in another order
than the reference's, and rsqrt is the GPU's approximate one, so outputs may differ from the
reference by one unit in the last place; the amax record is exact for the kernel's own output: its
partials, as `amax.amax_kernel` writes them (fp32 bits of |y|, sign cleared, one per program).

Rows of a contiguous [..., D] tensor; a persistent grid of a few programs per SM, each striding over
blocks of ROWS rows held whole in registers (D up to limits.RMS_NORM_MAX_D). Backward writes dx and one fp32 row of
partial weight gradients per program, which the caller sums (a few hundred rows).
"""

import torch
import triton
import triton.language as tl

from .amax import cdiv, magnitude_bits
from .launch import launch_kernel
from .scale import INTERPRETING, round_to
from .quantize import default_num_programs


@triton.jit
def _tile(i, NUM_PROGRAMS, M, D, cols, col_mask, ROWS: tl.constexpr):
    """This program's i-th block of rows in the grid-stride loop: row indices (int64) and their
    mask, the [ROWS, BLOCK_D] mask and element offsets."""
    rows = (tl.program_id(0) + i * NUM_PROGRAMS).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    return rows, row_mask, row_mask[:, None] & col_mask[None, :], rows[:, None] * D + cols[None, :]


@triton.jit
def rms_norm_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, amax_ptr, M, D, eps, NUM_PROGRAMS, ITERS,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WEIGHT: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
    EXACT_ROUND: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.int32)
    for i in range(ITERS):
        rows, row_mask, mask, offs = _tile(i, NUM_PROGRAMS, M, D, cols, col_mask, ROWS)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, 1) / D + eps)
        y = x * rstd[:, None]
        if CAST_BEFORE_WEIGHT:  # Hugging Face's form: rounded to x's dtype before the weight
            y = round_to(y, y_ptr.dtype.element_ty, EXACT_ROUND)
        if HAS_WEIGHT:
            y = y * w[None, :]
        y = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs, y, mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        # Masked lanes are left out: a row past M holds x = 0, whose y is NaN when eps is 0.
        acc = tl.maximum(acc, tl.where(mask, magnitude_bits(y), 0))
    tl.store(amax_ptr + tl.program_id(0), tl.max(tl.max(acc, 1), 0))


@triton.jit
def rms_norm_backward_kernel(
    g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, D, NUM_PROGRAMS, ITERS,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WEIGHT: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
    EXACT_ROUND: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for i in range(ITERS):
        rows, row_mask, mask, offs = _tile(i, NUM_PROGRAMS, M, D, cols, col_mask, ROWS)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]
        gw = g * w[None, :] if HAS_WEIGHT else g
        if CAST_BEFORE_WEIGHT:  # as autograd differentiates Hugging Face's form (naive.py)
            gw = round_to(gw, dx_ptr.dtype.element_ty, EXACT_ROUND)
        c = tl.sum(gw * x_hat, 1) / D
        dx = (gw - x_hat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            if CAST_BEFORE_WEIGHT:
                rounded = round_to(x_hat, dx_ptr.dtype.element_ty, EXACT_ROUND)
                dw += round_to(g * rounded, dx_ptr.dtype.element_ty, EXACT_ROUND)
            else:
                dw += g * x_hat  # masked lanes hold 0
    if HAS_WEIGHT:
        tl.store(dw_ptr + tl.program_id(0) * D + cols, tl.sum(dw, 0), mask=col_mask)


def _blocks(D: int, rows: int | None, num_warps: int | None, forward: bool) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps). Forward: one row per block, 4 warps up to 2048 elements, 8 up to
    8192, 16 above; backward: rows up to about 4096 elements per block, 8 warps (16 above 8192).
    Chosen by benchmarks/rms_norm.py --sweep (docs/design.md, "Block sizes")."""
    block_d = triton.next_power_of_2(D)
    if rows is None:
        rows = 1 if forward else max(1, 4096 // block_d)
    if num_warps is None:
        elements = rows * block_d
        num_warps = 4 if elements <= (2048 if forward else 1024) else 8 if elements <= 8192 else 16
    return rows, block_d, num_warps


def _grid(M: int, rows: int, num_programs: int) -> tuple[int, int]:
    """(programs, iterations per program) of the persistent grid."""
    blocks = cdiv(M, rows)
    programs = max(1, min(num_programs, blocks))
    return programs, cdiv(blocks, programs)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cast_before_weight: bool = False,
    rows: int | None = None, num_warps: int | None = None, num_programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, rstd fp32 [...], amax record of y) for a contiguous x [..., D] (D <= limits.RMS_NORM_MAX_D) and a weight
    of x's dtype [D] or None."""
    D = x.shape[-1]
    M = x.numel() // D if D else 0
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, rstd, torch.zeros(1, dtype=torch.int32, device=x.device)
    rows, block_d, num_warps = _blocks(D, rows, num_warps, forward=True)
    # Rows up to 2048 wide: twice the amax pass's programs (eight per SM on the GPU); wider rows:
    # four per SM (docs/design.md, "Block sizes").
    programs = default_num_programs(x.device) * (2 if block_d <= 2048 else 1)
    programs, iters = _grid(M, rows, num_programs or programs)
    record = torch.empty(programs, dtype=torch.int32, device=x.device)
    has_weight = weight is not None
    args = (x, weight if has_weight else x, y, rstd, record, M, D, float(eps), programs, iters)
    launch_kernel(rms_norm_kernel, (programs,), args, num_warps, ROWS=rows, BLOCK_D=block_d, HAS_WEIGHT=has_weight,
                  CAST_BEFORE_WEIGHT=cast_before_weight, EXACT_ROUND=INTERPRETING)
    return y, rstd, record


def rms_norm_backward_triton(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
    cast_before_weight: bool = False, rows: int | None = None, num_warps: int | None = None,
    num_programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dweight | None) for contiguous g, x [..., D] of one shape, forward's rstd and weight."""
    D = x.shape[-1]
    M = x.numel() // D if D else 0
    dx = torch.empty_like(x)
    if weight is None:
        dweight = None
    elif x.numel() == 0:
        dweight = torch.zeros_like(weight)
    if x.numel() == 0:
        return dx, dweight
    rows, block_d, num_warps = _blocks(D, rows, num_warps, forward=False)
    # Half the amax pass's programs (two per SM on the GPU), which also halves the partial
    # weight-gradient rows to sum (docs/design.md, "Block sizes").
    programs, iters = _grid(M, rows, num_programs or max(1, default_num_programs(x.device) // 2))
    has_weight = weight is not None
    partials = torch.empty((programs, D) if has_weight else (1,), dtype=torch.float32, device=x.device)
    args = (g, x, weight if has_weight else x, rstd, dx, partials, M, D, programs, iters)
    launch_kernel(rms_norm_backward_kernel, (programs,), args, num_warps, ROWS=rows, BLOCK_D=block_d,
                  HAS_WEIGHT=has_weight, CAST_BEFORE_WEIGHT=cast_before_weight, EXACT_ROUND=INTERPRETING)
    return dx, partials.sum(0).to(weight.dtype) if has_weight else None
