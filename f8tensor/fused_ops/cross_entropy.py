"""cross_entropy(logits, target) = F.cross_entropy(logits.float(), target), the language-model loss
as torchtitan and Hugging Face write it, in one pass over the logits each way.

    loss = cross_entropy(model(tokens).flatten(0, 1), labels.flatten())
                                instead of  F.cross_entropy(model(tokens).flatten(0, 1).float(), labels.flatten())

In eager PyTorch the written loss copies the bf16 logits [tokens, vocab] to fp32, writes their
fp32 log_softmax (which autograd keeps for backward), and backward writes fp32 gradients twice
before casting them back: at Llama 3's 128256-entry vocabulary the largest tensors of a step, and
the loss is what torch.compile fuses when torchtitan compiles it. Here forward reads the logits
once and keeps them (not a copy) with one fp32 logsumexp per row; backward reads them once more and
writes their gradient in their dtype (`kernels/cross_entropy.py`). Values: fp32 math, as the
written code's; they agree with it to fp32 rounding at the magnitude of the rows' logsumexp, not
bit for bit (the gradient within one unit in the last place of its dtype plus that), except that an
ignored row's gradient is 0 even where the row holds a NaN or infinite logit (PyTorch's is NaN).

For Hugging Face models, which compute the loss inside forward when given labels:

    model.loss_function = causal_lm_loss        (transformers' ForCausalLMLoss through cross_entropy)

Under torch.compile it is the written code in plain ops, which inductor fuses itself; on tensor
subclasses (DTensor, ...), under torch.func transforms and forward-mode AD too. With
create_graph=True its backward is plain ops (softmax minus the one-hot target), which differentiate.
"""

import torch

from ..kernels import INPUT_DTYPES, cross_entropy_backward, cross_entropy_forward
from .kernel_path import kernels_can_run

REDUCTIONS = ("mean", "sum", "none")


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction):
        loss, lse = cross_entropy_forward(logits, target, ignore_index)
        ctx.save_for_backward(logits, target, lse)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        ctx.count = (target != ignore_index).sum()  # a device tensor: no wait for the GPU
        return loss.sum() / ctx.count

    @staticmethod
    def backward(ctx, grad):
        logits, target, lse = ctx.saved_tensors
        g = grad.float()
        if ctx.reduction == "mean":
            g = g / ctx.count  # every row's factor: 0-d
        if torch.is_grad_enabled():  # create_graph=True: plain ops, so the gradient differentiates
            keep = (target != ctx.ignore_index).unsqueeze(1)
            # (no F.one_hot: on CUDA it checks the targets' range on the host, a sync)
            onehot = torch.arange(logits.shape[1], device=logits.device) == target.unsqueeze(1)
            factor = torch.where(keep, g.unsqueeze(-1), 0.0)  # (all rows ignored under "mean": g is inf)
            dx = (torch.softmax(logits.float(), dim=1) - onehot.float()) * factor
            return dx.to(logits.dtype), None, None, None
        return cross_entropy_backward(logits, target, lse, g.contiguous(), ctx.ignore_index), None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction) for
    logits [N, V] (bf16, fp16 or fp32; a copy is made where the columns are not contiguous) and
    class indices target [N] (int64) on the same device: fp32, a scalar, or [N] for reduction
    "none". A target outside [0, V) other than ignore_index gives its row a NaN loss and gradient on a CUDA device,
    where PyTorch's own kernel stops on a device-side assert (on a CPU both raise)."""
    if not (isinstance(logits, torch.Tensor) and isinstance(target, torch.Tensor)):
        raise TypeError(f"cross_entropy takes two tensors, got {type(logits).__name__} and {type(target).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy takes logits [N, V] (flatten the rest first: logits.flatten(0, -2)), "
                         f"got {tuple(logits.shape)}")
    if logits.dtype not in INPUT_DTYPES:
        raise TypeError(f"cross_entropy takes bfloat16, float16 or float32 logits, got {logits.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"cross_entropy takes class indices as int64 (target.long()), got {target.dtype}; "
                        "class probabilities are not supported")
    if target.shape != logits.shape[:1] or target.device != logits.device:
        raise ValueError(f"cross_entropy needs target [N] on the logits' device for logits [N, V], got "
                         f"{tuple(target.shape)} on {target.device} and {tuple(logits.shape)} on {logits.device}")
    if logits.shape[1] == 0:
        raise ValueError("cross_entropy needs at least one class (V > 0)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction is one of {REDUCTIONS}, got {reduction!r}")
    if type(ignore_index) is not int:
        raise TypeError(f"cross_entropy: ignore_index is an int, got {type(ignore_index).__name__}")
    if not kernels_can_run(logits, target):  # the written code: inductor fuses it, subclasses dispatch it
        return torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=ignore_index,
                                                 reduction=reduction)
    if logits.stride(1) != 1 and logits.shape[1] > 1:  # (.contiguous() keeps any stride of a dim of size 1)
        logits = logits.contiguous()
    return _CrossEntropyFn.apply(logits, target.contiguous(), ignore_index, reduction)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Hugging Face transformers' `ForCausalLMLoss` (the loss of every `*ForCausalLM` model, which
    `model.loss_function = causal_lm_loss` replaces) through cross_entropy: the labels shifted one
    token left and padded with ignore_index (or shift_labels as given), the mean over the tokens not
    ignored, or the sum divided by num_items_in_batch where the Trainer passes it. Other keyword
    arguments are accepted and unused, as transformers' own loss does."""
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return cross_entropy(logits, shift_labels, ignore_index)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    return cross_entropy(logits, shift_labels, ignore_index, reduction="sum") / num_items_in_batch
