"""`torch.ops.f8tensor.quantize`: the quantization entry point as an opaque custom op.

torch.compile cannot trace a Triton launch that goes through our own launcher, and needs the
outputs' shapes and strides without running anything; this op gives it both. Eager code calls
the implementation directly (a custom op's dispatch costs host time that eager cannot hide).
"""

import torch


@torch.library.custom_op("f8tensor::quantize", mutates_args=())
def quantize_op(
    x: torch.Tensor, float8_dtype: torch.dtype, layout: str, power_of_2: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, col, scale); a layout that was not asked for comes back as an empty tensor."""
    from . import quantize_eager

    row, col, scale = quantize_eager(x, float8_dtype, layout, power_of_2)
    row = row if row is not None else x.new_empty(0, dtype=float8_dtype)
    col = col if col is not None else x.new_empty(0, dtype=float8_dtype)
    return row, col, scale


@quantize_op.register_fake
def _(x, float8_dtype, layout, power_of_2):
    M, N = x.shape
    row = x.new_empty((M, N) if layout in ("row", "both") else (0,), dtype=float8_dtype)
    if layout in ("col", "both"):
        col = x.new_empty_strided((M, N), (1, M), dtype=float8_dtype)
    else:
        col = x.new_empty(0, dtype=float8_dtype)
    return row, col, x.new_empty((), dtype=torch.float32)

