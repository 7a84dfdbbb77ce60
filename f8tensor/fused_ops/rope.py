"""rope(x, cos, sin): rotary position embedding, fused.

    q = rope(q, cos, sin)        instead of  q * cos + rotate_half(q) * sin
                                 with rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

(Hugging Face's Llama `apply_rotary_pos_emb`, one tensor at a time), or with interleaved=True the
form that rotates adjacent pairs (x[2j], x[2j+1]) (Meta's Llama and torchtitan, written there as a
complex multiply by freqs_cis: cos = freqs_cis.real.repeat_interleave(2, dim=-1), sin likewise
from .imag; [S, 1, D] for x [B, S, H, D]). Not float8 work, but in an eager float8 model it is
the largest elementwise cost left: five kernels each way per tensor, over q and k at every layer,
strided where q is a transposed view, which torch.compile fuses away (docs/benchmarks.md says what
it costs). Here forward and backward are one pass each over x, read in place in any leading
layout; the gradient comes back in x's layout. Values: fp32 math, one rounding
(`kernels.naive.rope_ref`).

cos and sin: the tables, last dim D (each frequency twice: repeated over both halves, or twice in
a row for the interleaved form), broadcastable to x: [S, D] for x [..., S, D], [B, 1, S, D] per-sequence
positions for x [B, H, S, D], and so on. Under torch.compile, for tensor subclasses (DTensor, ...),
under torch.func transforms and forward-mode AD, and for tables that require grad it is the
reference in plain ops. The result has x's dtype (eager's formula would promote bf16 x times fp32
tables to fp32).
"""

import torch

from ..kernels import INPUT_DTYPES, rope_backward, rope_backward_ref, rope_forward, rope_ref
from .kernel_path import kernels_can_run


class _RoPEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        out = rope_forward(x, cos, sin, interleaved)
        ctx.save_for_backward(cos, sin)
        ctx.strides, ctx.interleaved = out.stride(), interleaved
        return out

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: plain ops, so the gradient differentiates
            return rope_backward_ref(g, cos, sin, ctx.interleaved), None, None, None
        if g.stride(-1) != 1:
            g = g.contiguous()
        return rope_backward(g, cos, sin, ctx.strides, ctx.interleaved), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (interleaved=True: the same rotation of adjacent pairs) for
    x of 2 to 4 dims [..., D] (D even) and tables cos, sin of last dim D broadcastable to x; the
    result has x's shape, dtype and (where x is dense with a contiguous last dim) layout."""
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rope takes tensors x, cos, sin; {name} is a {type(t).__name__}")
        if t.dtype not in INPUT_DTYPES:
            raise TypeError(f"rope takes bfloat16, float16 or float32 tensors; {name} is {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"rope: {name} is on {t.device}, x on {x.device}")
    if not 2 <= x.dim() <= 4 or x.shape[-1] % 2:
        raise ValueError(f"rope takes x of 2 to 4 dims with an even last dim (head_dim), got {tuple(x.shape)}")
    if cos.shape != sin.shape or cos.dim() == 0 or cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"rope needs cos and sin of one shape with last dim {x.shape[-1]} (x's), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    try:
        broadcast = torch.broadcast_shapes(x.shape, cos.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != x.shape:
        raise ValueError(f"rope: tables of shape {tuple(cos.shape)} do not broadcast to x {tuple(x.shape)} "
                         "(e.g. [S, D] for x [B, H, S, D], or [B, 1, S, D] for per-sequence positions)")
    return rope_checked(x, cos, sin, interleaved)


def rope_checked(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """rope for arguments already checked as rope checks them (the RoPE fusion checks
    more, per call, and skips rope's checks)."""
    if not kernels_can_run(x, cos, sin) or cos.requires_grad or sin.requires_grad:
        return rope_ref(x, cos, sin, interleaved)
    return _RoPEFn.apply(x if x.stride(-1) == 1 else x.contiguous(), cos, sin, bool(interleaved))
