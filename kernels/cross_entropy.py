"""Cross-entropy of logits [N, V] against class indices, forward and backward each in one pass over
the logits, fp32 math on logits of any input dtype, no fp32 copy of them.

Reference: `naive.cross_entropy_ref` and `naive.cross_entropy_backward_ref`, which are PyTorch's
own `F.cross_entropy(logits.float(), target, reduction="none")` and its gradient. Forward, per row
(one program each): the running max m and sum s of exp(x - m) over blocks of the row (the sum
rescaled when the max grows), lse = m + log s, loss = lse - x[target]; the row's lse is kept for
backward. Backward: (exp(x - lse) - [column == target]) * g[row], rounded once to the logits'
dtype. PyTorch computes log_softmax in two passes and subtracts in another order, and Triton's exp
is the GPU's fast one, so values agree with the reference to fp32 rounding at the magnitude of lse,
not bit for bit (the gradient within one unit in the last place of its dtype plus that).

A row whose target equals ignore_index has loss 0 and gradient 0, as PyTorch gives (also where
the row holds a NaN or infinite logit, for which PyTorch's gradient is NaN). A target outside
[0, V) gives its row a NaN loss and a NaN gradient (PyTorch's CUDA kernel stops on a device-side
assert; a check on the host would wait for the GPU). A row with a NaN or infinite logit has a NaN
loss.
"""

import torch
import triton
import triton.language as tl

from .launch import launch_kernel

# Columns per step of a row's loop and warps per row, each pass its fastest of the H200 sweep
# (`benchmarks/cross_entropy.py --sweep`; docs/benchmarks.md, "The loss").
FORWARD_BLOCK_V, FORWARD_WARPS = 8192, 4
BACKWARD_BLOCK_V, BACKWARD_WARPS = 4096, 16


@triton.jit
def cross_entropy_forward_kernel(x_ptr, target_ptr, loss_ptr, lse_ptr, V, stride_row, ignore_index,
                                 BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far: nothing to rescale
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
    lse = m + tl.log(s)
    t = tl.load(target_ptr + row)
    keep = t != ignore_index
    inside = (t >= 0) & (t < V)
    x_t = tl.load(base + t, mask=keep & inside, other=0.0).to(tl.float32)
    loss = tl.where(keep, tl.where(inside, lse - x_t, float("nan")), 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit
def cross_entropy_backward_kernel(x_ptr, target_ptr, lse_ptr, g_ptr, dx_ptr, V, stride_row, dx_stride_row,
                                  g_stride, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    out = dx_ptr + row * dx_stride_row
    lse = tl.load(lse_ptr + row)
    t = tl.load(target_ptr + row)
    g = tl.load(g_ptr + row * g_stride)
    keep = t != ignore_index
    inside = (t >= 0) & (t < V)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        p = tl.where(cols == t, p - 1.0, p)
        dx = tl.where(keep, tl.where(inside, p * g, float("nan")), 0.0)
        tl.store(out + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 2 or (logits.stride(1) != 1 and logits.shape[1] > 1) or target.dim() != 1 or not target.is_contiguous():
        raise ValueError("cross_entropy kernels take logits [N, V] with unit column stride and a contiguous "
                         f"target [N], got {tuple(logits.shape)} strides {logits.stride()} and {tuple(target.shape)}")


def cross_entropy_forward_triton(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                                 block_v: int = FORWARD_BLOCK_V, num_warps: int = FORWARD_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss fp32 [N], lse fp32 [N]) of logits [N, V] (unit column stride) and int64 target [N]."""
    _check(logits, target)
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        launch_kernel(cross_entropy_forward_kernel, (N,), (logits, target, loss, lse, V, logits.stride(0), ignore_index),
                      num_warps, BLOCK_V=block_v)
    return loss, lse


def cross_entropy_backward_triton(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                                  ignore_index: int, block_v: int = BACKWARD_BLOCK_V,
                                  num_warps: int = BACKWARD_WARPS) -> torch.Tensor:
    """The gradient of loss[i] * g[i] summed over rows, of logits' shape and dtype (contiguous), for
    g fp32 [N] or a 0-d fp32 g (one factor for every row)."""
    _check(logits, target)
    N, V = logits.shape
    dx = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N:
        g_stride = 0 if g.dim() == 0 else g.stride(0)
        launch_kernel(cross_entropy_backward_kernel, (N,),
                      (logits, target, lse, g, dx, V, logits.stride(0), dx.stride(0), g_stride, ignore_index),
                      num_warps, BLOCK_V=block_v)
    return dx
