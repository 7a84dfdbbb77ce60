"""The __torch_dispatch__ op table of Float8Tensor: one small handler per group of aten ops.

Every matrix product lands in `scaled_mm`, which enforces CUDA's `_scaled_mm` rules (first operand
row-major, second column-major, 16-byte aligned, K and N multiples of 16, never e5m2 x e5m2; with
rowwise scales: scale_a [M, 1] and scale_b [1, N] fp32; blockwise: `_blockwise_scales`) on every device,
so a layout or scaling the GPU would refuse fails the same way in CPU CI.
"""

import math

import torch
import torch.nn.functional as F

from .config import Float8Config
from ..kernels import has_float8_hardware
from .tensor import OPS, Float8Tensor, GemmRole, _axiswise, quantize_to_float8

aten = torch.ops.aten
DEFAULT_CONFIG = Float8Config()


def implements(ops):
    def register(handler):
        for op in ops:
            OPS[op] = handler
        return handler

    return register


def _rewrap(t: Float8Tensor, data: torch.Tensor, scale: torch.Tensor | None = None, block=None) -> Float8Tensor:
    return Float8Tensor(data, t._scale if scale is None else scale, t._orig_dtype, t._role, t._config,
                        t._block if block is None else block)


# Shape and view ops: the same op on the data, the scale shared (views share it as they share data).
# Rowwise scales follow the data: see _scale_of_view.
@implements([
    aten.detach.default, aten.alias.default, aten.view.default, aten._unsafe_view.default,
    aten.reshape.default, aten.t.default, aten.transpose.int, aten.permute.default,
    aten.as_strided.default, aten.slice.Tensor, aten.select.int, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.default, aten.expand.default,
])
def _view_op(func, args, kwargs):
    t = args[0]
    data = func(t._data, *args[1:], **kwargs)
    if t._block is not None:
        return _blockwise_view(func, t, data)
    return _rewrap(t, data, _scale_of_view(func, t, data, args, kwargs))


def _blockwise_view(func, t, data):
    """Views of a blockwise Float8Tensor that keep whole tiles: itself, and its transpose (the
    tiles and their scales transposed)."""
    if func in (aten.detach.default, aten.alias.default) or data.shape == t.shape and data.stride() == t.stride():
        return _rewrap(t, data)
    if data.dim() == 2 and data.shape == t.shape[::-1] and data.stride() == t.stride()[::-1]:
        return _rewrap(t, data, t._scale.t(), t._block[::-1])
    raise NotImplementedError(
        f"Float8Tensor with {t.granularity} scales: {func} on shape {tuple(t.shape)} would cut or regroup its "
        "tiles; only the transpose is supported: dequantize() first")


_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.squeeze.default}
_REORDERS = {aten.t.default, aten.transpose.int, aten.permute.default}


def _scale_of_view(func, t, data, args, kwargs):
    """The scale of a view of t: t's own when tensorwise; rowwise scales reshaped, transposed or
    sliced with the data, where the result still has one scale per row or per column."""
    scale = t._scale
    if scale.dim() == 0 or func in (aten.detach.default, aten.alias.default):
        return scale
    new = None
    if func in _RESHAPES and data.dim() and data.shape[-1] == t.shape[-1]:
        per_row = scale.shape[-1] == 1
        target = (*data.shape[:-1], 1) if per_row else (*[1] * (data.dim() - 1), data.shape[-1])
        new = scale.reshape(target) if math.prod(target) == scale.numel() else None
    elif func in _REORDERS:
        new = func(scale, *args[1:], **kwargs)
    elif func in (aten.slice.Tensor, aten.select.int):
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if scale.shape[dim] != 1:
            new = func(scale, *args[1:], **kwargs)
        else:
            new = scale if func is aten.slice.Tensor else scale.select(dim, 0)
    if new is None or not (new.numel() == 1 or _axiswise(new.shape, data.shape)):
        raise NotImplementedError(
            f"Float8Tensor with rowwise scales ({t.granularity}, {list(scale.shape)}): {func} on shape "
            f"{tuple(t.shape)} would leave no single scale per row or per column; dequantize() first")
    return new


