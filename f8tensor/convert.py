"""convert_to_float8_training: swap nn.Linear for Float8Linear in place, and say what was done."""

import logging
from typing import Callable

from torch import nn

from .config import Float8Config
from . import fuse_rope as rope_fusion
from .fuse_gate import GATE_ATTR, fuse_gate, is_candidate
from .linear import Float8Linear
from .kernels.rms_norm import MAX_D
from .rms_norm import RMSNorm

logger = logging.getLogger("f8tensor")

# Set on an nn.Linear that conversion left alone, read by conversion_summary.
SKIP_REASON_ATTR = "_f8tensor_skip_reason"


# Layers with a dimension this small or smaller stay bf16 by default: on an H200 their fp8
# forward+backward was slower than bf16 (4096->1024: 0.26x-0.58x at M = 1024..16384; 8192->1024:
# 0.29x-0.35x at M <= 4096) or gained little and unsteadily (8192->1024 at M = 16384: 1.00x-1.27x
# over three runs), while every layer with both dims >= 4096 gained 1.48x-1.75x at M = 16384
# (docs/benchmarks.md, benchmarks/linear.py).
MIN_DEFAULT_DIM = 1024


def required_skip_reason(mod: nn.Linear) -> str | None:
    """Why a layer cannot run in float8 at all, or None."""
    if mod.in_features % 16 or mod.out_features % 16:
        return (f"in_features={mod.in_features}, out_features={mod.out_features}: "
                "_scaled_mm needs both divisible by 16")
    return None


def default_skip_reason(mod: nn.Linear) -> str | None:
    """Why the default filter keeps a layer in high precision, or None to convert it."""
    reason = required_skip_reason(mod)
    if reason is None and min(mod.in_features, mod.out_features) <= MIN_DEFAULT_DIM:
        reason = (f"{mod.in_features}->{mod.out_features}: a dimension <= {MIN_DEFAULT_DIM}, "
                  "where fp8 measured slower than bf16")
    return reason


def convert_to_float8_training(
    module: nn.Module, *, module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    config: Float8Config | None = None, fuse_rms_norm: bool = True, fuse_swiglu: bool = True,
    fuse_rope: bool = True,
) -> nn.Module:
    """Replace every nn.Linear (exact type, not subclasses) in `module` with a Float8Linear, and
    every nn.RMSNorm (exact type) with f8tensor.RMSNorm unless fuse_rms_norm is False.

    Same call shape as torchao.float8.convert_to_float8_training. module_filter_fn(mod, fqn)
    returns True to convert. Without it, the default filter also keeps layers with a dimension of
    1024 or less (fp8 measured slower there). Layers whose dims are not multiples of 16 are always
    kept (_scaled_mm cannot run them); kept layers are logged (logger "f8tensor") and listed by
    conversion_summary.
    Parameters are moved, not copied, so optimizers built before conversion keep working; so are
    the layer's forward, backward and state-dict hooks (parallelize_module's among them).
    Converting twice is a no-op. Returns the module (a new one if `module` itself is an nn.Linear
    or an nn.RMSNorm that is swapped).
    fuse_rms_norm: swap every exact nn.RMSNorm (module_filter_fn decides for linears only) for
    f8tensor.RMSNorm: one pass each way, and the amax of its output handed to the float8 layers that
    read it (same parameters, state dict and hooks; forward values within one unit in the last
    place of PyTorch's kernel). False keeps them all.
    fuse_swiglu: a module whose forward is proven to be exactly down(silu(gate(x)) * up(x)) over
    three of its nn.Linear children (torchtitan's FeedForward; Hugging Face's LlamaMLP, with
    transformers 4's nn.SiLU or 5's SiLUActivation) computes
    its gate with f8tensor.swiglu instead (its class becomes a same-named subclass with that
    forward; f8tensor/fuse_gate.py says what is proven). Modules that look like one but are not
    proven are listed by conversion_summary with the reason. False leaves every module as it is.
    fuse_rope: a module whose forward calls, by its global name, a function proven to compute nothing
    but rotary embeddings x * cos + rotate_half(x) * sin of its arguments (Hugging Face's
    apply_rotary_pos_emb; one tensor at a time, with chunk or slices) runs that call as
    f8tensor.rope instead (its class becomes a same-named subclass running its own forward code with
    that one name rebound; f8tensor/fuse_rope.py says what is proven). False leaves them as they are.
    """
    config = config or Float8Config()

    def convert(mod: nn.Module, fqn: str) -> nn.Module:
        if fuse_rms_norm and type(mod) is nn.RMSNorm:
            return RMSNorm.from_norm(mod)
        if type(mod) is not nn.Linear:
            if isinstance(mod, nn.Linear) and not isinstance(mod, Float8Linear):
                setattr(mod, SKIP_REASON_ATTR, f"{type(mod).__name__}: only exact nn.Linear is converted")
            return mod
        if module_filter_fn is None:
            reason = default_skip_reason(mod)
        else:  # the divisibility rule is a requirement of _scaled_mm, so it holds under any filter
            reason = required_skip_reason(mod)
            if reason is None and not module_filter_fn(mod, fqn):
                reason = "excluded by module_filter_fn"
        if reason is not None:
            setattr(mod, SKIP_REASON_ATTR, reason)
            logger.info("f8tensor: keeping %s in high precision: %s", fqn or "<root>", reason)
            return mod
        return Float8Linear.from_float(mod, config)

    for fqn, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            new = convert(child, f"{fqn}.{name}" if fqn else name)
            if new is not child:
                setattr(parent, name, new)
    module = convert(module, "")
    if fuse_swiglu:  # after the swaps: the children are the converted layers
        for fqn, mod in module.named_modules():
            if is_candidate(mod):
                logger.info("f8tensor: %s: %s", fqn or "<root>", fuse_gate(mod))
    if fuse_rope:
        for fqn, mod in module.named_modules():
            if rope_fusion.is_candidate(mod):
                logger.info("f8tensor: %s: %s", fqn or "<root>", rope_fusion.fuse_rope(mod))
    return module


