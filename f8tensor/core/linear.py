"""Float8Linear: nn.Linear whose three GEMMs run in float8 through torch._scaled_mm.

    forward      out        = x_row      @ w_row.t()     [M, K] @ [K, N]   x e4m3 row-major, w.t() column-major (w as stored)
    backward     grad_x     = g_row      @ w_col         [M, N] @ [N, K]   g e5m2 row-major, w column-major
                 grad_w     = g_col.t()  @ x_col         [N, M] @ [M, K]   g.t() row-major, x column-major

The input and grad_output are quantized once, in both layouts from one read ("both"); forward saves
x_col (float8, half the bytes of bf16) for backward unless config.save_fp8_for_backward is False,
or unless autograd keeps x's storage anyway (x is a view of a tensor its producer saved, as the
attention output feeding wo is of SDPA's saved output): then x itself is saved, at no memory
cost, with forward's amax record, and cast column-major again in backward in one pass.
The weight is cast row-major in forward and column-major in backward, from the parameter itself,
so no float8 copy of it is held between forward and backward; backward reuses forward's amax of
the weight (autograd guarantees the saved parameter was not modified in between), so its cast
is one pass. With config.keep_fp8_weight both layouts are cast once, in one pass, and kept while
the weight is unchanged (weight_cache.py): micro-batches and recomputation reuse them. Under
torch.compile keep_fp8_weight casts both layouts in forward, in one pass, and saves the
column-major copy for backward (kept for that backward only). Under non-reentrant activation
checkpointing the first forward casts only what its GEMM reads (checkpointing drops its saves;
stand-ins of the same shapes are saved), and the recomputation casts the weight once, in both
layouts, with the first forward's amax (weight_amax.py), saving the column-major copy for the
backward that follows; a reentrant checkpoint's recomputation reuses that amax. Under saved-tensor hooks
(activation checkpointing) the forward GEMM runs after the saves, in an autograd Function of its
own (saves_first.py), so an early-stopping recomputation can skip it.

The autograd function works on raw float8 data and scales, not on Float8Tensor wrappers: the same
kernels and the same GEMM routine (`ops.scaled_mm_data`, which checks CUDA's rules) as the tensor
subclass, without a wrapper construction and a __torch_dispatch__ round trip per operand, which
eager training would pay in host time on every layer.
"""

import dataclasses
import sys

import torch
from torch.autograd.function import once_differentiable
from torch import nn

from ..distributed.fsdp_float8 import Float8AllGatherWeight, wrap_weight
from ..kernels import quantize_with_amax
from ..torch_internals import (checkpoint_phase, inside_backward, module_hook_attributes, saved_by_producer,
                               selective_checkpointing_active, transformed)
from . import weight_amax
from .class_swap import QuietSubclasses
from .config import Float8Config
from .linear_blockwise import _BlockwiseLinearFn
from .linear_rowwise import _RowwiseLinearFn, remember_shapes
from .ops import scaled_mm_data
from .saves_first import apply_saving_first, forward_output, is_stand_in, stand_in
from .tensor import Float8Tensor
from .tensor_cache import produced_amax, shared_input
from .weight_cache import fp8_weight


def _quantize_input(x, config, layouts):
    """x as (row | None, col | None, scale, amax record), reusing the previous layer's quantization
    of the same x, and the amax its producer measured (f8tensor.swiglu's output)."""
    if isinstance(x, Float8Tensor):  # gathered in float8 (distributed/sequence_parallel.py)
        return _float8_input(x, config, layouts)
    key = (config, layouts)
    cached = shared_input.get(x, key) or shared_input.get(x, (config, ("row", "col")))
    if cached is not None:
        return cached if layouts == ("row", "col") else (cached[0], None, *cached[2:])
    value = _quantize(x.reshape(-1, x.shape[-1]), config.forward_dtype, config, layouts,
                      amax=produced_amax.get(x))
    shared_input.put(x, value, key)
    return value


