"""Quantization under torch.compile: `amax_of_bits` in plain PyTorch, then `torch.ops.f8tensor.cast`.

Under torch.compile, quantization is split in two: the amax is plain PyTorch (`amax_of_bits`),
which inductor fuses into the kernel that produces x (an RMSNorm, a SwiGLU, a gradient's
elementwise backward), so it costs no pass of its own; the cast is this op, which runs our cast
kernel given that amax (one read of x, both layouts written at copy bandwidth: inductor's own
transposed stores are slower). torch.compile cannot trace a launch that goes through our own
launcher and needs the outputs' shapes and strides without running anything; this op gives it
both. Eager code calls the implementation directly (a custom op's dispatch costs host time that
eager cannot hide).
"""

import torch

_BITS = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF),
         torch.float32: (torch.int32, 0x7FFFFFFF)}


def amax_of_bits(x: torch.Tensor) -> torch.Tensor:
    """max(|x|) as a 0-d fp32 tensor, equal to `naive.amax_ref(x)`, computed on x's bit patterns.

    With the sign bit cleared, integer order is float order and NaN sorts above inf (as in the
    amax kernel). Reading the bits also pins the values: inductor, fusing this reduction into the
    kernel that produces a bf16 x, would otherwise take the max of the fp32 values before their
    rounding to bf16 (it drops such round trips), and the scale would differ from eager's.
    """
    if x.dtype not in _BITS:
        raise TypeError(f"can quantize bfloat16, float16 or float32 tensors, got {x.dtype}")
    # While Dynamo traces, callers pass non-empty tensors (Float8Linear routes empty inputs around
    # its autograd function, to_float8 passes an empty tensor's amax): reading numel() there would
    # put a symbolic value into the autograd function's graph, which Dynamo in torch 2.11 cannot
    # take under FSDP2 (tests/test_fsdp2.py, the compiled_dynamic case).
    if not torch.compiler.is_dynamo_compiling() and x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    int_dtype, magnitude = _BITS[x.dtype]
    return (x.view(int_dtype) & magnitude).amax().view(x.dtype).float()



@torch.library.custom_op("f8tensor::cast", mutates_args=())
def cast_op(
    x: torch.Tensor, amax: torch.Tensor, float8_dtype: torch.dtype, layout: str, power_of_2: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, col, scale) of x given an amax record of x (int32 partials whose max is max(|x|)'s
    fp32 bits, see `quantize_with_amax`); a layout that was not asked for comes back as an empty
    tensor (a custom op cannot return None)."""
    from . import quantize_with_amax

    row, col, scale, _ = quantize_with_amax(x, float8_dtype, layout, power_of_2, amax=amax)
    row = row if row is not None else x.new_empty(0, dtype=float8_dtype)
    col = col if col is not None else x.new_empty(0, dtype=float8_dtype)
    return row, col, scale


@cast_op.register_fake
def _(x, amax, float8_dtype, layout, power_of_2):
    M, N = x.shape
    row = x.new_empty((M, N) if layout in ("row", "both") else (0,), dtype=float8_dtype)
    if layout in ("col", "both"):
        col = x.new_empty_strided((M, N), (1, M), dtype=float8_dtype)
    else:
        col = x.new_empty(0, dtype=float8_dtype)
    return row, col, x.new_empty((), dtype=torch.float32)


# Rowwise scaling under torch.compile: the same kernels as eager (kernels/rowwise.py) behind two ops,
# so that a compiled layer gives eager's bits (inductor's own code for the reference divides with
# Triton's approximate fp32 division, and its scales differed from eager's in the last bit).

@torch.library.custom_op("f8tensor::rowwise_rows", mutates_args=())
def rowwise_rows_op(
    x: torch.Tensor, float8_dtype: torch.dtype, power_of_2: bool, write_row: bool, col_amax: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_rows`' (row, row_scale, col_amax); what was not asked for is an empty tensor."""
    from . import quantize_rows

    row, scale, amax = quantize_rows(x, float8_dtype, power_of_2, write_row=write_row, col_amax=col_amax)
    return (row if row is not None else x.new_empty(0, dtype=float8_dtype),
            scale if scale is not None else x.new_empty(0, dtype=torch.float32),
            amax if amax is not None else x.new_empty(0, dtype=torch.float32))


@rowwise_rows_op.register_fake
def _(x, float8_dtype, power_of_2, write_row, col_amax):
    M, N = x.shape
    return (x.new_empty((M, N) if write_row else (0,), dtype=float8_dtype),
            x.new_empty((M, 1) if write_row else (0,), dtype=torch.float32),
            x.new_empty((N,) if col_amax else (0,), dtype=torch.float32))


@torch.library.custom_op("f8tensor::rowwise_cols", mutates_args=())
def rowwise_cols_op(
    x: torch.Tensor, col_amax: torch.Tensor, float8_dtype: torch.dtype, power_of_2: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_cols`' (col, col_scale)."""
    from . import quantize_cols

    return quantize_cols(x, float8_dtype, col_amax, power_of_2)


@rowwise_cols_op.register_fake
def _(x, col_amax, float8_dtype, power_of_2):
    M, N = x.shape
    return x.new_empty_strided((M, N), (1, M), dtype=float8_dtype), x.new_empty((1, N), dtype=torch.float32)


# Blockwise scaling under torch.compile: the eager kernel (kernels/blockwise.py) behind one op, for
# the same reason as the rowwise ops above.

@torch.library.custom_op("f8tensor::blockwise", mutates_args=())
def blockwise_op(
    x: torch.Tensor, float8_dtype: torch.dtype, power_of_2: bool, square: bool, write_row: bool, write_col: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_blocks`' (row, row_scale, col, col_scale); what was not asked for is an empty tensor."""
    from . import quantize_blocks

    out = quantize_blocks(x, float8_dtype, power_of_2, square=square, write_row=write_row, write_col=write_col)
    empty = (x.new_empty(0, dtype=float8_dtype), x.new_empty(0, dtype=torch.float32))
    return tuple(t if t is not None else empty[i % 2] for i, t in enumerate(out))


@blockwise_op.register_fake
def _(x, float8_dtype, power_of_2, square, write_row, write_col):
    M, N = x.shape
    mb, nb = -(-M // 128), -(-N // 128)
    f8, f32 = dict(dtype=float8_dtype), dict(dtype=torch.float32)
    row = x.new_empty((M, N), **f8) if write_row else x.new_empty(0, **f8)
    col = x.new_empty_strided((M, N), (1, M), **f8) if write_col else x.new_empty(0, **f8)
    if square:
        row_scale = x.new_empty((mb, nb), **f32)
        col_scale = x.new_empty_strided((mb, nb), (1, mb), **f32)
    else:
        row_scale = x.new_empty_strided((M, nb), (1, M), **f32)
        col_scale = x.new_empty((mb, N), **f32)
    return (row, row_scale if write_row else x.new_empty(0, **f32),
            col, col_scale if write_col else x.new_empty(0, **f32))
