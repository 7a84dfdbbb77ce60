"""Float8Tensor: float8 data and a dequantization scale, presenting itself as a high-precision tensor.

    hp ≈ data.float() * scale          (scale is what torch._scaled_mm takes as scale_a / scale_b)

`scale` is fp32 on the data's device: 0-d (tensorwise), or one scale per row ([..., M, 1]) or per
column ([1, ..., K]) (rowwise scaling), so that the formula above broadcasts; or, for 2-D data
with a `block` (bm, bn) (blockwise scaling), one per tile: [ceil(M / bm), ceil(N / bn)], each
scale standing for its tile's elements. The wrapper's shape and strides are the data's, so layout
(row- or column-major) is read off the tensor itself. Operations go through the op table in ops.py; see
`__torch_dispatch__` for what happens to ops outside it.
"""

import enum
import warnings

import torch
from torch.utils._pytree import tree_map

from .config import Float8Config
from ..kernels import BLOCK, FLOAT8_DTYPES, LAYOUTS, quantize_blocks, quantize_cols, quantize_rows, quantize_with_amax
from ..torch_internals import is_fake, is_mutating, written_arguments

# Filled by ops.py: aten op -> handler(func, args, kwargs).
OPS: dict = {}
warned_fallback_ops: set = set()


class GemmRole(enum.Enum):
    """Which operand of a linear layer's GEMMs a tensor is; picks the GEMM's settings."""

    INPUT = "input"
    WEIGHT = "weight"
    GRAD_OUTPUT = "grad_output"


class Float8Tensor(torch.Tensor):
    _data: torch.Tensor
    _scale: torch.Tensor
    _orig_dtype: torch.dtype
    _role: GemmRole | None
    _config: Float8Config | None
    _block: tuple[int, int] | None

    @staticmethod
    def __new__(cls, data, scale, orig_dtype, role=None, config=None, block=None):
        if data.dtype not in FLOAT8_DTYPES:
            raise TypeError(f"Float8Tensor data must be float8_e4m3fn or float8_e5m2, got {data.dtype}")
        if block is not None:
            _check_block(data, scale, block)
        elif scale.dtype != torch.float32 or scale.device != data.device or not (
                scale.numel() == 1 or _axiswise(scale.shape, data.shape)):
            raise ValueError(
                "Float8Tensor scale must be float32 on the data's device, with one element (tensorwise), "
                "one per row ([..., M, 1]) or one per column ([1, ..., K]); got "
                f"{scale.dtype} of shape {tuple(scale.shape)} on {scale.device} for data of shape "
                f"{tuple(data.shape)} on {data.device}"
            )
        if not orig_dtype.is_floating_point or orig_dtype in FLOAT8_DTYPES:
            raise TypeError(f"orig_dtype must be a high-precision float dtype, got {orig_dtype}")
        self = torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(),
            dtype=orig_dtype, device=data.device, requires_grad=False,
        )
        self._data = data
        self._scale = scale if block is not None or scale.numel() != 1 or scale.dim() == 0 else scale.reshape(())
        self._orig_dtype = orig_dtype
        self._role = role
        self._config = config
        self._block = None if block is None else tuple(block)
        return self

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def from_hp(cls, x, float8_dtype=torch.float8_e4m3fn, *, layout="row", role=None, config=None):
        """Quantize x with a dynamic tensorwise scale; see `to_float8`."""
        return to_float8(x, float8_dtype, layout=layout, role=role, config=config)

    def dequantize(self) -> torch.Tensor:
        """The high-precision tensor this stands for, in its original dtype and layout."""
        return (self._data.float() * self.scale_per_element()).to(self._orig_dtype)

    def scale_per_element(self) -> torch.Tensor:
        """The scale broadcastable against the data: `_scale` itself, or a blockwise scale expanded
        to every element."""
        if self._block is None:
            return self._scale
        scale = self._scale
        for dim, (size, step) in enumerate(zip(self._data.shape, self._block)):
            scale = scale.repeat_interleave(step, dim).narrow(dim, 0, size)
        return scale

    to_original_precision = dequantize

    @property
    def float8_dtype(self) -> torch.dtype:
        return self._data.dtype

    @property
    def granularity(self) -> str:
        """"tensorwise", "per row" (a scale per index of every axis but the last: [..., 1]), "per
        column" (a scale per index of the last axis: [1, ..., K]) (those two are rowwise scaling), or
        "blockwise BMxBN" (one scale per tile)."""
        if self._block is not None:
            return f"blockwise {self._block[0]}x{self._block[1]}"
        if self._scale.dim() == 0:
            return "tensorwise"
        return "per row" if self._scale.shape[-1] == 1 else "per column"

    @property
    def layout_name(self) -> str:
        if self._data.dim() == 2 and self._data.t().is_contiguous() and not self._data.is_contiguous():
            return "col"
        return "row" if self._data.is_contiguous() else "strided"

    def __repr__(self):
        role = self._role.value if self._role else None
        # Reading the scale's value is impossible while torch.compile traces with fake tensors.
        if self._scale.dim():
            scale = f"{self.granularity} {list(self._scale.shape)}"
        else:
            scale = "<traced>" if is_fake(self._scale) else f"{self._scale.item():.6g}"
        return (
            f"Float8Tensor(shape={tuple(self.shape)}, {str(self.float8_dtype).removeprefix('torch.')}, "
            f"layout={self.layout_name}, scale={scale}, "
            f"orig_dtype={str(self._orig_dtype).removeprefix('torch.')}, role={role})"
        )

    def __matmul__(self, other):
        """`self @ other` is torch.matmul(self, other), its errors as raised: torch.Tensor's operator
        turns a TypeError (the GEMM rules' dtype errors, such as e5m2 x e5m2) into NotImplemented,
        which Python reports as "unsupported operand type(s) for @"."""
        return torch.matmul(self, other)

    def __rmatmul__(self, other):
        """`other @ self` is torch.matmul(other, self) (as `__matmul__`)."""
        return torch.matmul(other, self)

    def __tensor_flatten__(self):
        return ["_data", "_scale"], (self._orig_dtype, self._role, self._config, self._block)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        orig_dtype, role, config, block = meta
        return Float8Tensor(inner["_data"], inner["_scale"], orig_dtype, role, config, block)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = OPS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        return _fallback(func, args, kwargs)