def _float8_input(x: Float8Tensor, config, layouts):
    """An input already in float8 (row-major, tensorwise): its data as the row-major operand, and
    for backward a column-major float8 copy (a transpose, no cast), made once for the layers that
    read the same input."""
    if x._scale.dim():
        raise TypeError(f"Float8Linear: a float8 input must be scaled tensorwise (as float8_all_gather makes "
                        f"it); this one has {x.granularity} scales")
    if x.float8_dtype != config.forward_dtype:
        raise TypeError(
            f"Float8Linear: the input is a Float8Tensor in {x.float8_dtype}, the layer's config casts inputs to "
            f"{config.forward_dtype}; give the float8 gather (Float8PrepareModuleInput) the layers' config")
    data = x._data.reshape(-1, x.shape[-1])
    if not data.is_contiguous():
        raise ValueError("Float8Linear: a float8 input must be row-major (as float8_all_gather makes it); got "
                         f"strides {tuple(x._data.stride())}")
    if "col" not in layouts:
        return data, None, x._scale, None
    key = (config, "float8 input col")
    col = shared_input.get(x, key)
    if col is None:
        col = data.t().contiguous().t()
        shared_input.put(x, col, key)
    return data, col, x._scale, None


_LAYOUT = {("row", "col"): "both", ("row",): "row", ("col",): "col"}


def _quantize(t, dtype, config, layouts, amax=None):
    """Only the layouts some GEMM will read: (row | None, col | None, scale | None, amax record |
    None). amax: the record of an earlier quantization of t's very values (skips the amax pass)."""
    if not layouts:
        return None, None, None, None
    return quantize_with_amax(t, dtype, _LAYOUT[layouts], config.power_of_2_scale, amax=amax)


