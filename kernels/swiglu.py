"""SwiGLU, h = silu(a) * b, forward and backward each in one pass that also measures the amax of
what it writes: the Float8Linear that reads h (w2), or the gradients (w1, w3), skips its amax pass.
With GELU_TANH the gate is GeGLU's, h = gelu(a, approximate="tanh") * b (Gemma's), 0.5 a (1 + t) b
with t = tanh(beta (a + kappa a^3)) computed as 2 sigmoid(2 beta (a + kappa a^3)) - 1 (naive.py
says how that compares with PyTorch's gelu).

Reference: `naive.swiglu_ref`, `naive.swiglu_backward_ref`, `naive.geglu_ref`,
`naive.geglu_backward_ref` (fp32 math, one rounding to the output dtype; eager PyTorch rounds the
activation to bf16 before the product). Triton's sigmoid uses the GPU's
fast exp, so a bf16/fp16 output may differ from the reference by one unit in the last place (fp32
by the exp's error, which grows with |a|); the amax
record is exact for the kernel's own output: its partials, as `amax.amax_kernel` writes them (fp32
bits of |x|, sign cleared, one per program), which the cast kernel reduces in its prologue.

Elementwise over the flattened, contiguous tensors; a persistent grid of a few programs per SM,
each striding over blocks, so the record has a few hundred partials whatever the size. The
halves form (`swiglu_halves_triton`): a and b are the two halves of the last dim of one y
[..., 2 F] (a gate_up projection's output, Phi-3's and GLM's), read in place with row stride 2 F
(STRIDED), and backward writes both gradients into one dy of y's shape, whose record is the two
halves' partials side by side.
"""

import torch
import triton
import triton.language as tl

from .amax import cdiv, magnitude_bits
from .launch import launch_kernel
from .naive import GELU_TANH_BETA as _BETA, GELU_TANH_KAPPA as _KAPPA, halves
from .quantize import default_num_programs


@triton.jit
def block_of(i, NUM_PROGRAMS, n, BLOCK: tl.constexpr):
    """Offsets and mask of this program's i-th block in the grid-stride loop."""
    offs = (tl.program_id(0) + i * NUM_PROGRAMS).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


GELU_TANH_BETA, GELU_TANH_KAPPA = tl.constexpr(_BETA), tl.constexpr(_KAPPA)  # the reference's constants


@triton.jit
def gelu_tanh_t(a):
    """tanh(beta (a + kappa a^3)) as 2 sigmoid(2 u) - 1 (Triton has no tanh in the interpreter): in
    fp32 it rounds to -1 where tanhf does, so 1 + t is 0 there, as PyTorch's gelu gives."""
    return 2 * tl.sigmoid(2 * GELU_TANH_BETA * (a + GELU_TANH_KAPPA * a * a * a)) - 1