@implements([aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int])
def _split_op(func, args, kwargs):
    t = args[0]
    if t._scale.dim():
        raise NotImplementedError(f"Float8Tensor with {t.granularity} scales: {func} is not supported; "
                                  "dequantize() first" + ("" if t._block else ", or slice the tensor"))
    return [_rewrap(t, d) for d in func(t._data, *args[1:], **kwargs)]


# clone owns its scale too: copy_ into the clone must not change the original's scale.
@implements([aten.clone.default])
def _clone(func, args, kwargs):
    t = args[0]
    return _rewrap(t, func(t._data, *args[1:], **kwargs), t._scale.clone())


@implements([aten.empty_like.default])
def _empty_like(func, args, kwargs):
    t = args[0]
    dtype = kwargs.pop("dtype", None)
    if dtype is not None and dtype != t._orig_dtype:
        return torch.empty_like(t._data, dtype=dtype, **kwargs)
    return _rewrap(t, torch.empty_like(t._data, **kwargs), torch.empty_like(t._scale))


@implements([aten.is_same_size.default])
def _is_same_size(func, args, kwargs):
    return args[0].shape == args[1].shape


@implements([aten._to_copy.default])
def _to_copy(func, args, kwargs):
    """Device moves move data and scale; a dtype change changes the presented (output) dtype and
    keeps the float8 values (this is what autocast asks of a weight). Either way the result is a
    copy, as `_to_copy`'s always is (an alias would take a later copy_ into it into the source).
    `.dequantize()` gives values."""
    t = args[0]
    dtype = kwargs.pop("dtype", None) or t._orig_dtype
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError("Float8Tensor.to(float8 dtype) is ambiguous; use ._data for the raw float8 data")
    device = kwargs.pop("device", None)
    return Float8Tensor(
        t._data.to(device=device, copy=True), t._scale.to(device=device, copy=True), dtype, t._role, t._config,
        t._block)


@implements([aten.cat.default])
def _cat(func, args, kwargs):
    tensors = args[0]
    first = tensors[0]
    if not all(isinstance(t, Float8Tensor) for t in tensors):
        raise TypeError("torch.cat mixes Float8Tensor and plain tensors; quantize or dequantize all first")
    if any(t._scale.dim() for t in tensors):
        raise NotImplementedError("torch.cat of Float8Tensors with rowwise scales (or blockwise ones) is not supported; "
                                  "dequantize them, concatenate, and quantize the result")
    for t in tensors[1:]:
        if t.float8_dtype != first.float8_dtype or t._orig_dtype != first._orig_dtype:
            raise TypeError("torch.cat of Float8Tensors needs one float8 dtype and one orig_dtype")
        # Concatenating data is only exact under one scale (a value check syncs; cat is rare).
        if t._scale is not first._scale and not torch.equal(t._scale, first._scale):
            raise ValueError(
                "torch.cat of Float8Tensors with different scales would mix two quantization grids; "
                "dequantize them, concatenate, and quantize the result"
            )
    # a new tensor: its own scale (a copy_ into it must not change the first input's)
    return _rewrap(first, func([t._data for t in tensors], *args[1:], **kwargs), first._scale.clone())


