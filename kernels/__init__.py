"""Triton kernels and their plain-PyTorch references (`naive`), behind one entry point per function.

Installed as `f8tensor.kernels`. `quantize_with_amax` quantizes a 2-D tensor: Triton on a CUDA
device with float8 hardware, the reference elsewhere (and for fake tensors outside torch.compile,
which have no memory to launch on); both return (row_major | None, col_major |
None, scale, amax record) with the same bits. The fused ops' entry points (`rms_norm_with_amax`,
`swiglu_with_amax`, `rope_forward` and their backwards) choose the same way, as do `quantize_rows` / `quantize_cols`
(one scale per row / per column: the rowwise recipes) and `quantize_blocks` (one scale per 1 x 128
strip or 128 x 128 tile: the blockwise recipe).
"""

import functools

import torch

if __name__ != "f8tensor.kernels":
    # Imported as the top-level `kernels` (the repository root on sys.path): op.py would register the
    # f8tensor:: custom ops a second time, which destroys the first registration that f8tensor.kernels
    # holds (torch.library allows the overwrite): later calls crash. Refused before anything runs.
    raise ImportError(f"this package is f8tensor.kernels; it was imported as {__name__!r}, the repository root "
                      "being on sys.path (`python -m pytest` or `python -c` run there put it first; Hugging Face "
                      "transformers then imports it, taking it for the `kernels` hub package): run `pytest` or "
                      "from another directory")

from .naive import (BLOCK, EPS, FLOAT8_DTYPES, INPUT_DTYPES, LAYOUTS, amax_ref, axis_amax_ref,
                    cross_entropy_backward_ref, cross_entropy_ref, fp8_max, geglu_backward_ref, geglu_ref,
                    quantize_blockwise_ref, quantize_ref, quantize_rowwise_ref,
                    rms_norm_backward_ref, rms_norm_ref, rope_backward_ref, rope_ref, scale_from_amax_ref,
                    swiglu_backward_ref, swiglu_halves_backward_ref, swiglu_halves_ref, swiglu_ref, to_col_major)

try:
    from .blockwise import block_cast_triton
    from .cross_entropy import cross_entropy_backward_triton, cross_entropy_forward_triton
    from .quantize import quantize_triton, quantize_triton_with_amax
    from .rms_norm import rms_norm_backward_triton, rms_norm_triton
    from .rope import rope_triton
    from .rowwise import col_cast_triton, row_cast_triton
    from .swiglu import swiglu_backward_triton, swiglu_halves_backward_triton, swiglu_halves_triton, swiglu_triton
except ImportError:  # triton is not installed (e.g. macOS): the reference path still works
    quantize_triton = quantize_triton_with_amax = swiglu_triton = swiglu_backward_triton = None
    swiglu_halves_triton = swiglu_halves_backward_triton = None
    rope_triton = rms_norm_triton = rms_norm_backward_triton = None
    row_cast_triton = col_cast_triton = block_cast_triton = None
    cross_entropy_forward_triton = cross_entropy_backward_triton = None

from .op import amax_of_bits, blockwise_op, cast_op, rowwise_cols_op, rowwise_rows_op  # noqa: E402  (op.py uses quantize_with_amax at call time)
from ..torch_internals import is_fake_tensor  # noqa: E402


def _runs_triton(t: torch.Tensor) -> bool:
    """Whether t's kernels run as Triton: a CUDA tensor with values. A fake tensor outside
    torch.compile (FakeTensorMode's shape propagation, memory estimation: torchtitan's, torch's
    FSDP memory tracker) takes the reference, whose ops fake tensors carry; a Triton launch would
    read its data pointer, which it does not have."""
    return t.is_cuda and not is_fake_tensor(t)


def _casts_in_triton(x: torch.Tensor) -> bool:
    """Whether x's float8 casts run as Triton: `_runs_triton` on a device that converts to float8 in
    hardware (sm_89 on; older GPUs, emulate mode, take the reference, which gives the same bits)."""
    return _runs_triton(x) and has_float8_hardware(x.device)