class _Float8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, config: Float8Config, grad_enabled: bool, deferred: list | None):
        # Quantize into the backward layouts only if a backward can come.
        need_w_grad = grad_enabled and weight.requires_grad
        need_x_grad = grad_enabled and x.requires_grad
        # Save float8 for backward unless configured otherwise, or unless x's storage is kept for
        # backward anyway (attention output feeding wo): there the float8 copy would add memory.
        # An input gathered in float8 has no high-precision values to save: its float8 copy is saved.
        save_fp8 = isinstance(x, Float8Tensor) or config.save_fp8_for_backward and not (
            need_w_grad and not torch.compiler.is_compiling() and saved_by_producer(x))
        # In a checkpoint's first forward what is saved is dropped (backward recomputes it): cast
        # only what the forward GEMM reads, save stand-ins of the recomputation's shapes and dtypes.
        # A recomputation (a reentrant checkpoint's runs inside backward without hooks) casts the
        # weight with the amax of its latest forward cast: the forward it recomputes. None of this
        # under torch.compile (its partitioner decides), nor under selective checkpointing: it
        # replays cached op outputs by call order, so both its passes run the same ops.
        compiling = torch.compiler.is_compiling()
        phase = None if compiling else checkpoint_phase()
        recomputing = not compiling and (phase == "recompute" or inside_backward())
        if (phase is not None or recomputing) and selective_checkpointing_active():
            phase, recomputing = None, False
        dropped = phase == "forward"
        x_row, x_col, x_scale, x_amax = _quantize_input(
            x, config, ("row", "col") if need_w_grad and save_fp8 and not dropped else ("row",))
        if need_w_grad and save_fp8 and dropped:
            x_col = stand_in(x_row.shape, x_row.dtype, x_row.device)
        # By default the weight is quantized row-major here and column-major again in backward
        # from the parameter itself: saving the fp8 copy would add a byte per parameter to peak
        # memory, re-casting costs one read of the weight. With keep_fp8_weight both layouts are
        # cast once and kept while the weight is unchanged (weight_cache.py); backward reads the
        # kept column-major copy. Under torch.compile nothing is kept across calls (the cast is
        # part of the graph), but keep_fp8_weight still casts both layouts here in one pass and
        # saves the column-major copy: one read of the weight per step instead of two, for one
        # byte per parameter held from forward to backward. An fp32 weight (autocast) is cast
        # from fp32.
        gathered = isinstance(weight, Float8Tensor)  # FSDP2's float8 all-gather (distributed/fsdp_float8.py)
        if isinstance(weight, Float8AllGatherWeight):  # the same, outside FSDP2: its high-precision values
            weight = weight._tensor
        if gathered:  # row-major float8 [out, in] and its scale: backward reads it transposed
            w_row, w_col, w_scale, w_amax = weight._data, None, weight._scale, None
        elif config.keep_fp8_weight and not torch.compiler.is_compiling():
            w_row, w_col, w_scale = fp8_weight(weight, config)
        elif config.keep_fp8_weight and need_x_grad:
            w_row, w_col, w_scale, _ = quantize_with_amax(
                weight, config.forward_dtype, "both", config.power_of_2_scale)
        elif phase == "recompute" and need_x_grad:
            # A checkpoint's recomputation: the first forward's amax (weight_amax.py), both layouts
            # in one pass, the column-major copy saved for the backward that follows at once.
            w_row, w_col, w_scale, _ = quantize_with_amax(
                weight, config.forward_dtype, "both", config.power_of_2_scale, amax=weight_amax.latest(weight))
        else:  # w_col is None
            w_row, w_col, w_scale, w_amax = quantize_with_amax(
                weight, config.forward_dtype, "row", config.power_of_2_scale,
                amax=weight_amax.latest(weight) if recomputing else None)
            weight_amax.remember(weight, w_amax)
            if dropped and need_x_grad:  # the recomputation saves the column-major copy and its scale
                w_col = stand_in(weight.shape, w_row.dtype, w_row.device)
        if not need_x_grad:
            w_saved, w_info = None, None
        elif gathered:
            w_saved, w_info = w_row, w_scale
        else:
            w_saved, w_info = (w_col, w_scale) if w_col is not None else (weight, w_amax)
        out = forward_output(x, bias, config, x_row, x_scale, w_row.t(), w_scale, deferred)
        # x_info: the scale of the saved float8 x, or the amax record of the saved high-precision
        # x (backward casts it again with the same scale; autograd checks it was not modified).
        if save_fp8:
            saved_x, x_info = (x_col, x_scale) if need_w_grad else (None, None)
        else:
            saved_x, x_info = (x.reshape(-1, x.shape[-1]), x_amax) if need_w_grad else (None, None)
        # w_info: the scale of the saved float8 weight, or the amax record of the weight itself.
        ctx.save_for_backward(saved_x, x_info, w_saved, w_info)
        ctx.stand_ins = dropped
        ctx.kept_weight = w_col is not None
        ctx.gathered_weight = gathered
        ctx.saved_fp8 = save_fp8
        remember_shapes(ctx, config, x, weight, bias)
        return out

    @staticmethod
    @once_differentiable  # its GEMMs have no derivative: a double backward raises, not a wrong one
    def backward(ctx, grad_out):
        config = ctx.config
        x_col, x_scale, weight, w_info = ctx.saved_tensors
        if ctx.stand_ins and any(t is not None and is_stand_in(t) for t in (x_col, weight)):
            raise RuntimeError(
                "Float8Linear: backward got the stand-in its checkpointed first forward saved, not the tensor "
                "the recomputation makes: this torch.utils.checkpoint kept the first forward's saved tensors "
                "(f8tensor recognizes checkpointing's hooks by name, torch_internals.checkpoint_phase). "
                "Report it with your torch version")
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if need_w and not ctx.saved_fp8:  # x_col is x itself, x_scale its amax record
            _, x_col, x_scale, _ = _quantize(x_col, config.forward_dtype, config, ("col",), amax=x_scale)
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        g_row, g_col, g_scale, _ = _quantize(
            g2d, config.backward_dtype, config,
            (("row",) if need_x else ()) + (("col",) if need_w else ()),
            amax=produced_amax.get(grad_out),
        )
        grad_x = grad_w = grad_b = None
        # grad_w first, so g_col is freed before the weight's cast and grad_x are allocated:
        # the float8 transients of backward never all coexist.
        if need_w:
            grad_w = scaled_mm_data(g_col.t(), g_scale, x_col, x_scale, grad_out.dtype,
                                    config.fast_accum_grad_weight, config).to(ctx.weight_dtype)
            del g_col
        if need_x:
            if ctx.kept_weight:  # the kept (or, compiled, saved) column-major copy and its scale
                w_col, w_scale = weight, w_info
            elif ctx.gathered_weight:  # the gathered float8 weight, copied column-major: no cast
                w_col, w_scale = weight.t().contiguous().t(), w_info
            else:  # same values as in forward (autograd checked the version): forward's amax, one pass
                _, w_col, w_scale, _ = quantize_with_amax(
                    weight, config.forward_dtype, "col", config.power_of_2_scale, amax=w_info)
            grad_x = scaled_mm_data(g_row, g_scale, w_col, w_scale, grad_out.dtype,
                                    config.fast_accum_grad_input, config).view(ctx.x_shape)
        if need_b:
            grad_b = g2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None