@triton.jit
def strided(offs, width, in_stride, STRIDED: tl.constexpr):
    """Offsets into a and b (and their gradients) of the flat offsets offs of h: the same where they
    are contiguous (STRIDED 0), else rows of `width` elements `in_stride` apart (the halves of y
    [..., 2 F]), the division in 32-bit integers where every offset of y fits them (STRIDED 32)
    and in 64-bit ones otherwise (64)."""
    if STRIDED == 32:
        o = offs.to(tl.int32)
        return ((o // width) * in_stride + o % width).to(tl.int64)
    if STRIDED == 64:
        return (offs // width) * in_stride + offs % width
    return offs


@triton.jit
def swiglu_kernel(a_ptr, b_ptr, h_ptr, amax_ptr, n, width, in_stride, NUM_PROGRAMS, ITERS, BLOCK: tl.constexpr,
                  GELU_TANH: tl.constexpr, STRIDED: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(ITERS):
        offs, mask = block_of(i, NUM_PROGRAMS, n, BLOCK)
        ins = strided(offs, width, in_stride, STRIDED)
        a = tl.load(a_ptr + ins, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ins, mask=mask, other=0.0).to(tl.float32)
        if GELU_TANH:
            act = 0.5 * a * (1 + gelu_tanh_t(a))
        else:
            act = a * tl.sigmoid(a)
        h = (act * b).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h, mask=mask)
        acc = tl.maximum(acc, magnitude_bits(h))  # masked lanes hold 0
    tl.store(amax_ptr + tl.program_id(0), tl.max(acc, 0))


@triton.jit
def swiglu_backward_kernel(
    g_ptr, a_ptr, b_ptr, grad_a_ptr, grad_b_ptr, amax_a_ptr, amax_b_ptr, n, width, in_stride, NUM_PROGRAMS, ITERS,
    BLOCK: tl.constexpr, GELU_TANH: tl.constexpr, STRIDED: tl.constexpr,
):
    acc_a = tl.zeros([BLOCK], dtype=tl.int32)
    acc_b = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(ITERS):
        offs, mask = block_of(i, NUM_PROGRAMS, n, BLOCK)
        ins = strided(offs, width, in_stride, STRIDED)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + ins, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ins, mask=mask, other=0.0).to(tl.float32)
        if GELU_TANH:  # as PyTorch's gelu_backward (tanh form) writes it
            t = gelu_tanh_t(a)
            act = 0.5 * a * (1 + t)
            derivative = 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * GELU_TANH_BETA * (1 + 3 * GELU_TANH_KAPPA * a * a)
        else:  # silu'(a) = s (1 + a (1 - s))
            s = tl.sigmoid(a)
            act = a * s
            derivative = s * (1 + a * (1 - s))
        grad_a = (g * b * derivative).to(grad_a_ptr.dtype.element_ty)
        grad_b = (g * act).to(grad_b_ptr.dtype.element_ty)
        tl.store(grad_a_ptr + ins, grad_a, mask=mask)
        tl.store(grad_b_ptr + ins, grad_b, mask=mask)
        acc_a = tl.maximum(acc_a, magnitude_bits(grad_a))
        acc_b = tl.maximum(acc_b, magnitude_bits(grad_b))
    tl.store(amax_a_ptr + tl.program_id(0), tl.max(acc_a, 0))
    tl.store(amax_b_ptr + tl.program_id(0), tl.max(acc_b, 0))


# Offsets of the halves form's y below this are divided in 32-bit integers (`strided`).
INT32_OFFSETS = 2 ** 31


def strided_bits(n: int, width: int, in_stride: int) -> int:
    """`strided`'s STRIDED for n elements of h in rows of `width` read `in_stride` apart: 0 where
    they are contiguous (in_stride == width), 32 where rows x in_stride < INT32_OFFSETS (every
    offset of the input, at most rows x in_stride - 1, then fits int32), else 64."""
    if in_stride == width:
        return 0
    return 32 if n // width * in_stride < INT32_OFFSETS else 64

# Chosen by benchmarks/swiglu.py --sweep (docs/design.md, "Block sizes").
FORWARD_BLOCKS = dict(block=4096, num_warps=8)
BACKWARD_BLOCKS = dict(block=2048, num_warps=8)


def _launch(kernel, inputs, outputs, num_records, block, num_warps, gelu_tanh, n=None, width=1, in_stride=1):
    """Run `kernel` over `inputs` into `outputs` (n elements of h; contiguous unless in_stride !=
    width: rows of `width` elements `in_stride` apart); returns its `num_records` records side by
    side in one buffer (launch.py: Triton's launch path the first time for each case, its C launcher
    after)."""
    n = inputs[0].numel() if n is None else n
    device = inputs[0].device
    programs = max(1, min(default_num_programs(device), cdiv(n, block)))
    records = torch.empty(num_records * programs, dtype=torch.int32, device=device)
    args = (*inputs, *outputs, *records.split(programs), n, width, in_stride, programs, cdiv(cdiv(n, block), programs))
    launch_kernel(kernel, (programs,), args, num_warps, BLOCK=block, GELU_TANH=gelu_tanh,
                  STRIDED=strided_bits(n, width, in_stride))
    return records


def swiglu_triton(a: torch.Tensor, b: torch.Tensor, gelu_tanh: bool = False, **blocks
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, amax record of h) for contiguous a, b of one shape and dtype; gelu_tanh: GeGLU's gate."""
    h = torch.empty_like(a)
    if a.numel() == 0:
        return h, torch.zeros(1, dtype=torch.int32, device=a.device)
    record = _launch(swiglu_kernel, (a, b), (h,), 1, **(blocks or FORWARD_BLOCKS), gelu_tanh=gelu_tanh)
    return h, record


def swiglu_backward_triton(
    g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gelu_tanh: bool = False, **blocks
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_a, grad_b, record of grad_a, record of grad_b) for contiguous g, a, b of one shape
    (both gradients always: computing one alone would save only its store); gelu_tanh: GeGLU's gate."""
    grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
    if a.numel() == 0:
        zero = torch.zeros(1, dtype=torch.int32, device=a.device)
        return grad_a, grad_b, zero, zero.clone()
    record_a, record_b = _launch(swiglu_backward_kernel, (g, a, b), (grad_a, grad_b), 2,
                                 **(blocks or BACKWARD_BLOCKS), gelu_tanh=gelu_tanh).chunk(2)
    return grad_a, grad_b, record_a, record_b


def _check_halves(y: torch.Tensor, gate_half: int) -> None:
    if not y.is_contiguous() or y.dim() < 1 or y.shape[-1] % 2 or gate_half not in (0, 1):
        raise ValueError(f"swiglu_halves: y must be contiguous with an even last dim and gate_half 0 or 1, got "
                         f"shape {tuple(y.shape)}, strides {y.stride()}, gate_half {gate_half!r}")


def swiglu_halves_triton(y: torch.Tensor, gate_half: int = 0, gelu_tanh: bool = False, **blocks
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, amax record of h): silu(gate) * up (gelu_tanh: GeGLU's gate) of the halves of a contiguous
    y [..., 2 F] (`halves`), read in place; h is [..., F], contiguous."""
    _check_halves(y, gate_half)
    a, b = halves(y, gate_half)
    width = y.shape[-1] // 2
    h = torch.empty((*y.shape[:-1], width), dtype=y.dtype, device=y.device)
    if h.numel() == 0:
        return h, torch.zeros(1, dtype=torch.int32, device=y.device)
    record = _launch(swiglu_kernel, (a, b), (h,), 1, **(blocks or FORWARD_BLOCKS), gelu_tanh=gelu_tanh,
                     n=h.numel(), width=width, in_stride=2 * width)
    return h, record


def swiglu_halves_backward_triton(g: torch.Tensor, y: torch.Tensor, gate_half: int = 0, gelu_tanh: bool = False,
                                  **blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, amax record of dy) for h = swiglu_halves(y) and a contiguous dh = g: both halves' gradients
    written into one dy of y's shape; the record is both halves' partials."""
    _check_halves(y, gate_half)
    dy = torch.empty_like(y)
    if y.numel() == 0:
        return dy, torch.zeros(1, dtype=torch.int32, device=y.device)
    a, b = halves(y, gate_half)
    grad_a, grad_b = halves(dy, gate_half)
    width = y.shape[-1] // 2
    record = _launch(swiglu_backward_kernel, (g, a, b), (grad_a, grad_b), 2, **(blocks or BACKWARD_BLOCKS),
                     gelu_tanh=gelu_tanh, n=g.numel(), width=width, in_stride=2 * width)
    return dy, record
