"""convert_to_float8_training: make nn.Linear layers Float8Linear in place, and say what was done."""

import logging
from typing import Callable

from torch import nn

from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .class_swap import swap_class, swap_reason
from .config import Float8Config
from .linear import Float8Linear, features_reason

logger = logging.getLogger("f8tensor")

# Set on an nn.Linear that conversion left alone, read by conversion_summary.
SKIP_REASON_ATTR = "_f8tensor_skip_reason"

# Layers with a dimension this small or smaller stay in high precision under the default filter:
# fp8 measured slower there (docs/benchmarks.md, "Linear layers").
MIN_DEFAULT_DIM = 1024

# Keywords of convert_to_float8_training before 0.2.0, now switches of fuse_model_ops.
_MOVED_KEYWORDS = {"fuse_rms_norm": "rms_norm", "fuse_swiglu": "swiglu", "fuse_rope": "rope"}


def subclass_reason(mod: nn.Linear) -> str | None:
    """Why an nn.Linear (or a subclass) cannot run Float8Linear's forward in place of its own, or
    None (core/class_swap.py): an instance-level forward, as accelerate's hooks install, included."""
    if isinstance(mod, NonDynamicallyQuantizableLinear):
        return (f"{type(mod).__name__}: nn.MultiheadAttention reads its weight itself, its forward never runs")
    return swap_reason(mod, nn.Linear, Float8Linear, attributes=("config",))


def required_skip_reason(mod: nn.Linear, config: Float8Config) -> str | None:
    """Why a layer cannot run in float8 at all, or None (the blockwise recipe pads its GEMMs: any
    features but zero)."""
    return features_reason(mod.in_features, mod.out_features, config)


def default_skip_reason(mod: nn.Linear, config: Float8Config) -> str | None:
    """Why the default filter keeps a layer in high precision, or None to convert it."""
    reason = required_skip_reason(mod, config)
    if reason is None and min(mod.in_features, mod.out_features) <= MIN_DEFAULT_DIM:
        reason = (f"{mod.in_features}->{mod.out_features}: a dimension <= {MIN_DEFAULT_DIM}, "
                  "where fp8 measured slower than bf16")
    return reason


def convert_to_float8_training(
    module: nn.Module, *, module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    config: Float8Config | None = None, **removed,
) -> nn.Module:
    """Make every nn.Linear in `module` a Float8Linear, in place; nothing else in the model changes
    (f8tensor.fuse_model_ops is the separate call that fuses norms, the SwiGLU gate and RoPE). The
    layer object stays: its class becomes Float8Linear, and its parameters, buffers, hooks,
    attributes, training flag and every reference to it are kept (a pruned or weight-normed layer's
    reparametrization goes on running before its forward). A subclass of nn.Linear that keeps
    nn.Linear's forward (torchtitan 0.3's Linear) becomes a same-named subclass of Float8Linear and
    of its own class, keeping its methods; one that overrides forward, or a layer with a forward of
    its own on the instance, is kept, with the reason (core/class_swap.py).

    Same call shape as torchao.float8.convert_to_float8_training. module_filter_fn(mod, fqn)
    returns True to convert. Without it, the default filter also keeps layers with a dimension of
    1024 or less (MIN_DEFAULT_DIM). Layers whose dims are not multiples of 16 are always kept
    (_scaled_mm cannot run them) but under the blockwise recipe, which pads its GEMMs; kept layers are logged (logger "f8tensor") and listed by
    conversion_summary. Optimizers built before conversion keep working, and the layer's forward,
    backward and state-dict hooks (parallelize_module's among them) keep running; with
    Float8Config(fsdp_float8_all_gather=True) the weights become new Float8AllGatherWeight
    parameters instead (distributed/fsdp_float8.py). Converting again with the same config (or
    none) is a no-op; with another config, a ValueError. Returns the module.
    """
    if removed:
        moved = [name for name in removed if name in _MOVED_KEYWORDS]
        if moved:
            calls = ", ".join(f"{_MOVED_KEYWORDS[name]}={removed[name]!r}" for name in moved)
            raise TypeError(
                f"convert_to_float8_training() no longer takes {', '.join(moved)}: since f8tensor 0.2.0 it "
                f"converts linear layers only; call f8tensor.fuse_model_ops(model, {calls}) for the "
                "norm, gate and RoPE fusions")
        raise TypeError(f"convert_to_float8_training() got an unexpected keyword argument {next(iter(removed))!r}")

    def convert(mod: nn.Module, fqn: str) -> nn.Module:
        if isinstance(mod, Float8Linear):
            if given_config is not None and mod.config != given_config:
                raise ValueError(
                    f"convert_to_float8_training: {fqn or '<root>'} is a Float8Linear already, with another "
                    f"config ({mod.config} against {given_config}); convert a model once, or set each layer's "
                    "config attribute")
            return mod
        if not isinstance(mod, nn.Linear):
            return mod
        reason = subclass_reason(mod)
        if reason is None and module_filter_fn is None:
            reason = default_skip_reason(mod, config)
        elif reason is None:  # the divisibility rule is a requirement of _scaled_mm, so it holds under any filter
            reason = required_skip_reason(mod, config)
            if reason is None and not module_filter_fn(mod, fqn):
                reason = "excluded by module_filter_fn"
        if reason is not None:
            setattr(mod, SKIP_REASON_ATTR, reason)
            logger.info("f8tensor: keeping %s in high precision: %s", fqn or "<root>", reason)
            return mod
        if type(mod) is nn.Linear:
            mod.__class__ = Float8Linear
        else:
            swap_class(mod, Float8Linear)  # a subclass keeps its methods too
        mod.config = config
        if config.fsdp_float8_all_gather:
            from ..distributed.fsdp_float8 import wrap_weight

            wrap_weight(mod, config)
        return mod

    given_config = config
    config = config or Float8Config()
    for fqn, mod in list(module.named_modules()):  # each module once, however often it is registered
        convert(mod, fqn)
    return module


def conversion_summary(module: nn.Module) -> str:
    """A table of every linear layer: float8, or kept in high precision with the reason; then every
    other module holding weights of three or more dims (batched matrices, as mixture-of-experts
    layers hold their experts), which conversion does not reach."""
    rows, batched = [], []
    for fqn, mod in module.named_modules():
        if isinstance(mod, nn.Linear):
            status = ("float8" if isinstance(mod, Float8Linear)
                      else "kept: " + getattr(mod, SKIP_REASON_ATTR, "not converted"))
            rows.append((fqn or "<root>", f"{mod.in_features}->{mod.out_features}", status))
        else:
            shapes = [f"{name} {list(p.shape)}" for name, p in mod.named_parameters(recurse=False) if p.dim() >= 3]
            if shapes:
                batched.append((fqn or "<root>", ", ".join(shapes)))
    converted = sum(r[2] == "float8" for r in rows)
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"f8tensor: {converted} of {len(rows)} linear layers in float8"]
    lines += [f"  {name:<{width}}  {dims:<11}  {status}" for name, dims, status in rows]
    if batched:
        lines.append(f"{len(batched)} modules with weights of three or more dims (a mixture of experts' batched "
                     "experts, convolutions), not linear layers: conversion swaps nn.Linear only, these stay "
                     "as they are")
        lines += [f"  {name}  {shapes}" for name, shapes in batched]
    return "\n".join(lines)