__all__ = [
    "BLOCK", "EPS", "FLOAT8_DTYPES", "INPUT_DTYPES", "LAYOUTS", "amax_ref", "cross_entropy_backward",
    "cross_entropy_backward_ref", "cross_entropy_forward", "cross_entropy_ref", "fp8_max", "geglu_backward_ref", "geglu_ref",
    "has_float8_hardware",
    "quantize_blocks", "quantize_blockwise_ref", "quantize_cols", "quantize_ref", "quantize_rows", "quantize_rowwise_ref", "quantize_triton", "quantize_triton_with_amax", "quantize_with_amax", "rms_norm_backward",
    "rms_norm_backward_ref", "rms_norm_ref", "rms_norm_triton", "rms_norm_with_amax", "rope_backward",
    "rope_backward_ref", "rope_forward", "rope_ref", "rope_triton", "scale_from_amax_ref", "swiglu_backward_ref",
    "swiglu_backward_with_amax", "swiglu_halves_backward_ref", "swiglu_halves_backward_with_amax", "swiglu_halves_ref",
    "swiglu_halves_with_amax", "swiglu_ref", "swiglu_with_amax",
]


def quantize_with_amax(
    x: torch.Tensor, float8_dtype: torch.dtype, layout: str = "row", power_of_2: bool = False,
    amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(row-major | None, column-major | None, scale, amax record) of a 2-D x in layout "row", "col"
    or "both". The amax record, passed back with the same tensor (same values), skips
    the amax pass and gives the same bits. Float8Linear quantizes its weight again in backward
    this way. The record is the Triton path's int32 partials, or max(|x|) as a 0-d fp32 tensor
    (reference path, torch.compile); either kind is accepted on every path. While torch.compile
    traces, x must not be empty unless its amax is given (the traced amax has no emptiness test;
    `to_float8` and Float8Linear handle empty tensors themselves)."""
    if torch.compiler.is_compiling():
        # amax in plain ops, for inductor to fuse into x's producer; the cast is our kernel (op.py).
        if amax is None:
            amax = amax_of_bits(x)
        # The record conversion is in the graph too (fused with the reduction, no launch of its own).
        row, col, scale = cast_op(x, _as_record(amax), float8_dtype, layout, power_of_2)
        return (row if layout in ("row", "both") else None,
                col if layout in ("col", "both") else None, scale, amax)
    if _casts_in_triton(x):
        if quantize_triton is None:
            raise RuntimeError("f8tensor needs triton to quantize CUDA tensors: pip install triton")
        amax = None if amax is None else _as_record(amax)
        return quantize_triton_with_amax(x, float8_dtype, layout, power_of_2, amax=amax)
    amax = amax_ref(x) if amax is None else _as_amax_value(amax)
    return (*quantize_ref(x, float8_dtype, layout, power_of_2, amax=amax), amax)


def quantize_rows(
    x: torch.Tensor, float8_dtype: torch.dtype, power_of_2: bool = False, *, write_row: bool = True,
    col_amax: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(row-major data | None, row scales [M, 1] | None, column amaxes [N] fp32 | None) of a 2-D x:
    each row cast with its own scale; with col_amax, also the record `quantize_cols` takes, from
    the same read of x. Triton on a CUDA device with float8 hardware, plain PyTorch elsewhere; the
    same bits either way. While torch.compile traces, the op `f8tensor::rowwise_rows` (op.py), which
    runs this function."""
    if torch.compiler.is_compiling():
        row, row_scale, amax = rowwise_rows_op(x, float8_dtype, power_of_2, write_row, col_amax)
        return (row if write_row else None, row_scale if write_row else None, amax if col_amax else None)
    if not _casts_in_triton(x):
        row, row_scale, _, _ = quantize_rowwise_ref(x, float8_dtype, "row", power_of_2) if write_row else (None,) * 4
        return row, row_scale, axis_amax_ref(x, 0).reshape(-1) if col_amax else None
    if row_cast_triton is None:
        raise RuntimeError("f8tensor needs triton to quantize CUDA tensors: pip install triton")
    return row_cast_triton(x, float8_dtype, power_of_2, write_row=write_row, col_amax=col_amax)


def quantize_cols(
    x: torch.Tensor, float8_dtype: torch.dtype, col_amax: torch.Tensor, power_of_2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(column-major data [M, N] with strides (1, M), column scales [1, N]) of a 2-D x given its
    column amaxes (the record `quantize_rows(..., col_amax=True)` returned for x's very values).
    While torch.compile traces, the op `f8tensor::rowwise_cols` (op.py)."""
    if torch.compiler.is_compiling():
        return rowwise_cols_op(x, col_amax, float8_dtype, power_of_2)
    if not _casts_in_triton(x):
        return quantize_rowwise_ref(x, float8_dtype, "col", power_of_2, col_amax=col_amax)[2:]
    if col_cast_triton is None:
        raise RuntimeError("f8tensor needs triton to quantize CUDA tensors: pip install triton")
    return col_cast_triton(x, float8_dtype, col_amax, power_of_2)


def quantize_blocks(
    x: torch.Tensor, float8_dtype: torch.dtype, power_of_2: bool = False, *, square: bool = False,
    write_row: bool = True, write_col: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(row | None, row_scale | None, col | None, col_scale | None) of a 2-D x [M, N] with one
    scale per tile, from one read of x; Mb = ceil(M / 128), Nb = ceil(N / 128).

    row: [M, N] row-major; col: [M, N] column-major (strides (1, M)). Scales, fp32, in the layouts
    torch._scaled_mm takes:
    - square off (activations, gradients): row_scale [M, Nb] with strides (1, M), one per 1 x 128
      strip of a row; col_scale [Mb, N] row-major, one per 128 x 1 strip of a column;
    - square on (weights): one per 128 x 128 tile; row_scale [Mb, Nb] row-major, col_scale the
      same values with strides (1, Mb).
    Triton on a CUDA device with float8 hardware, `naive.quantize_blockwise_ref` elsewhere; the same
    bits either way. While torch.compile traces, the op `f8tensor::blockwise` (op.py)."""
    if torch.compiler.is_compiling():
        row, row_scale, col, col_scale = blockwise_op(x, float8_dtype, power_of_2, square, write_row, write_col)
        return (row if write_row else None, row_scale if write_row else None,
                col if write_col else None, col_scale if write_col else None)
    if not _casts_in_triton(x):
        return _quantize_blocks_ref(x, float8_dtype, power_of_2, square, write_row, write_col)
    if block_cast_triton is None:
        raise RuntimeError("f8tensor needs triton to quantize CUDA tensors: pip install triton")
    return block_cast_triton(x, float8_dtype, power_of_2, square=square, write_row=write_row, write_col=write_col)


def _quantize_blocks_ref(x, float8_dtype, power_of_2, square, write_row, write_col):
    """`quantize_blocks` from the reference, in the same layouts."""
    row = row_scale = col = col_scale = None
    if write_row:
        row, row_scale = quantize_blockwise_ref(x, float8_dtype, (BLOCK, BLOCK) if square else (1, BLOCK), power_of_2)
        row_scale = row_scale if square else to_col_major(row_scale)
    if write_col:
        col, col_scale = quantize_blockwise_ref(x, float8_dtype, (BLOCK, BLOCK) if square else (BLOCK, 1), power_of_2)
        col, col_scale = to_col_major(col), to_col_major(col_scale) if square else col_scale
    return row, row_scale, col, col_scale


def swiglu_with_amax(a: torch.Tensor, b: torch.Tensor, gelu_tanh: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(a) * b, its amax record) for contiguous a, b of one shape and dtype (gelu_tanh:
    gelu(a, approximate="tanh") * b, GeGLU's gate): one pass on CUDA (Triton), the reference
    elsewhere or without triton. The record goes to `quantize_with_amax` with that tensor."""
    if _runs_triton(a) and swiglu_triton is not None:
        return swiglu_triton(a, b, gelu_tanh)
    h = geglu_ref(a, b) if gelu_tanh else swiglu_ref(a, b)
    return h, amax_ref(h)


def swiglu_backward_with_amax(
    g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gelu_tanh: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_a, grad_b, record of grad_a, record of grad_b) of h = silu(a) * b (gelu_tanh: of
    GeGLU's gate) given dh = g."""
    if _runs_triton(a) and swiglu_backward_triton is not None:
        return swiglu_backward_triton(g, a, b, gelu_tanh)
    grad_a, grad_b = (geglu_backward_ref if gelu_tanh else swiglu_backward_ref)(g, a, b)
    return grad_a, grad_b, amax_ref(grad_a), amax_ref(grad_b)


def swiglu_halves_with_amax(y: torch.Tensor, gate_half: int = 0, gelu_tanh: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, its amax record): `swiglu_with_amax` of the two halves of a contiguous y [..., 2 F]'s last
    dim (the gate the first half for gate_half 0, the second for 1), read in place on CUDA."""
    if _runs_triton(y) and swiglu_halves_triton is not None:
        return swiglu_halves_triton(y, gate_half, gelu_tanh)
    h = swiglu_halves_ref(y, gate_half, gelu_tanh)
    return h, amax_ref(h)


def swiglu_halves_backward_with_amax(g: torch.Tensor, y: torch.Tensor, gate_half: int = 0, gelu_tanh: bool = False
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, its amax record) of h = swiglu_halves_with_amax(y)'s h given dh = g (contiguous): both
    halves' gradients in one tensor of y's shape."""
    if _runs_triton(y) and swiglu_halves_backward_triton is not None:
        return swiglu_halves_backward_triton(g, y, gate_half, gelu_tanh)
    dy = swiglu_halves_backward_ref(g, y, gate_half, gelu_tanh)
    return dy, amax_ref(dy)


def rms_norm_with_amax(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cast_before_weight: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, rstd, amax record of y) for a contiguous x [..., D]: one pass on CUDA (Triton), the
    reference elsewhere or without triton."""
    if _runs_triton(x) and rms_norm_triton is not None:
        return rms_norm_triton(x, weight, eps, cast_before_weight)
    y, rstd = rms_norm_ref(x, weight, eps, cast_before_weight)
    return y, rstd, amax_ref(y)


def rms_norm_backward(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
    cast_before_weight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dweight | None) for contiguous g and x of one shape, given forward's rstd."""
    if _runs_triton(x) and rms_norm_backward_triton is not None:
        return rms_norm_backward_triton(g, x, weight, rstd, cast_before_weight)
    return rms_norm_backward_ref(g, x, weight, rstd, cast_before_weight)


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """rope_ref(x, cos, sin, interleaved): one pass on CUDA (Triton), the reference elsewhere or
    without triton. The output has x's layout where x is dense."""
    if _runs_triton(x) and rope_triton is not None:
        return rope_triton(x, cos, sin, interleaved=interleaved)
    return torch.empty_like(x).copy_(rope_ref(x, cos, sin, interleaved))


def rope_backward(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, strides: tuple,
                  interleaved: bool = False) -> torch.Tensor:
    """rope_backward_ref(g, cos, sin, interleaved) laid out with `strides` (forward's output
    layout, so the gradient reaches x's producer in x's layout: its view's backward needs no copy)."""
    if _runs_triton(g) and rope_triton is not None:
        return rope_triton(g, cos, sin, backward=True, out_strides=strides, interleaved=interleaved)
    out = torch.empty_strided(g.shape, strides, dtype=g.dtype, device=g.device)
    return out.copy_(rope_backward_ref(g, cos, sin, interleaved))


def cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss fp32 [N], lse fp32 [N]) of logits [N, V] (unit column stride) against int64 target [N]:
    Triton on a CUDA device, `cross_entropy_ref` elsewhere or without triton."""
    if _runs_triton(logits) and cross_entropy_forward_triton is not None:
        return cross_entropy_forward_triton(logits, target, ignore_index)
    return cross_entropy_ref(logits, target, ignore_index)


def cross_entropy_backward(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                           ignore_index: int) -> torch.Tensor:
    """The gradient of sum(loss * g) with respect to logits (g fp32 [N], or 0-d for every row), in
    the logits' dtype: Triton on a CUDA device (from forward's lse), `cross_entropy_backward_ref` elsewhere."""
    if _runs_triton(logits) and cross_entropy_backward_triton is not None:
        return cross_entropy_backward_triton(logits, target, lse, g, ignore_index)
    return cross_entropy_backward_ref(logits, target, g, ignore_index)


def _as_record(amax: torch.Tensor) -> torch.Tensor:
    """Either kind of record as int32 partials: a 0-d fp32 max(|x|) becomes one partial (the bits
    the amax kernel would write: the sign bit cleared, so a NaN's pattern sorts above every
    number); int32 partials pass through (quantize_triton checks their shape)."""
    if amax.dtype == torch.int32:
        return amax
    return _fp32_amax(amax).reshape(1).view(torch.int32) & 0x7FFFFFFF


def _as_amax_value(amax: torch.Tensor) -> torch.Tensor:
    """Either kind of record as a 0-d fp32 max(|x|)."""
    if amax.dtype == torch.int32:
        return amax.max().view(torch.float32)
    return _fp32_amax(amax)


def _fp32_amax(amax: torch.Tensor) -> torch.Tensor:
    """A record that is not int32 partials must be one fp32 max(|x|); as a 0-d tensor."""
    if amax.dtype != torch.float32 or amax.numel() != 1:
        raise ValueError("amax must be a record returned by quantize_with_amax for this tensor")
    return amax.reshape(())


# state.py lists this cache.
@functools.cache
def device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def has_float8_hardware(device: torch.device) -> bool:
    """Whether a CUDA device converts and multiplies float8 natively (compute capability >= 8.9)."""
    return device_capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)
