"""The norm swap: every nn.RMSNorm (exact type) becomes f8tensor.RMSNorm, which holds the same
weight Parameter and hooks (fused_ops/rms_norm.py). It reads no bytecode: a module of that type
computes F.rms_norm by PyTorch's own contract."""

from torch import nn

from ..fused_ops.rms_norm import RMSNorm
from ..kernels.limits import RMS_NORM_MAX_D
from .fused_class import EXCLUDED

# Set on an nn.RMSNorm that the swap left alone: why (fusion_report reads it).
NORM_ATTR = "_f8tensor_rms_norm"
_ROOT = "the model itself is an nn.RMSNorm: fuse_model_ops swaps submodules (wrap it in a container)"


def swap_norms(model: nn.Module, accept) -> None:
    """Swap every nn.RMSNorm below the model that accept(module, fqn) accepts; record why not for the
    others and for subclasses of nn.RMSNorm (their forward may differ)."""
    for fqn, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.RMSNorm:
                if accept(child, f"{fqn}.{name}" if fqn else name):
                    setattr(parent, name, RMSNorm.from_norm(child))
                else:
                    child.__dict__[NORM_ATTR] = EXCLUDED
            elif isinstance(child, nn.RMSNorm) and not isinstance(child, RMSNorm):
                child.__dict__[NORM_ATTR] = f"{type(child).__name__}: only exact nn.RMSNorm is swapped"
    if type(model) is nn.RMSNorm:
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