@implements([aten.copy_.default])
def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    if isinstance(dst, Float8Tensor) and isinstance(src, Float8Tensor):
        if dst._data.numel() != dst._data.untyped_storage().nbytes():
            raise ValueError(
                "copy_ of a Float8Tensor into a part of another would change the scale of the "
                "whole destination; copy into the whole tensor, or dequantize first"
            )
        if src.float8_dtype != dst.float8_dtype:
            raise TypeError(f"copy_ from {src.float8_dtype} into {dst.float8_dtype} data; requantize instead")
        if src._block != dst._block or src._scale.shape != dst._scale.shape:
            raise TypeError(f"copy_ from a Float8Tensor scaled {src.granularity} into one scaled {dst.granularity}; "
                            "requantize instead")
        dst._data.copy_(src._data)
        dst._scale.copy_(src._scale)
    elif isinstance(dst, Float8Tensor):
        # High-precision values into float8 storage: quantize onto dst's existing scale.
        fp8_max = torch.finfo(dst.float8_dtype).max
        y = src.to(device=dst.device, dtype=torch.float32) / dst.scale_per_element()
        dst._data.copy_(y.clamp(-fp8_max, fp8_max))
    else:
        dst.copy_(src.dequantize())
    return dst


def _aligned(d: torch.Tensor) -> bool:
    """16-byte aligned, read off the storage offset (allocations are aligned): unlike data_ptr()
    this also works on the fake tensors torch.compile traces with.

    While Dynamo traces Python code (Float8Linear's autograd function) it cannot read a storage
    offset; the operands there are fresh outputs of the quantize op (offset 0), so they pass.
    Float8Tensor's own mm is traced below Dynamo, on fake tensors, where the check does run.
    """
    if torch.compiler.is_dynamo_compiling():
        return True
    return d.storage_offset() * d.element_size() % 16 == 0


def _is_row_major(d: torch.Tensor) -> bool:
    return d.is_contiguous() and _aligned(d)


def _is_col_major(d: torch.Tensor) -> bool:
    return d.t().is_contiguous() and _aligned(d)


def _pad_inner(a_data: torch.Tensor, b_data: torch.Tensor):
    """Zero-pad K up to a multiple of 16: a stays row-major, b column-major.

    Padded as bytes (uint8 views; the zero byte is +0.0 in both float8 formats): inductor cannot
    generate a masked float8 copy (it promotes the mask with float8 and fails), so a compiled
    layer with a token count that is not a multiple of 16 would not compile otherwise.
    """
    K = a_data.shape[1]
    extra = (K + 15) // 16 * 16 - K
    a_pad = F.pad(a_data.view(torch.uint8), (0, extra)).view(a_data.dtype)
    b_pad = F.pad(b_data.t().view(torch.uint8), (0, extra)).view(b_data.dtype)
    return a_pad, b_pad.t()


def _gemm_fast_accum(a: Float8Tensor, b: Float8Tensor, config: Float8Config) -> bool:
    """The three GEMMs of a linear layer, told apart by their operands' roles."""
    if a._role is GemmRole.GRAD_OUTPUT:
        if b._role is GemmRole.WEIGHT:
            return config.fast_accum_grad_input
        return config.fast_accum_grad_weight
    return config.fast_accum_output


