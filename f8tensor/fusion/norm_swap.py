"""The norm swap: every nn.RMSNorm becomes f8tensor.RMSNorm in place, the object kept and its class
changed (f8tensor.RMSNorm holds no state of its own: fused_ops/rms_norm.py), so its parameters,
buffers, hooks (load_state_dict pre-hooks, which hold the module weakly, included), attributes,
training flag, every name it is registered under and every reference to it stay. A subclass that
keeps nn.RMSNorm's forward (torchtitan 0.3's) becomes a same-named subclass of f8tensor.RMSNorm
and of its own class, keeping its own methods; one that overrides forward, or a norm with a
forward of its own on the instance, is kept, with the reason (core/class_swap.py). It reads no
bytecode: such a module computes F.rms_norm by PyTorch's own contract."""

from torch import nn

from ..core.class_swap import swap_class, swap_reason
from ..fused_ops.rms_norm import RMSNorm
from ..kernels.limits import RMS_NORM_MAX_D
from .fused_class import EXCLUDED

# Set on an nn.RMSNorm that the swap left alone: why (fusion_report reads it).
NORM_ATTR = "_f8tensor_rms_norm"
_ROOT = "the model itself is an nn.RMSNorm: fuse_model_ops swaps submodules (wrap it in a container)"


def swap_norms(model: nn.Module, accept) -> None:
    """Swap, in place, every nn.RMSNorm below the model that accept(module, fqn) accepts, and every
    subclass of it that keeps its forward; record why not for the others. Each module once, under
    its first name, however often it is registered."""
    for fqn, mod in list(model.named_modules()):
        if not isinstance(mod, nn.RMSNorm) or isinstance(mod, RMSNorm):
            continue
        if mod is model:
            mod.__dict__[NORM_ATTR] = _ROOT
            continue
        reason = swap_reason(mod, nn.RMSNorm, RMSNorm)
        if reason is None and accept(mod, fqn):
            mod.__dict__.pop(NORM_ATTR, None)  # excluded by an earlier call's filter, if so
            if type(mod) is nn.RMSNorm:
                mod.__class__ = RMSNorm
            else:
                swap_class(mod, RMSNorm)  # a subclass keeps its own methods too
        else:
            mod.__dict__[NORM_ATTR] = reason or EXCLUDED


def report_row(mod: nn.Module) -> tuple[bool, str, bool] | None:
    """(fused, what or why not, excluded by the filter) for a norm the swap examined, else None."""
    if isinstance(mod, RMSNorm):
        if len(mod.normalized_shape) != 1:
            return False, "RMSNorm: PyTorch's kernel runs (the fused one normalizes one dim)", False
        if mod.normalized_shape[0] > RMS_NORM_MAX_D:
            return False, ("RMSNorm: PyTorch's kernel runs on CUDA (the fused one takes rows of at most "
                           f"{RMS_NORM_MAX_D})"), False
        return True, "RMSNorm fused", False
    reason = mod.__dict__.get(NORM_ATTR)
    if reason is None:
        return None
    return False, f"RMSNorm not swapped: {reason}", reason == EXCLUDED
