"""swiglu(a, b) = silu(a) * b, the gate of a SwiGLU feed-forward, fused and float8-aware.

    h = swiglu(w1(x), w3(x))        instead of  F.silu(w1(x)) * w3(x)
    out = w2(h)

In eager PyTorch the gate is three kernels forward (silu, mul) and backward (two muls, silu's
backward), each a full pass over [tokens, ffn] tensors; then Float8Linear reads h (w2's input) and
the two gradients (w1's and w3's grad_output) once more each for their amax. Here forward and
backward are one pass each, and each measures the amax of what it writes, so those Float8Linear
layers skip their amax passes (tensor_cache.produced_amax). Autograd saves a and b only (eager
also saves silu(a)). Values: fp32 math, one rounding (eager rounds silu(a) first); bf16/fp16
outputs on the GPU within one unit in the last place of the reference (`kernels.naive.swiglu_ref`),
fp32 ones within the fast exp's error.

Under torch.compile it is the reference in plain ops, which inductor fuses with its neighbours;
on tensor subclasses (DTensor, ...), under torch.func transforms and forward-mode AD too.

geglu(a, b) = gelu(a, approximate="tanh") * b is GeGLU's gate (Gemma's feed-forward), the same
fusion with the tanh form of GELU: the same kernels, records and fallbacks, values as above
(`kernels.naive.geglu_ref`).
"""

import torch

from ..core.tensor_cache import produced_amax
from ..kernels import (INPUT_DTYPES, geglu_backward_ref, geglu_ref, swiglu_backward_ref, swiglu_backward_with_amax,
                       swiglu_ref, swiglu_with_amax)
from .kernel_path import kernels_can_run


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, gelu_tanh):
        h, record = swiglu_with_amax(a, b, gelu_tanh)
        produced_amax.put(h, record)
        ctx.save_for_backward(a, b)
        ctx.gelu_tanh = gelu_tanh
        return h

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: plain ops, so the gradients differentiate
            grad_a, grad_b = (geglu_backward_ref if ctx.gelu_tanh else swiglu_backward_ref)(g, a, b)
        else:
            grad_a, grad_b, record_a, record_b = swiglu_backward_with_amax(g.contiguous(), a, b, ctx.gelu_tanh)
            produced_amax.put(grad_a, record_a)
            produced_amax.put(grad_b, record_b)
        need_a, need_b = ctx.needs_input_grad[:2]
        return grad_a if need_a else None, grad_b if need_b else None, None


def _gate(name: str, a, b, gelu_tanh: bool) -> torch.Tensor:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise TypeError(f"{name} takes two tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"{name}(a, b) needs a and b of one shape, dtype and device (no broadcasting), got "
            f"{tuple(a.shape)} {a.dtype} {a.device} and {tuple(b.shape)} {b.dtype} {b.device}")
    if a.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name} takes bfloat16, float16 or float32 tensors, got {a.dtype}")
    # Under compile, for tensor subclasses (DTensor under tensor parallelism, ...), torch.func
    # transforms and forward-mode AD: the reference in plain ops.
    if not kernels_can_run(a, b):
        return (geglu_ref if gelu_tanh else swiglu_ref)(a, b)
    return _SwiGLUFn.apply(a.contiguous(), b.contiguous(), gelu_tanh)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for floating tensors of one shape, dtype and device (a non-contiguous one is
    copied to contiguous first)."""
    return _gate("swiglu", a, b, False)


def geglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gelu(a, approximate="tanh") * b for floating tensors of one shape, dtype and device (a
    non-contiguous one is copied to contiguous first)."""
    return _gate("geglu", a, b, True)