def scaled_mm(a: Float8Tensor, b: Float8Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (+ bias) through torch._scaled_mm, in a's original dtype."""
    config = a._config or b._config or DEFAULT_CONFIG
    # Blockwise GEMMs have no fast accumulation; a blockwise config already turns it off, and the
    # default config's setting is no request of the caller's.
    blockwise = a._block is not None or b._block is not None
    fast_accum = _gemm_fast_accum(a, b, config) and not blockwise
    return scaled_mm_data(a._data, a._scale, b._data, b._scale, a._orig_dtype, fast_accum, config, bias,
                          blockwise=blockwise)


def scaled_mm_data(
    a_data: torch.Tensor, a_scale: torch.Tensor, b_data: torch.Tensor, b_scale: torch.Tensor,
    out_dtype: torch.dtype, use_fast_accum: bool, config: Float8Config, bias: torch.Tensor | None = None,
    blockwise: bool | None = None,
) -> torch.Tensor:
    """(a_data * a_scale) @ (b_data * b_scale) (+ bias) through torch._scaled_mm, in out_dtype.
    blockwise: whether the operands are blockwise-scaled (None: the config's recipe says); it
    decides only scales that fit either kind, [M, 1] and [1, N] over a K of one 128 block.

    The one place GEMM rules live (Float8Tensor's mm and Float8Linear both land here). Copies an
    operand only when its layout or alignment is not what _scaled_mm takes, or, under blockwise
    scaling, when a size is not a multiple of 128 (zero-padded).
    """
    # Not while Dynamo traces (Float8Linear's autograd function): comparing symbolic sizes there
    # puts them into its graph, which Dynamo in torch 2.11 cannot take under FSDP2; the traced
    # _scaled_mm checks the shapes itself.
    if not torch.compiler.is_dynamo_compiling() and (
            a_data.dim() != 2 or b_data.dim() != 2 or a_data.shape[1] != b_data.shape[0]):
        raise ValueError(
            f"scaled_mm needs [M, K] @ [K, N], got {tuple(a_data.shape)} @ {tuple(b_data.shape)}")
    if a_data.dtype == torch.float8_e5m2 and b_data.dtype == torch.float8_e5m2:
        raise TypeError("_scaled_mm on CUDA rejects float8_e5m2 x float8_e5m2; make one operand e4m3fn")
    K, N = b_data.shape
    if (a_data.is_cuda and not config.emulate and not torch.compiler.is_compiling()
            and not has_float8_hardware(a_data.device)):
        raise RuntimeError(
            f"{torch.cuda.get_device_name(a_data.device)} has no float8 matrix multiply (it needs "
            "compute capability 8.9 or newer); use Float8Config(emulate=True) to run the GEMMs in "
            "high precision"
        )
    kind = "tensorwise"
    if a_scale.dim() == 2 or b_scale.dim() == 2:
        if blockwise is None:
            blockwise = config.scaling_granularity == "blockwise"
        kind, a_scale, b_scale = _axiswise_scales(a_data, a_scale, b_data, b_scale, out_dtype, use_fast_accum,
                                                  blockwise)
    elif out_dtype not in TENSORWISE_OUT_DTYPES:
        raise TypeError(f"tensorwise _scaled_mm writes {', '.join(map(str, TENSORWISE_OUT_DTYPES))} (checked on an "
                        f"H100 with torch 2.11: cuBLAS refuses float64), asked for {out_dtype}; cast the "
                        "operands from bfloat16, float16 or float32")
    if N % 16 and kind != "blockwise":  # blockwise GEMMs are zero-padded to whole tiles below
        raise ValueError(
            f"_scaled_mm needs N divisible by 16, got [{a_data.shape[0]}, {K}] @ [{K}, {N}]; pad the "
            "layer's features to a multiple of 16 or keep this layer in high precision"
        )
    if not _is_row_major(a_data):
        a_data = a_data.contiguous()
    if not _is_col_major(b_data):
        b_data = b_data.t().contiguous().t()
    # a_data's row count is read only in the branches that use it: with torch 2.11, Dynamo tracing
    # Float8Linear's autograd function with symbolic sizes (FSDP2, compile's automatic dynamic
    # shapes) failed (AssertionError in overwrite_tensor_vt_proxy) as soon as this function read it
    # (tests/test_fsdp2.py, "compiled_dynamic").
    if kind == "blockwise":
        M = a_data.shape[0]
        if not torch.compiler.is_dynamo_compiling() and 0 in (M, N, K):
            # Nothing to multiply (an empty batch): cuBLAS's blockwise GEMM was not probed with empty sizes.
            out = a_data.new_zeros((M, N), dtype=out_dtype)
            return out if bias is None else (out + bias).to(out_dtype)
        if M % BLOCK or N % BLOCK or K % _k_multiple(a_scale, b_scale, M, N):
            # cuBLAS's blockwise GEMMs gave wrong products on the H200 with torch 2.11 for other sizes
            # (docs/design.md, "Blockwise scaling"); zero padding is exact.
            a_data, a_scale, b_data, b_scale = _pad_blockwise(a_data, a_scale, b_data, b_scale)
            if bias is not None:
                bias = F.pad(bias, (0, b_data.shape[1] - N))
            return scaled_mm_data(a_data, a_scale, b_data, b_scale, out_dtype, use_fast_accum, config,
                                  bias, blockwise=True)[:M, :N].contiguous()
    if K % 16:
        # _scaled_mm needs K % 16 == 0; zero columns add nothing, so padding is exact. This is the
        # weight-gradient GEMM (K = tokens) when the token count is not a multiple of 16.
        a_data, b_data = _pad_inner(a_data, b_data)
    if config.emulate:
        if kind == "blockwise":
            a_scale, b_scale = _per_element(a_scale, *a_data.shape), _per_element(b_scale, *b_data.shape)
        out = (a_data.float() * a_scale) @ (b_data.float() * b_scale)
        return (out if bias is None else out + bias).to(out_dtype)
    if kind == "tensorwise" and a_data.device.type == "cpu" and CPU_ROWWISE_KERNEL:
        # CPU's tensorwise _scaled_mm kernel is two orders of magnitude slower than its rowwise one
        # (42 against 0.28 ms for [512, 64] @ [64, 64] with torch 2.13 on 2 cores): the same scales
        # as a column and a row. (No float8 hardware there: CPU GEMMs serve tests and the demo.)
        a_scale, b_scale = tensorwise_as_rowwise(a_scale, b_scale, a_data.shape[0], N)
    # cuBLAS adds a bias of the output dtype in its epilogue for bf16/fp16 outputs only.
    fused_bias = bias is not None and bias.dtype == out_dtype and out_dtype != torch.float32
    try:
        out = torch._scaled_mm(
            a_data, b_data, scale_a=a_scale, scale_b=b_scale,
            bias=bias if fused_bias else None, out_dtype=out_dtype, use_fast_accum=use_fast_accum,
        )
    except (RuntimeError, ValueError) as e:  # torch 2.13 raises ValueError for scalings it lacks
        if a_data.device.type == "cpu" and kind != "tensorwise":  # torch 2.11: tensorwise only; 2.13: no blocks
            raise NotImplementedError(
                f"torch {torch.__version__}'s CPU _scaled_mm does not take {kind} scales; run such layers on "
                "CPU with Float8Config(emulate=True)" + (
                    ", or with a torch whose CPU _scaled_mm takes rowwise scales (2.13 does)"
                    if kind == "rowwise" else "")) from e
        raise
    if bias is not None and not fused_bias:
        out = out + bias
    return out


# Whether this torch's CPU _scaled_mm has its rowwise kernel (2.13 does, 2.11 does not; 2.12 is
# taken as not): by version, as the answer must be a constant under torch.compile.
CPU_ROWWISE_KERNEL = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def tensorwise_as_rowwise(a_scale, b_scale, M: int, N: int):
    """Two tensorwise scales as the rowwise scales of the same product: [M, 1] and [1, N], dense."""
    return a_scale.reshape(1, 1).expand(M, 1).contiguous(), b_scale.reshape(1, 1).expand(1, N).contiguous()


# Output dtypes of rowwise _scaled_mm checked against an exact reference on the H200
# (benchmarks/tools/scaled_mm_support.py, docs/data/scaled_mm_support_h200.txt).
ROWWISE_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# What CUDA's tensorwise _scaled_mm writes (docs/data/scaled_mm_out_dtype_h100.txt: float64 and int32
# refused by cuBLAS; float8_e5m2 not probed).
TENSORWISE_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)