def _axiswise(scale_shape, data_shape) -> bool:
    """One scale per row ([..., M, 1]: every index but the last) or per column ([1, ..., 1, K])."""
    scale_shape, data_shape = tuple(scale_shape), tuple(data_shape)
    return len(data_shape) > 0 and scale_shape in (
        (*data_shape[:-1], 1), (*[1] * (len(data_shape) - 1), data_shape[-1]))


def _check_block(data, scale, block) -> None:
    """A blockwise scale: fp32 on the data's device, one per (bm, bn) tile of 2-D data."""
    if data.dim() != 2 or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"Float8Tensor with blockwise scales takes 2-D data and a block (bm, bn) of positive ints; "
                         f"got data of shape {tuple(data.shape)} and block {block!r}")
    tiles = tuple(-(-size // b) for size, b in zip(data.shape, block))
    if scale.dtype != torch.float32 or scale.device != data.device or tuple(scale.shape) != tiles:
        raise ValueError(f"Float8Tensor blockwise {block[0]}x{block[1]} scale must be float32 on the data's device, "
                         f"one per tile: {list(tiles)} for data of shape {tuple(data.shape)}; got {scale.dtype} of "
                         f"shape {tuple(scale.shape)} on {scale.device}")


def _fallback(func, args, kwargs):
    """Ops outside the table: run on the dequantized values (correct, not fast); refuse to write
    into a Float8Tensor.

    An op writing into a Float8Tensor would have to store high-precision results back into float8,
    a requantization the caller did not ask for, so it raises instead. An op that writes a plain
    tensor and only reads a Float8Tensor (`plain.add_(f8)`, `out=plain`) runs on its dequantized values.
    """
    if is_mutating(func) and any(isinstance(t, Float8Tensor) for t in written_arguments(func, args, kwargs)):
        raise NotImplementedError(
            f"Float8Tensor does not support the mutating op {func}: it would have to requantize in "
            "place. Call .dequantize() and operate on the high-precision tensor instead."
        )
    if func not in warned_fallback_ops:
        warned_fallback_ops.add(func)
        warnings.warn(
            f"f8tensor: {func} is not in Float8Tensor's op table; it ran on the dequantized "
            "(high-precision) values and returns a plain tensor.",
            stacklevel=3,
        )

    def unwrap(t):
        return t.dequantize() if isinstance(t, Float8Tensor) else t

    return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def to_float8(
    x: torch.Tensor, float8_dtype: torch.dtype = torch.float8_e4m3fn, *, layout: str = "row",
    role: GemmRole | None = None, config: Float8Config | None = None, granularity: str | None = None,
):
    """Quantize x with a dynamic scale (amax -> scale -> saturating cast).

    granularity: "tensorwise" (one scale), or "rowwise": the row-major data gets one scale per
    row ([..., 1]), the column-major data one per column ([1, ..., K]), each along the axis a GEMM
    reduces when the tensor is its first (row-major) or second (column-major) operand; or
    "blockwise": for role WEIGHT one scale per 128 x 128 tile in either layout, otherwise the
    row-major data one per 1 x 128 strip of a row and the column-major data one per 128 x 1 strip
    of a column (again along the axis a GEMM reduces); N-D x is taken as [prod(leading), K] and
    the result is 2-D. Default: config's scaling_granularity, else tensorwise.

    layout: "row" (row-major data), "col" (column-major: the matrix [M, K] stored as its transpose,
    strides (1, M), what _scaled_mm wants for its second operand), or "both", which returns the
    pair (row, col) from one read of x. N-D inputs are treated as the matrix [prod(leading), K];
    a view when x's strides allow it, otherwise one copy. On CUDA this runs the Triton kernels,
    elsewhere the PyTorch reference; both give the same bits.

    The cast is not differentiable: an x that requires grad, with grad mode on, is a RuntimeError
    (the result would carry no gradient back to x).
    """
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "to_float8: x requires grad, and the Float8Tensor it returns carries no gradient back to x (the cast "
            "is not differentiable); call it under torch.no_grad() or on x.detach(), or train through Float8Linear "
            "(convert_to_float8_training), whose backward runs the float8 GEMMs of the gradients")
    return quantize_to_float8(x, float8_dtype, layout=layout, role=role, config=config, granularity=granularity)


def quantize_to_float8(
    x: torch.Tensor, float8_dtype: torch.dtype = torch.float8_e4m3fn, *, layout: str = "row",
    role: GemmRole | None = None, config: Float8Config | None = None, granularity: str | None = None,
):
    """`to_float8` without its autograd check, for the op table (inside __torch_dispatch__, below
    autograd, a plain operand quantized on the fly may still report requires_grad)."""
    if isinstance(x, Float8Tensor):
        raise TypeError("x is already a Float8Tensor; call .dequantize() first to requantize it")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if x.dim() == 0:
        raise ValueError("cannot quantize a 0-d tensor: float8 data needs at least one dimension")
    power_of_2 = config.power_of_2_scale if config is not None else False
    granularity = granularity or (config.scaling_granularity if config is not None else "tensorwise")
    shape = x.shape
    x2d = x.unsqueeze(0) if x.dim() == 1 else x.reshape(-1, shape[-1])
    if granularity == "rowwise":
        return _to_float8_rowwise(x, x2d, float8_dtype, layout, role, config, power_of_2)
    if granularity == "blockwise":
        return _to_float8_blockwise(x, x2d, float8_dtype, layout, role, config, power_of_2)
    if granularity != "tensorwise":
        raise ValueError(f"granularity must be 'tensorwise', 'rowwise' or 'blockwise', got {granularity!r}")
    # Under Dynamo an empty tensor's amax is given (the traced amax does not test for emptiness).
    empty = torch.compiler.is_dynamo_compiling() and x2d.numel() == 0
    amax = torch.zeros((), dtype=torch.float32, device=x.device) if empty else None
    row, col, scale, _ = quantize_with_amax(x2d, float8_dtype, layout, power_of_2, amax=amax)

    def wrap(data, scale):
        return Float8Tensor(data.view(shape), scale, x.dtype, role, config)

    if layout == "both":  # two tensors, two scales (a copy_ into one must leave the other as it is)
        return wrap(row, scale), wrap(col, scale.clone())
    return wrap(row if layout == "row" else col, scale)


def _to_float8_rowwise(x, x2d, float8_dtype, layout, role, config, power_of_2):
    shape = x.shape
    want_col = layout in ("col", "both")
    row, row_scale, col_amax = quantize_rows(x2d, float8_dtype, power_of_2, write_row=layout != "col",
                                             col_amax=want_col)
    out = []
    if row is not None:
        out.append(Float8Tensor(row.view(shape), row_scale.view(*shape[:-1], 1), x.dtype, role, config))
    if want_col:
        col, col_scale = quantize_cols(x2d, float8_dtype, col_amax, power_of_2)
        out.append(Float8Tensor(col.view(shape), col_scale.view(*[1] * (len(shape) - 1), shape[-1]), x.dtype,
                                role, config))
    return tuple(out) if layout == "both" else out[0]


def _to_float8_blockwise(x, x2d, float8_dtype, layout, role, config, power_of_2):
    square = role is GemmRole.WEIGHT
    row, row_scale, col, col_scale = quantize_blocks(
        x2d, float8_dtype, power_of_2, square=square, write_row=layout != "col", write_col=layout != "row")
    out = []
    if row is not None:
        out.append(Float8Tensor(row, row_scale, x.dtype, role, config, (BLOCK, BLOCK) if square else (1, BLOCK)))
    if col is not None:
        out.append(Float8Tensor(col, col_scale, x.dtype, role, config, (BLOCK, BLOCK) if square else (BLOCK, 1)))
    return tuple(out) if layout == "both" else out[0]
