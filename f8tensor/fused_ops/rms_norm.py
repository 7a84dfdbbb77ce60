"""RMSNorm: nn.RMSNorm with forward and backward each one pass, float8-aware.

A norm in a transformer block feeds float8 layers (q/k/v after the attention norm, w1/w3 after
the FFN norm). In eager PyTorch those layers read the norm's output once more for its amax before
casting it; here the norm's forward measures the amax of what it writes and hands it to them
(tensor_cache.produced_amax), so they skip that pass. The backward is one pass writing the input
gradient and per-program partial weight gradients (PyTorch's CUDA backward is two kernels).
Autograd saves what PyTorch's saves (x, the weight, rstd).

`fuse_model_ops` makes nn.RMSNorm modules this class in place (the same objects, with their
parameters, buffers, hooks and attributes: this class holds no state of its own; `rms_norm=False`
keeps them), and runs norms of Hugging Face's form through
`fused_rms_norm(..., cast_before_weight=True)` (fusion/norm_proof.py): the normalized values rounded
to x's dtype before the weight, as that code writes it. Values otherwise: fp32 math, one rounding
(`kernels.naive.rms_norm_ref`, the formula of PyTorch's fused CUDA kernel); on the GPU within one
unit in the last place of the reference in forward, as PyTorch's own kernel (they sum in different
orders); the input gradient's two terms cancel in places, where fp32 rounding of the terms decides.

PyTorch's own rms_norm runs instead under torch.compile (inductor fuses it), for tensor subclasses
(DTensor under sequence parallelism, ...), under torch.func transforms and forward-mode AD, under
autocast (which decides the norm's dtype), and where the fused kernel does not apply: a
normalized_shape of more than one dim, a weight of another dtype, device or shape than x's
(PyTorch's error then) or not contiguous, rows longer than `kernels.limits.RMS_NORM_MAX_D` on the GPU.
"""

import torch
from torch import nn

from ..core.class_swap import QuietSubclasses
from ..core.linear import share_hooks
from ..core.tensor_cache import produced_amax
from ..kernels import INPUT_DTYPES, rms_norm_backward, rms_norm_backward_ref, rms_norm_ref, rms_norm_with_amax
from ..kernels.limits import RMS_NORM_MAX_D
from .kernel_path import kernels_can_run


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, cast_before_weight):
        y, rstd, record = rms_norm_with_amax(x, weight, eps, cast_before_weight)
        produced_amax.put(y, record)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps, ctx.cast_before_weight = eps, cast_before_weight
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: plain ops, so the gradients differentiate
            # (rstd computed again from x: the saved one carries no graph)
            rstd = rms_norm_ref(x, weight, ctx.eps)[1]
            dx, dweight = rms_norm_backward_ref(g, x, weight, rstd, ctx.cast_before_weight)
        else:
            dx, dweight = rms_norm_backward(g.contiguous(), x, weight, rstd, ctx.cast_before_weight)
        need_x, need_w = ctx.needs_input_grad[:2]
        return dx if need_x else None, dweight if need_w else None, None, None


def fused_rms_norm_applies(x: torch.Tensor, weight: torch.Tensor | None, normalized_shape: tuple | None = None) -> bool:
    """Whether the fused kernels normalize x over its last dim (normalized_shape, if given, must be
    that one dim) with this weight as the written ops would: plain tensors of one floating dtype
    and device, a contiguous weight of that dim, no autocast (which decides the dtypes), not while
    torch.compile traces, rows no longer than the kernel takes on CUDA."""
    tensors = (x,) if weight is None else (x, weight)
    if not kernels_can_run(*tensors) or torch.is_autocast_enabled(x.device.type) or x.dim() < 1:
        return False
    shape = (x.shape[-1],)
    return ((normalized_shape is None or tuple(normalized_shape) == shape) and x.dtype in INPUT_DTYPES
            and (weight is None or (weight.dtype == x.dtype and weight.device == x.device
                                    and tuple(weight.shape) == shape and weight.is_contiguous()))
            and (not x.is_cuda or x.shape[-1] <= RMS_NORM_MAX_D))


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                   cast_before_weight: bool = False) -> torch.Tensor:
    """x normalized over its last dim, times weight: fp32 math and one rounding (nn.RMSNorm's
    form), or with cast_before_weight rounded to x's dtype before the weight and again after it
    (Hugging Face's form). For inputs fused_rms_norm_applies accepts."""
    return _RMSNormFn.apply(x.contiguous(), weight, float(eps), bool(cast_before_weight))


class RMSNorm(QuietSubclasses, nn.RMSNorm):
    """Drop-in nn.RMSNorm (same constructor, parameters and state_dict) with fused kernels. It
    defines no __init__ and no state beyond nn.RMSNorm's, so that an nn.RMSNorm's class can be
    made this one in place (fusion/norm_swap.py)."""

    @classmethod
    def from_norm(cls, mod: nn.RMSNorm) -> "RMSNorm":
        """A new RMSNorm holding mod's own weight Parameter (optimizers keep working), eps, shape,
        training flag and hook dicts (hooks registered on mod run on the new module; their handles
        still remove them). Only those: mod's buffers and other attributes are not carried, the
        parent still holds mod, and load_state_dict pre-hooks registered with
        register_load_state_dict_pre_hook hold mod weakly and fail once it is freed.
        fuse_model_ops changes the class in place instead, which keeps everything. A pruned or
        parametrized norm, whose weight is computed rather than a Parameter, is refused."""
        if mod.weight is not None and not isinstance(mod.weight, nn.Parameter):
            raise TypeError(
                f"RMSNorm.from_norm: the norm's weight is a computed {type(mod.weight).__name__}, not a Parameter "
                "(pruning or a parametrization recomputes it before each forward), which a new module cannot "
                "take over; call f8tensor.fuse_model_ops on its parent, which changes the norm's class in place")
        with torch.device("meta"):
            new = cls(mod.normalized_shape, mod.eps, elementwise_affine=False)
        new.elementwise_affine = mod.elementwise_affine
        new.weight = mod.weight
        share_hooks(new, mod)
        new.train(mod.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_rms_norm_applies(x, self.weight, self.normalized_shape):
            return super().forward(x)
        # eps=None: the fp32 epsilon, as PyTorch's kernel (it computes in fp32 for bf16/fp16 too).
        eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
        return fused_rms_norm(x, self.weight, eps)
