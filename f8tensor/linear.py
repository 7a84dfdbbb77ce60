"""Float8Linear: nn.Linear whose three GEMMs run in float8 through torch._scaled_mm.

    forward      out        = x_row      @ w_row.t()     [M, K] @ [K, N]   x e4m3 row-major, w.t() column-major (w as stored)
    backward     grad_x     = g_row      @ w_col         [M, N] @ [N, K]   g e5m2 row-major, w column-major
                 grad_w     = g_col.t()  @ x_col         [N, M] @ [M, K]   g.t() row-major, x column-major

The input and grad_output are quantized once, in both layouts from one read ("both"); forward saves
x_col (float8, half the bytes of bf16) for backward unless config.save_fp8_for_backward is False.
The weight is cast row-major in forward and column-major in backward, from the parameter itself,
so no float8 copy of it is held between forward and backward.
"""

import threading
import weakref

import torch
from torch import nn

from .config import Float8Config
from .tensor import GemmRole, to_float8


class _SharedInput(threading.local):
    """The last quantized layer input: q/k/v (and w1/w3) read the same tensor, quantize it once.

    Keyed on the tensor object itself (a weak reference), its version counter (an in-place write
    invalidates it) and the quantization settings; holds one entry, replaced by the next input.
    """

    def __init__(self):
        self.key = None
        self.ref = None
        self.value = None

    def get(self, x, key):
        if self.ref is not None and self.ref() is x and self.key == (x._version, *key):
            return self.value
        return None

    def put(self, x, key, value):
        self.ref, self.key, self.value = weakref.ref(x), (x._version, *key), value


_shared_input = _SharedInput()


def _quantize_input(x, config, layouts):
    """x as (row | None, col | None), reusing the previous layer's quantization of the same x."""
    # Inference tensors have no version counter, so an in-place write could not be detected.
    if torch.compiler.is_compiling() or x.is_inference():
        return _quantize(x.reshape(-1, x.shape[-1]), config.forward_dtype, GemmRole.INPUT, config, layouts)
    key = (config, layouts)
    cached = _shared_input.get(x, key) or _shared_input.get(x, (config, ("row", "col")))
    if cached is not None:
        return cached if layouts == ("row", "col") else (cached[0], None)
    value = _quantize(x.reshape(-1, x.shape[-1]), config.forward_dtype, GemmRole.INPUT, config, layouts)
    _shared_input.put(x, key, value)
    return value


def _quantize(t, dtype, role, config, layouts):
    """Only the layouts some GEMM will read: (row | None, col | None)."""
    if layouts == ("row", "col"):
        return to_float8(t, dtype, layout="both", role=role, config=config)
    if layouts == ("row",):
        return to_float8(t, dtype, layout="row", role=role, config=config), None
    if layouts == ("col",):
        return None, to_float8(t, dtype, layout="col", role=role, config=config)
    return None, None


class _Float8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, config: Float8Config, grad_enabled: bool):
        # Quantize into the backward layouts only if a backward can come.
        need_w_grad = grad_enabled and weight.requires_grad
        need_x_grad = grad_enabled and x.requires_grad
        x_row, x_col = _quantize_input(
            x, config, ("row", "col") if need_w_grad and config.save_fp8_for_backward else ("row",))
        # The weight is quantized row-major here and column-major again in backward from the
        # parameter itself: saving the fp8 copy would add a byte per parameter to peak memory,
        # re-casting costs one read of the weight. An fp32 weight (autocast) is cast from fp32.
        w_row, _ = _quantize(weight, config.forward_dtype, GemmRole.WEIGHT, config, ("row",))
        if bias is None:
            out = torch.mm(x_row, w_row.t())
        else:
            out = torch.addmm(bias.to(x.dtype), x_row, w_row.t())
        if config.save_fp8_for_backward:
            ctx.save_for_backward(x_col, weight if need_x_grad else None)
        else:
            ctx.save_for_backward(x.reshape(-1, x.shape[-1]) if need_w_grad else None,
                                  weight if need_x_grad else None)
        ctx.config = config
        ctx.x_shape = x.shape
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # _unsafe_view, as matmul does: a view output would trip FSDP2's in-place safety warning.
        return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], out.shape[-1]))

    @staticmethod
    def backward(ctx, grad_out):
        config = ctx.config
        saved_x, saved_w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not config.save_fp8_for_backward:
            _, saved_x = _quantize(saved_x, config.forward_dtype, GemmRole.INPUT, config,
                                   ("col",) if need_w else ())
        _, w_col = _quantize(saved_w, config.forward_dtype, GemmRole.WEIGHT, config,
                             ("col",) if need_x else ())
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        g_row, g_col = _quantize(
            g2d, config.backward_dtype, GemmRole.GRAD_OUTPUT, config,
            (("row",) if need_x else ()) + (("col",) if need_w else ()),
        )
        grad_x = torch.mm(g_row, w_col).view(ctx.x_shape) if need_x else None
        grad_w = torch.mm(g_col.t(), saved_x).to(ctx.weight_dtype) if need_w else None
        grad_b = g2d.sum(0).to(ctx.bias_dtype) if need_b else None
        return grad_x, grad_w, grad_b, None, None


class Float8Linear(nn.Linear):
    """Drop-in nn.Linear: same parameters and state_dict, float8 GEMMs in forward and backward.

    Inputs may be N-D ([..., in_features]); under autocast the input is cast to the autocast dtype
    first and the output has that dtype, as with nn.Linear.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 config: Float8Config | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.config = config or Float8Config()

    @classmethod
    def from_float(cls, mod: nn.Linear, config: Float8Config | None = None) -> "Float8Linear":
        """A Float8Linear holding mod's own Parameter objects (optimizers keep working)."""
        with torch.device("meta"):
            new = cls(mod.in_features, mod.out_features, bias=False, config=config)
        new.weight = mod.weight
        new.bias = mod.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        elif x.dtype != self.weight.dtype:
            raise RuntimeError(
                f"Float8Linear: input dtype {x.dtype} differs from weight dtype {self.weight.dtype} "
                "(as in nn.Linear); cast one of them, or run under torch.autocast"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Float8Linear expects input [..., {self.in_features}], got {tuple(x.shape)}")
        with torch.autocast(device_type, enabled=False):
            return _Float8LinearFn.apply(x, self.weight, self.bias, self.config, torch.is_grad_enabled())

    def extra_repr(self):
        c = self.config
        fwd = str(c.forward_dtype).removeprefix("torch.")
        bwd = str(c.backward_dtype).removeprefix("torch.")
        return f"{super().extra_repr()}, float8: fwd={fwd}, bwd={bwd}" + (", emulate" if c.emulate else "")
