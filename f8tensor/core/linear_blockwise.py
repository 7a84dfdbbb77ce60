"""Float8Linear's three GEMMs under blockwise scaling (config.scaling_granularity == "blockwise",
DeepSeek-V3's recipe): activations and gradients with one scale per 1 x 128 strip along the GEMM's
reduced axis, weights with one per 128 x 128 tile; torch._scaled_mm's blockwise GEMMs
(ops._blockwise_scales checks their rules).

    forward      out    = x_row     @ w_row.t()    x: 1 x 128 along K          w: 128 x 128
    backward     grad_x = g_row     @ w_col        g: 1 x 128 along N          w: 128 x 128 (column-major)
                 grad_w = g_col.t() @ x_col        g: 128 x 1 along tokens     x: 128 x 1 along tokens

An outlier sets the scale of its own strip (128 values of one token or channel) or, in the weight,
of its own tile. Every cast is one read of its operand (kernels/blockwise.py): a tile of 128 rows
holds whole strips along both axes, so x and g are cast into both layouts, with their two kinds of
scales, from one read; the weight is cast row-major in forward and column-major in backward, from
the parameter (the same values: autograd checked the version), so no float8 copy of it is held
between forward and backward.

x is saved as float8 column-major data with its scales (half of bf16's bytes) unless
config.save_fp8_for_backward is off or x's storage is kept for backward anyway (saved_by_producer,
as in linear.py): then x itself is saved and cast in backward. With
config.grad_weight_high_precision the weight-gradient GEMM runs in the input's dtype on the
unquantized g and x.
"""

import torch
from torch.autograd.function import once_differentiable

from ..kernels import quantize_blocks
from ..torch_internals import saved_by_producer
from .linear_rowwise import remember_shapes
from .ops import scaled_mm_data
from .saves_first import forward_output
from .tensor_cache import shared_input


def _input_casts(x, x2d, config, want_col: bool):
    """(row, row_scale, col | None, col_scale | None) of layer input x, shared by the layers that
    read the same x (q/k/v, w1/w3): each layout cast once (both from one read where the first
    reader wants both)."""
    key = (config, "blockwise")
    casts = shared_input.get(x, key)
    if casts is None or (want_col and casts[2] is None):
        casts = quantize_blocks(x2d, config.forward_dtype, config.power_of_2_scale, write_col=want_col)
        shared_input.put(x, casts, key)
    return casts


class _BlockwiseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, config, grad_enabled: bool, deferred: list | None):
        need_w_grad = grad_enabled and weight.requires_grad
        need_x_grad = grad_enabled and x.requires_grad
        fp8_grad_w = need_w_grad and not config.grad_weight_high_precision
        saved_fp8 = fp8_grad_w and config.save_fp8_for_backward and (
            torch.compiler.is_compiling() or not saved_by_producer(x))
        x2d = x.reshape(-1, x.shape[-1])
        x_row, x_scale, x_col, x_col_scale = _input_casts(x, x2d, config, want_col=saved_fp8)
        w_row, w_scale, _, _ = quantize_blocks(weight, config.forward_dtype, config.power_of_2_scale, square=True)
        out = forward_output(x, bias, config, x_row, x_scale, w_row.t(), w_scale.t(), deferred)
        del x_row, w_row
        if saved_fp8:
            x_saved, x_info = x_col, x_col_scale
        else:
            x_saved, x_info = (x2d, None) if need_w_grad else (None, None)
        ctx.save_for_backward(x_saved, x_info, weight if need_x_grad else None)
        ctx.saved_fp8 = saved_fp8
        remember_shapes(ctx, config, x, weight, bias)
        return out

    @staticmethod
    @once_differentiable  # its GEMMs have no derivative: a double backward raises, not a wrong one
    def backward(ctx, grad_out):
        config = ctx.config
        pow2 = config.power_of_2_scale
        x_saved, x_info, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        fp8_grad_w = need_w and not config.grad_weight_high_precision
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        g_row, g_scale, g_col, g_col_scale = quantize_blocks(
            g2d, config.backward_dtype, pow2, write_row=need_x, write_col=fp8_grad_w) \
            if need_x or fp8_grad_w else (None,) * 4
        grad_x = grad_w = grad_b = None
        if need_w and not fp8_grad_w:  # high precision: g.t() @ x as saved
            grad_w = torch.mm(g2d.t(), x_saved).to(ctx.weight_dtype)
        elif need_w:
            x_col, x_col_scale = (x_saved, x_info) if ctx.saved_fp8 else quantize_blocks(
                x_saved, config.forward_dtype, pow2, write_row=False, write_col=True)[2:]
            grad_w = scaled_mm_data(g_col.t(), g_col_scale.t(), x_col, x_col_scale, grad_out.dtype,
                                    config.fast_accum_grad_weight, config).to(ctx.weight_dtype)
            del g_col, x_col
        if need_x:
            _, _, w_col, w_col_scale = quantize_blocks(weight, config.forward_dtype, pow2, square=True,
                                                       write_row=False, write_col=True)
            grad_x = scaled_mm_data(g_row, g_scale, w_col, w_col_scale, grad_out.dtype,
                                    config.fast_accum_grad_input, config).view(ctx.x_shape)
        if need_b:
            grad_b = g2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None
