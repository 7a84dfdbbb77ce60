"""The norm swap: every nn.RMSNorm becomes f8tensor.RMSNorm, which holds the same weight Parameter
and hooks (fused_ops/rms_norm.py); a subclass that keeps nn.RMSNorm's forward (torchtitan 0.3's)
takes f8tensor.RMSNorm's forward in place, keeping its own methods (core/class_swap.py). It reads
no bytecode: such a module computes F.rms_norm by PyTorch's own contract."""

from torch import nn

from ..core.class_swap import swap_class, swap_reason
from ..fused_ops.rms_norm import RMSNorm
from ..kernels.limits import RMS_NORM_MAX_D
from .fused_class import EXCLUDED

# Set on an nn.RMSNorm that the swap left alone: why (fusion_report reads it).
NORM_ATTR = "_f8tensor_rms_norm"
_ROOT = "the model itself is an nn.RMSNorm: fuse_model_ops swaps submodules (wrap it in a container)"


def swap_norms(model: nn.Module, accept) -> None:
    """Swap every nn.RMSNorm below the model that accept(module, fqn) accepts, and every subclass of
    it that keeps its forward; record why not for the others."""
    for fqn, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.RMSNorm:
                if accept(child, f"{fqn}.{name}" if fqn else name):
                    setattr(parent, name, RMSNorm.from_norm(child))
                else:
                    child.__dict__[NORM_ATTR] = EXCLUDED
            elif isinstance(child, nn.RMSNorm) and not isinstance(child, RMSNorm):
                # a subclass: in place, a same-named subclass of RMSNorm and of its own class, if it
                # keeps nn.RMSNorm's forward (core/class_swap.py)
                reason = swap_reason(child, nn.RMSNorm, RMSNorm)
                if reason is None and accept(child, f"{fqn}.{name}" if fqn else name):
                    swap_class(child, RMSNorm)
                else:
                    child.__dict__[NORM_ATTR] = reason or EXCLUDED
    if isinstance(model, nn.RMSNorm) and not isinstance(model, RMSNorm):
        model.__dict__[NORM_ATTR] = _ROOT


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