def conversion_summary(module: nn.Module) -> str:
    """A table of every linear layer (float8 or kept, with the reason), every RMSNorm (fused or not),
    every SwiGLU feed-forward conversion examined (gate fused, or why not) and every module calling
    a rotary function (RoPE fused, or why not)."""
    rows = []
    for fqn, mod in module.named_modules():
        if GATE_ATTR in mod.__dict__:
            gate = mod.__dict__[GATE_ATTR]
            rows.append((fqn or "<root>", "", f"SwiGLU gate not fused: {gate}" if isinstance(gate, str) else str(gate)))
        if rope_fusion.ROPE_ATTR in mod.__dict__:
            calls = mod.__dict__[rope_fusion.ROPE_ATTR]
            rows.append((fqn or "<root>", "", f"RoPE not fused: {calls}" if isinstance(calls, str) else str(calls)))
        if isinstance(mod, nn.Linear):
            dims = f"{mod.in_features}->{mod.out_features}"
            status = ("float8" if isinstance(mod, Float8Linear)
                      else "kept: " + getattr(mod, SKIP_REASON_ATTR, "not converted"))
        elif isinstance(mod, nn.RMSNorm):
            dims = "x".join(map(str, mod.normalized_shape))
            if not isinstance(mod, RMSNorm):
                status = "RMSNorm: PyTorch's (not converted)"
            elif len(mod.normalized_shape) != 1 or mod.normalized_shape[0] > MAX_D:
                status = f"RMSNorm: PyTorch's kernel runs (fused: one dim of at most {MAX_D})"
            else:
                status = "RMSNorm fused"
        else:
            continue
        rows.append((fqn or "<root>", dims, status))
    converted = sum(r[2] == "float8" for r in rows)
    linears = sum(not r[2].startswith(("RMSNorm", "SwiGLU", "RoPE")) for r in rows)
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"f8tensor: {converted} of {linears} linear layers in float8"]
    lines += [f"  {name:<{width}}  {dims:<11}  {status}" for name, dims, status in rows]
    return "\n".join(lines)
