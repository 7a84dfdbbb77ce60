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

swiglu_halves(y) / geglu_halves(y) take the gate and up halves of one y [..., 2 F] instead, a
gate_up projection's output (Phi-3's and GLM's feed-forward: `gate, up = y.chunk(2, dim=-1)`):

    h = swiglu_halves(gate_up(x))   instead of  gate, up = gate_up(x).chunk(2, dim=-1); F.silu(gate) * up

read in place (no copies of the halves), and backward writes both halves' gradients into one
tensor of y's shape with one amax record (the gate_up layer skips its amax pass; the chunk's
backward would otherwise concatenate them). Same values as swiglu / geglu of the two halves.
"""

import torch

from ..core.tensor_cache import produced_amax
from ..kernels import (INPUT_DTYPES, geglu_backward_ref, geglu_ref, swiglu_backward_ref, swiglu_backward_with_amax,
                       swiglu_halves_backward_ref, swiglu_halves_backward_with_amax, swiglu_halves_ref,
                       swiglu_halves_with_amax, swiglu_ref, swiglu_with_amax)
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


class _SwiGLUHalvesFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, gate_half, gelu_tanh):
        h, record = swiglu_halves_with_amax(y, gate_half, gelu_tanh)
        produced_amax.put(h, record)
        ctx.save_for_backward(y)
        ctx.gate_half, ctx.gelu_tanh = gate_half, gelu_tanh
        return h

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: plain ops, so the gradient differentiates
            dy = swiglu_halves_backward_ref(g, y, ctx.gate_half, ctx.gelu_tanh)
        else:
            dy, record = swiglu_halves_backward_with_amax(g.contiguous(), y, ctx.gate_half, ctx.gelu_tanh)
            produced_amax.put(dy, record)
        return dy, None, None


def _gate_halves(name: str, y, gate_half, gelu_tanh: bool) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} takes a tensor, got {type(y).__name__}")
    if y.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name} takes bfloat16, float16 or float32 tensors, got {y.dtype}")
    if y.dim() < 1 or y.shape[-1] % 2:
        raise ValueError(f"{name}(y) needs y [..., 2 F] with an even last dim (two halves), got {tuple(y.shape)}")
    if type(gate_half) is not int:  # (bool and numpy integers too: an int says which half)
        raise TypeError(f"{name}: gate_half is the int 0 or 1, got {type(gate_half).__name__} {gate_half!r}")
    if gate_half not in (0, 1):
        raise ValueError(f"{name}: gate_half is 0 (the gate is y's first half) or 1 (the second), got {gate_half!r}")
    if not kernels_can_run(y):  # as _gate: the reference in plain ops
        return swiglu_halves_ref(y, gate_half, gelu_tanh)
    return _SwiGLUHalvesFn.apply(y.contiguous(), gate_half, gelu_tanh)


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


def swiglu_halves(y: torch.Tensor, gate_half: int = 0) -> torch.Tensor:
    """silu(gate) * up of the halves gate, up of y's last dim (y [..., 2 F]; the gate the first half
    for gate_half 0, the second for 1), as swiglu(gate, up) computes it, without copying the halves
    (a non-contiguous y is copied to contiguous first)."""
    return _gate_halves("swiglu_halves", y, gate_half, False)


def geglu_halves(y: torch.Tensor, gate_half: int = 0) -> torch.Tensor:
    """gelu(gate, approximate="tanh") * up of the halves of y's last dim, as swiglu_halves."""
    return _gate_halves("geglu_halves", y, gate_half, True)