def _axiswise_scales(a_data, a_scale, b_data, b_scale, out_dtype, use_fast_accum, blockwise: bool):
    """("rowwise" | "blockwise", scale_a, scale_b) under CUDA's rules for scales that are not both
    tensorwise; a tensorwise scale beside a rowwise one is broadcast to its row or column (the
    same values). blockwise: scaled_mm_data's."""
    M, N = a_data.shape[0], b_data.shape[1]
    # Blockwise scales over a K of one block ([M, 1] and [1, N]) are rowwise scales too, the same
    # math: the rowwise GEMM, unless N is not a multiple of 16, which only the (padded) blockwise
    # path runs, and only for blockwise operands (rowwise ones get the rowwise rule's error).
    if a_scale.dim() == 2 and b_scale.dim() == 2 and _blockwise_kinds(a_data, a_scale, b_data, b_scale) \
            and (a_scale.shape != (M, 1) or b_scale.shape != (1, N) or (N % 16 and blockwise)):
        return ("blockwise", *_blockwise_scales(a_data, a_scale, b_data, b_scale, out_dtype, use_fast_accum))
    if a_scale.dim() == 0:
        a_scale = a_scale.reshape(1, 1).expand(M, 1)
    if b_scale.dim() == 0:
        b_scale = b_scale.reshape(1, 1).expand(1, N)
    if a_scale.shape != (M, 1) or b_scale.shape != (1, N):
        K = a_data.shape[1]
        kb = -(-K // BLOCK)
        raise ValueError(
            f"rowwise _scaled_mm of [{M}, {K}] @ [{K}, {N}] needs scale_a [{M}, 1] (one per row of a) and scale_b "
            f"[1, {N}] (one per column of b), got {tuple(a_scale.shape)} and {tuple(b_scale.shape)}; blockwise "
            f"takes scale_a [{M}, {kb}] (1x128) or [{-(-M // BLOCK)}, {kb}] (128x128) and scale_b [{kb}, {N}] "
            f"(1x128) or [{kb}, {-(-N // BLOCK)}] (128x128), in the pairs {BLOCKWISE_PAIRS} (a, b)")
    return ("rowwise", *_rowwise_scales(a_scale, b_scale, out_dtype, M, N))


def _rowwise_scales(a_scale, b_scale, out_dtype, M, N):
    """CUDA's rules for rowwise scaling, on scales of the right shapes."""
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise TypeError(f"rowwise _scaled_mm takes fp32 scales, got {a_scale.dtype} and {b_scale.dtype}")
    if out_dtype not in ROWWISE_OUT_DTYPES:
        raise TypeError(f"rowwise _scaled_mm writes {' or '.join(map(str, ROWWISE_OUT_DTYPES))} (checked on an H200 "
                        f"with torch 2.11), asked for {out_dtype}; run the layer in bfloat16 (or under "
                        "torch.autocast(dtype=torch.bfloat16)), or use tensorwise scaling")
    # As vectors laid out densely ([M, 1] with strides (1, 1), [1, N] with (N, 1)): a transposed
    # column scale ([N, 1] with strides (1, N)) counts as contiguous, yet _scaled_mm on CPU
    # refuses its stride.
    return a_scale.reshape(M).contiguous().unsqueeze(1), b_scale.reshape(N).contiguous().unsqueeze(0)


# What blockwise _scaled_mm took on the H200 with torch 2.11 (benchmarks/tools/scaled_mm_support.py,
# docs/design.md "Blockwise scaling"): the scale layouts per operand and their pairs, the output dtypes.
BLOCK = 128
BLOCKWISE_PAIRS = (("1x128", "128x128"), ("1x128", "1x128"), ("128x128", "1x128"))
BLOCKWISE_OUT_DTYPES = (torch.bfloat16,)


def _blockwise_scales(a_data, a_scale, b_data, b_scale, out_dtype, use_fast_accum):
    """CUDA's rules for blockwise scaling of a [M, K] @ b [K, N]; Mb, Kb, Nb = ceil(size / 128):
    - a: "1x128" scale [M, Kb] (strides (1, M)), or "128x128" [Mb, Kb] (row-major);
    - b: "1x128" (128 x 1 strips of b's columns) scale [Kb, N] (row-major), or "128x128" [Kb, Nb]
      (strides (1, Kb));
    in the pairs BLOCKWISE_PAIRS. Scales in other strides are copied into these."""
    M, N = a_data.shape[0], b_data.shape[1]
    a_kind, b_kind = _blockwise_kinds(a_data, a_scale, b_data, b_scale)
    kb = -(-a_data.shape[1] // BLOCK)
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise TypeError(f"blockwise _scaled_mm takes fp32 scales, got {a_scale.dtype} and {b_scale.dtype}")
    if a_data.dtype != torch.float8_e4m3fn or b_data.dtype != torch.float8_e4m3fn:
        raise TypeError(f"blockwise _scaled_mm multiplies float8_e4m3fn operands only (cuBLAS refused e5m2 on an "
                        f"H200 with torch 2.11), got {a_data.dtype} and {b_data.dtype}; cast gradients to e4m3fn "
                        "(Float8Config(backward_dtype=torch.float8_e4m3fn), as the 'blockwise' recipe does)")
    if use_fast_accum:
        raise ValueError("blockwise _scaled_mm has no fast accumulation (cuBLAS refuses it on Hopper); set "
                         "Float8Config's fast_accum_* fields to False, as the 'blockwise' recipe does")
    if out_dtype not in BLOCKWISE_OUT_DTYPES:
        raise TypeError(f"blockwise _scaled_mm writes {' or '.join(map(str, BLOCKWISE_OUT_DTYPES))} (checked on an "
                        f"H200 with torch 2.11), asked for {out_dtype}; run the layer in bfloat16 (or under "
                        "torch.autocast(dtype=torch.bfloat16))")
    a_scale = _strided(a_scale, (1, M) if a_kind == "1x128" else (kb, 1))
    b_scale = _strided(b_scale, (N, 1) if b_kind == "1x128" else (1, kb))
    return a_scale, b_scale


def _blockwise_kinds(a_data, a_scale, b_data, b_scale) -> tuple[str, str] | None:
    """The (a, b) pair of BLOCKWISE_PAIRS these scale shapes are, or None."""
    (M, K), N = a_data.shape, b_data.shape[1]
    mb, kb, nb = -(-M // BLOCK), -(-K // BLOCK), -(-N // BLOCK)
    # A size of 0 or 1 makes both kinds one shape (the same math): it is read as 1x128, as
    # _k_multiple and _pad_blockwise read it.
    a_kinds = {kind for shape, kind in (((M, kb), "1x128"), ((mb, kb), "128x128")) if a_scale.shape == shape}
    b_kinds = {kind for shape, kind in (((kb, N), "1x128"), ((kb, nb), "128x128")) if b_scale.shape == shape}
    return next((pair for pair in BLOCKWISE_PAIRS if pair[0] in a_kinds and pair[1] in b_kinds), None)


def _k_multiple(a_scale, b_scale, M, N) -> int:
    """What K must be a multiple of: 512 where an operand has 128x128 scales (cuBLAS read their rows
    as if padded to 4 blocks, where torch 2.11 requires them unpadded), else 128."""
    square = a_scale.shape[0] != M or b_scale.shape[1] != N
    return 4 * BLOCK if square else BLOCK


def _pad_blockwise(a_data, a_scale, b_data, b_scale):
    """a [M, K] and b [K, N] zero-padded: M and N to multiples of 128, K to `_k_multiple`; their
    blockwise scales (in _blockwise_scales' layouts) to match (scale 1 for padding); the layouts
    are kept."""
    (M, K), N = a_data.shape, b_data.shape[1]
    pm, pk, pn = -M % BLOCK, -K % _k_multiple(a_scale, b_scale, M, N), -N % BLOCK
    a_pad = F.pad(a_data.view(torch.uint8), (0, pk, 0, pm)).view(a_data.dtype)
    b_pad = F.pad(b_data.t().view(torch.uint8), (0, pk, 0, pn)).view(b_data.dtype).t()
    kb = -(-(K + pk) // BLOCK) - a_scale.shape[1]  # new K blocks
    if a_scale.shape[0] == M:  # 1x128: one scale per row, [M, Kb] with strides (1, M)
        a_scale = F.pad(a_scale.t(), (0, pm, 0, kb), value=1.0).t()
    else:  # 128x128: [Mb, Kb] row-major
        a_scale = F.pad(a_scale, (0, kb, 0, -(-(M + pm) // BLOCK) - a_scale.shape[0]), value=1.0)
    if b_scale.shape[1] == N:  # 1x128: one scale per column, [Kb, N] row-major
        b_scale = F.pad(b_scale, (0, pn, 0, kb), value=1.0)
    else:  # 128x128: [Kb, Nb] with strides (1, Kb)
        b_scale = F.pad(b_scale.t(), (0, kb, 0, -(-(N + pn) // BLOCK) - b_scale.shape[1]), value=1.0).t()
    return a_pad, a_scale, b_pad, b_scale


def _strided(scale: torch.Tensor, strides: tuple) -> torch.Tensor:
    """scale with exactly these strides (a copy only where they differ)."""
    if scale.stride() == strides:
        return scale
    return torch.empty_strided(scale.shape, strides, dtype=scale.dtype, device=scale.device).copy_(scale)


def _per_element(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A blockwise GEMM scale expanded to its operand's [rows, cols] (emulation); a scale axis of
    the operand's own size is per index, a shorter one per 128."""
    for dim, size in ((0, rows), (1, cols)):
        if scale.shape[dim] != size:
            scale = scale.repeat_interleave(BLOCK, dim).narrow(dim, 0, size)
    return scale


def _as_float8(t, other: Float8Tensor, layout: str) -> Float8Tensor:
    """A plain operand multiplied with a Float8Tensor is quantized on the fly (forward dtype)."""
    if isinstance(t, Float8Tensor):
        return t
    config = other._config or DEFAULT_CONFIG
    # the other operand's kind
    granularity = "blockwise" if other._block is not None else "rowwise" if other._scale.dim() else "tensorwise"
    return quantize_to_float8(t, config.forward_dtype, layout=layout, role=GemmRole.INPUT, config=config,
                              granularity=granularity)


def _operands(func, a, b):
    """(a row-major, b column-major) as Float8Tensors; a plain one is quantized on the fly."""
    if a.dim() != 2 or b.dim() != 2:
        raise NotImplementedError(f"{func} with a Float8Tensor supports 2-D operands only")
    fp8 = a if isinstance(a, Float8Tensor) else b
    return _as_float8(a, fp8, "row"), _as_float8(b, fp8, "col")


@implements([aten.mm.default, aten.matmul.default])
def _mm(func, args, kwargs):
    return scaled_mm(*_operands(func, args[0], args[1]))


@implements([aten.addmm.default])
def _addmm(func, args, kwargs):
    bias, a, b = args[0], args[1], args[2]
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        raise NotImplementedError("addmm with a Float8Tensor supports beta=1 and alpha=1 only")
    if isinstance(bias, Float8Tensor):
        bias = bias.dequantize()
    a, b = _operands(func, a, b)
    if bias.dtype != a._orig_dtype:  # as torch.addmm, which takes one dtype (the output's would change)
        raise TypeError(f"addmm of {a._orig_dtype} operands with a {bias.dtype} bias; cast the bias to "
                        f"{a._orig_dtype}")
    if bias.shape != (b.shape[1],):  # a broadcast bias of another shape ([1], [M, 1], ...): added after
        return scaled_mm(a, b) + bias
    return scaled_mm(a, b, bias)
