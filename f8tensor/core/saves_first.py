"""Float8Linear under saved-tensor hooks: the layer's saves come before its forward GEMM, so that an
early-stopping recomputation skips a GEMM whose output it never reads.

Non-reentrant activation checkpointing (`torch.utils.checkpoint(..., use_reentrant=False)`, which
torchtitan and Hugging Face use) runs a block's forward again in backward and, with early stop
(PyTorch's default and Hugging Face's; torchtitan's trainer sets it off unless
`--activation_checkpoint.early_stop`), stops as soon as the last tensor the block saved has been
recomputed. An autograd Function's saved tensors are packed when its forward returns, after its
GEMM. So when a layer's saves are the block's last (a Llama block's down projection, `w2` / `down_proj`: only a residual
add, which saves nothing, follows), every recomputation runs that layer's forward GEMM for an
output nothing reads: one GEMM of seven in a Llama block, about a quarter of its forward FLOPs.
torch.compile's partitioner leaves such ops out of its recomputation; eager checkpointing cannot.

While saved-tensor hooks are active (checkpointing, or offloading such as `save_on_cpu`), and not
while torch.compile traces (its partitioner decides there), Float8Linear therefore runs as two
autograd Functions:
- the layer's own Function with `deferred` given: the casts and the saves as always, the GEMM's
  operands handed back in `deferred`, and a placeholder of the output's shape returned (one
  element, expanded) whose gradient is the output's;
- `_Gemm`: that GEMM, saving nothing; its backward hands grad_output to the layer's backward as it is.

The same tensors are saved, in the same order, and the same kernels and GEMMs run on the same
operands: outputs and gradients are bit-identical to the one-Function form. Recomputation stops
inside the first Function when its saves are the last; else it runs `_Gemm` too. With early stop
off the recomputation runs past the last saves: where a layer's saves were the last
(`torch_internals.recomputation_saves_complete`), `_Gemm` gets no operands and returns a zero
tensor of the output's shape instead of running the GEMM (a memset; `Float8Config.recompute_unread_gemm=True`
runs the GEMM); the rest of that forward runs on those zeros, in-place ops and collectives
included, and nothing of it reaches backward. Not under selective
checkpointing's dispatch modes, which replay op outputs by call order. The cost is one
more autograd node per layer (host time), paid only under saved-tensor hooks, and the forward's
float8 operands live until `_Gemm` runs (the rowwise and blockwise forwards otherwise free them
before casting x column-major).
"""

import torch

from ..torch_internals import recomputation_saves_complete, saved_tensors_hooks_active, selective_checkpointing_active
from .ops import scaled_mm_data


def forward_output(x, bias, config, a, scale_a, b, scale_b, deferred: list | None) -> torch.Tensor:
    """A Float8Linear Function's forward output, x's dtype and leading dims: a @ b (+ bias) through
    `scaled_mm_data`, or, where the GEMM is deferred (`deferred` a list), a placeholder of that
    shape and dtype, with the GEMM's arguments appended to `deferred` for `_Gemm`."""
    gemm_args = (a, scale_a, b, scale_b, x.dtype, config.fast_accum_output, config,
                 None if bias is None else bias.to(x.dtype))
    out_shape = (*x.shape[:-1], b.shape[1])
    if deferred is None:
        return _gemm(gemm_args, out_shape)
    deferred.append(gemm_args)
    return stand_in(out_shape, x.dtype, a.device)


def stand_in(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of this shape, dtype and device holding no values (one element, expanded): the
    deferred GEMM's placeholder output, and what a checkpoint's first forward saves in place of a
    float8 copy its recomputation makes (checkpointing keeps only the shape, dtype and device)."""
    return torch.empty((), dtype=dtype, device=device).expand(shape)


def is_stand_in(t: torch.Tensor) -> bool:
    """Whether t looks like `stand_in`'s result: more than one element, every stride 0."""
    return t.numel() > 1 and not any(t.stride())


def _gemm(gemm_args: tuple, out_shape: tuple) -> torch.Tensor:
    # _unsafe_view, as matmul does: a view output would trip FSDP2's in-place safety warning.
    return torch.ops.aten._unsafe_view(scaled_mm_data(*gemm_args), out_shape)


class _Gemm(torch.autograd.Function):
    """The deferred forward GEMM (with gemm_args None: a zero tensor of its shape in its place, a
    tensor of its own, which in-place code and collectives after the layer may write): the gradient
    of its output is the placeholder's."""

    @staticmethod
    def forward(ctx, placeholder, gemm_args):
        if gemm_args is None:  # skipped (apply_saving_first): zeros, so what follows computes on defined values
            return torch.zeros(placeholder.shape, dtype=placeholder.dtype, device=placeholder.device)
        return _gemm(gemm_args, placeholder.shape)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None


def apply_saving_first(fn, x, weight, bias, config, grad_enabled: bool) -> torch.Tensor:
    """`fn.apply(x, weight, bias, config, grad_enabled, deferred)` for a Float8Linear autograd
    Function `fn`: in one Function, or, under saved-tensor hooks outside torch.compile and when a
    gradient can flow, with its GEMM in a second one after its saves."""
    if not (grad_enabled and (x.requires_grad or weight.requires_grad or bias is not None and bias.requires_grad)
            and not torch.compiler.is_compiling() and saved_tensors_hooks_active()):
        return fn.apply(x, weight, bias, config, grad_enabled, None)
    deferred = []
    placeholder = fn.apply(x, weight, bias, config, grad_enabled, deferred)
    if not config.recompute_unread_gemm and recomputation_saves_complete() and not selective_checkpointing_active():
        # These saves were the checkpoint's last: the recomputation's output reaches no backward.
        return _Gemm.apply(placeholder, None)
    return _Gemm.apply(placeholder, deferred[0])