def _float8_linear(x, weight, bias, config: Float8Config, grad_enabled: bool):
    """The autograd function on plain tensors (a layer's, or tensor parallelism's local shards)."""
    if torch.compiler.is_compiling() and (x.numel() == 0 or weight.numel() == 0):
        # Nothing to multiply (an empty batch, e.g. an expert or a rank's shard without tokens):
        # the plain layer gives the same empty output and zero gradients. The autograd function's
        # traced amax does not test for emptiness (kernels/op.py).
        return nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    granularity = config.scaling_granularity
    if granularity != "tensorwise":
        if isinstance(x, Float8Tensor) or isinstance(weight, (Float8Tensor, Float8AllGatherWeight)):
            raise TypeError(
                f"Float8Linear with {granularity} scaling takes high-precision inputs and weights; a float8 "
                "all-gather (Float8PrepareModuleInput, fsdp_float8_all_gather) hands it tensorwise float8 "
                "data: use those with tensorwise recipes only")
        fn = _RowwiseLinearFn if granularity == "rowwise" else _BlockwiseLinearFn
        return apply_saving_first(fn, x, weight, bias, config, grad_enabled)
    return apply_saving_first(_Float8LinearFn, x, weight, bias, config, grad_enabled)


def is_dtensor(t: torch.Tensor) -> bool:
    """Without importing DTensor (an import of its own): a DTensor exists only once its module was imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


# nn.Module's hook registries (dicts of hooks by handle id, and their flags).
_HOOK_ATTRIBUTES = module_hook_attributes()


def share_hooks(new: nn.Module, mod: nn.Module) -> None:
    """Give `new` the hook dictionaries of `mod` (the same dicts, so RemovableHandle.remove() still
    works): hooks registered on mod run on new."""
    for name in _HOOK_ATTRIBUTES:
        setattr(new, name, getattr(mod, name))


def features_reason(in_features: int, out_features: int, config: Float8Config) -> str | None:
    """Why a layer of these features cannot run config's float8 GEMMs, or None: tensorwise and rowwise
    need both divisible by 16; the blockwise GEMMs are padded (any features but zero)."""
    if not (in_features and out_features):
        return f"in_features={in_features}, out_features={out_features}: a layer without features has no GEMM to run"
    if config.scaling_granularity == "blockwise":
        return None
    if in_features % 16 or out_features % 16:
        return f"in_features={in_features}, out_features={out_features}: _scaled_mm needs both divisible by 16"
    return None


class Float8Linear(QuietSubclasses, nn.Linear):
    """Drop-in nn.Linear: same parameters and state_dict, float8 GEMMs in forward and backward.

    Inputs may be N-D ([..., in_features]); under autocast the input is cast to the autocast dtype
    first and the output has that dtype, as with nn.Linear.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 config: Float8Config | None = None):
        config = config or Float8Config()
        reason = features_reason(in_features, out_features, config)
        if reason is not None and not (in_features and out_features):
            raise ValueError(f"Float8Linear: {reason}; keep such a layer as nn.Linear")
        if reason is not None:
            # Forward may run (K is zero-padded), backward would not: refused up front.
            raise ValueError(
                f"Float8Linear with {config.scaling_granularity} scaling: {reason} (each is the output width "
                "of one of the three GEMMs); pad the features, keep this layer in high precision, or use the "
                "blockwise recipe, whose GEMMs are padded")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.config = config
        if config.fsdp_float8_all_gather:
            wrap_weight(self, config)

    @classmethod
    def from_float(cls, mod: nn.Linear, config: Float8Config | None = None) -> "Float8Linear":
        """A Float8Linear holding mod's own Parameter objects (optimizers keep working) and its
        hooks: forward, backward and state-dict hooks registered on mod (a user's, or those that
        parallelize_module adds) run on the new layer, and their handles still remove them. With
        Float8Config(fsdp_float8_all_gather=True) the weight becomes a new Float8AllGatherWeight
        Parameter holding mod's values, as conversion makes it: build optimizers after this call."""
        config = config or Float8Config()
        with torch.device("meta"):  # built without the switch: its state-dict hooks go on mod's dicts, below
            new = cls(mod.in_features, mod.out_features, bias=False,
                      config=dataclasses.replace(config, fsdp_float8_all_gather=False))
        new.config = config
        new.weight = mod.weight
        new.bias = mod.bias
        share_hooks(new, mod)
        if config.fsdp_float8_all_gather:
            wrap_weight(new, config)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if autocast:
            x = x.to(torch.get_autocast_dtype(device_type))
        elif x.dtype != self.weight.dtype:
            raise RuntimeError(
                f"Float8Linear: input dtype {x.dtype} differs from weight dtype {self.weight.dtype} "
                "(as in nn.Linear); cast one of them, or run under torch.autocast"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Float8Linear expects input [..., {self.in_features}], got {tuple(x.shape)}")
        if not torch.compiler.is_compiling() and transformed(x, self.weight):
            raise NotImplementedError(
                "Float8Linear does not run under torch.func transforms (grad, vmap, jacrev, "
                "functional_call under grad, ...) or forward-mode AD: its GEMMs run in an "
                "autograd.Function with a backward only. Differentiate with loss.backward() or "
                "torch.autograd.grad, or keep this layer in high precision (convert_to_float8_training's "
                "module_filter_fn)")
        if self.config.keep_fp8_weight and type(self.weight) not in (nn.Parameter, torch.Tensor):
            raise TypeError(
                f"Float8Config(keep_fp8_weight=True) keeps float8 copies of plain-tensor weights; this "
                f"weight is a {type(self.weight).__name__} (e.g. a DTensor under tensor parallelism): "
                "use keep_fp8_weight=False for this model")
        if not autocast:  # nothing to turn off (entering torch.autocast costs host time on every call)
            return self._float8_forward(x)
        with torch.autocast(device_type, enabled=False):
            return self._float8_forward(x)

    def _float8_forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_dtensor(self.weight):
            from ..distributed.tensor_parallel import dtensor_linear

            return dtensor_linear(_float8_linear, x, self.weight, self.bias, self.config, torch.is_grad_enabled())
        return _float8_linear(x, self.weight, self.bias, self.config, torch.is_grad_enabled())

    def extra_repr(self):
        c = self.config
        fwd = str(c.forward_dtype).removeprefix("torch.")
        bwd = str(c.backward_dtype).removeprefix("torch.")
        return (f"{super().extra_repr()}, float8: fwd={fwd}, bwd={bwd}"
                + (f", {c.scaling_granularity}" if c.scaling_granularity != "tensorwise" else "")
                + (", grad_weight high precision" if c.grad_weight_high_precision else "")
                + (", emulate" if c.emulate else "")
                + (", keep_fp8_weight" if c.keep_fp8_weight else ""))
