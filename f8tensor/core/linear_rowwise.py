"""Float8Linear's three GEMMs under rowwise scaling (config.scaling_granularity == "rowwise"):
each GEMM operand has one scale per row along K, what torch._scaled_mm's rowwise path takes
(scale_a [M, 1], scale_b [1, N]; ops.scaled_mm_data checks its rules).

    forward      out    = x_row     @ w_row.t()    x scaled per token [M, 1], w per output channel -> [1, N]
    backward     grad_x = g_row     @ w_col        g per token [M, 1], w column-major per input channel [1, K]
                 grad_w = g_col.t() @ x_col        g column-major per output channel -> [N, 1], x per input channel [1, K]

One outlier token or channel sets the scale of its own row or column only; under tensorwise it
sets the scale of the whole tensor. Row scales cost one read of the operand (kernels/rowwise.py);
a column-major operand's column scales need every row first, so its amaxes come from the row
pass's read and its cast is one more read. The weight's column amaxes are taken in forward and
kept (4 bytes per input feature) for backward's column-major cast: backward reads the weight once.

With config.grad_weight_high_precision (the "rowwise_with_gw_hp" recipe) the weight-gradient GEMM
runs in the input's dtype on the unquantized g and x: x is saved as it is, and neither g nor x is
cast column-major.

x is saved as float8 column-major data with its column scales (half of bf16's bytes) unless
config.save_fp8_for_backward is off, or x's storage is kept for backward anyway (saved_by_producer,
as in linear.py): then x itself is saved and cast in backward.
"""

import torch
from torch.autograd.function import once_differentiable

from ..kernels import quantize_cols, quantize_rows
from ..torch_internals import saved_by_producer
from .ops import scaled_mm_data
from .saves_first import forward_output
from .tensor_cache import shared_input


def _input_casts(x, config) -> dict:
    """The casts of layer input x made so far ("rows", "cols"), shared by the layers that read the
    same x (q/k/v, w1/w3): each cast once, and one float8 column-major copy saved for all their
    backwards. One entry of tensor_cache.shared_input (a new dict where x is not tracked)."""
    key = (config, "rowwise")
    entry = shared_input.get(x, key)
    if entry is None:
        entry = {}
        shared_input.put(x, entry, key)
    return entry


def _rows_of_input(x2d, casts, config, col_amax: bool):
    """(row, row_scale, col_amax | None) of the layer input; the column amaxes too if asked."""
    rows = casts.get("rows")
    if rows is None or (col_amax and rows[2] is None):
        rows = casts["rows"] = quantize_rows(x2d, config.forward_dtype, config.power_of_2_scale, col_amax=col_amax)
    return rows


def _cols_of_input(x2d, casts, config, col_amax):
    """(col, col_scale) of the layer input."""
    cols = casts.get("cols")
    if cols is None:
        cols = casts["cols"] = quantize_cols(x2d, config.forward_dtype, col_amax, config.power_of_2_scale)
    return cols


def remember_shapes(ctx, config, x, weight, bias) -> None:
    """What every Float8Linear autograd function's backward reads besides its saved tensors."""
    ctx.config = config
    ctx.x_shape = x.shape
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


class _RowwiseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, config, grad_enabled: bool, deferred: list | None):
        need_w_grad = grad_enabled and weight.requires_grad
        need_x_grad = grad_enabled and x.requires_grad
        f8, pow2 = config.forward_dtype, config.power_of_2_scale
        fp8_grad_w = need_w_grad and not config.grad_weight_high_precision
        x2d = x.reshape(-1, x.shape[-1])
        casts = _input_casts(x, config)
        x_row, x_scale, x_col_amax = _rows_of_input(x2d, casts, config, col_amax=fp8_grad_w)
        w_row, w_scale, w_col_amax = quantize_rows(weight, f8, pow2, col_amax=need_x_grad)
        out = forward_output(x, bias, config, x_row, x_scale, w_row.t(), w_scale.t(), deferred)
        del x_row, w_row
        # What the weight-gradient GEMM reads of x: float8 column-major data and its column scales,
        # or x itself (with its column amaxes, when it is cast in backward).
        saved_fp8 = fp8_grad_w and config.save_fp8_for_backward and (
            torch.compiler.is_compiling() or not saved_by_producer(x))
        if saved_fp8:
            x_saved, x_info = _cols_of_input(x2d, casts, config, x_col_amax)
        elif need_w_grad:
            x_saved, x_info = x2d, x_col_amax
        else:
            x_saved = x_info = None
        ctx.save_for_backward(x_saved, x_info, weight if need_x_grad else None, w_col_amax)
        ctx.saved_fp8 = saved_fp8
        remember_shapes(ctx, config, x, weight, bias)
        return out

    @staticmethod
    @once_differentiable  # its GEMMs have no derivative: a double backward raises, not a wrong one
    def backward(ctx, grad_out):
        config = ctx.config
        f8, pow2 = config.backward_dtype, config.power_of_2_scale
        x_saved, x_info, weight, w_col_amax = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        fp8_grad_w = need_w and not config.grad_weight_high_precision
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        g_row, g_scale, g_col_amax = quantize_rows(g2d, f8, pow2, write_row=need_x, col_amax=fp8_grad_w) \
            if need_x or fp8_grad_w else (None, None, None)
        grad_x = grad_w = grad_b = None
        if need_w and not fp8_grad_w:  # high precision: g.t() @ x as saved
            grad_w = torch.mm(g2d.t(), x_saved).to(ctx.weight_dtype)
        elif need_w:
            g_col, g_col_scale = quantize_cols(g2d, f8, g_col_amax, pow2)
            x_col, x_col_scale = (x_saved, x_info) if ctx.saved_fp8 else quantize_cols(
                x_saved, config.forward_dtype, x_info, pow2)
            grad_w = scaled_mm_data(g_col.t(), g_col_scale.t(), x_col, x_col_scale, grad_out.dtype,
                                    config.fast_accum_grad_weight, config).to(ctx.weight_dtype)
            del g_col, x_col
        if need_x:
            # Same values as in forward (autograd checked the version): forward's column amaxes.
            w_col, w_col_scale = quantize_cols(weight, config.forward_dtype, w_col_amax, pow2)
            grad_x = scaled_mm_data(g_row, g_scale, w_col, w_col_scale, grad_out.dtype,
                                    config.fast_accum_grad_input, config).view(ctx.x_shape)
        if need_b:
            grad_b = g2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None
