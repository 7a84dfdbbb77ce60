"""The Triton quantization path: amax partials, then one cast pass writing the requested layouts.

Reference: `naive.quantize_ref` (same signature, same results bit for bit on the GPU).

Host time: the first call of each case (shape, strides, dtypes, layout, options, device) goes
through Triton's launch path and records a `_Plan`: the two compiled kernels and their constant
arguments. Every later call of that case allocates its outputs and makes two direct C launches
(launch.py). The plan key holds every int argument by value and the input's 16-byte alignment,
which is finer than Triton's own specialization, so a plan never runs a binary compiled for
other arguments.
"""

import functools

import torch

from .amax import amax_partials, amax_programs
from .cast import launch_cast
from .launch import Relaunch, relaunch_possible, specialization_key
from .naive import EPS, INPUT_DTYPES, LAYOUTS, quantize_ref
from .scale import INTERPRETING
from ..torch_internals import current_raw_stream

SWAPPED = {"row": "col", "col": "row", "both": "both"}


# state.py lists this cache.
@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_programs(device: torch.device) -> int:
    """Programs of the amax pass: a few per SM keeps enough loads in flight to fill HBM."""
    if device.type != "cuda":
        return 3  # interpreter: small, but enough to exercise the grid-stride loop and the reduce
    return 4 * num_sms(device.index if device.index is not None else torch.cuda.current_device())


class _Plan:
    """A recorded case: allocate, launch amax (unless given), launch cast. Column-major inputs are
    planned as their row-major transpose with the outputs swapped, as in `quantize_triton_with_amax`."""

    __slots__ = ("amax", "cast", "amax_tail", "cast_tail", "num_partials", "atomic", "shape",
                 "device", "launch_device", "float8_dtype", "write_row", "write_col", "transposed")

    def __call__(self, x, amax):
        if self.transposed:
            x = x.t()
        M, N = self.shape
        device, dtype = self.device, self.float8_dtype
        # The current device's stream, as Triton launches (the plan key holds the current device).
        stream = current_raw_stream(self.launch_device)
        if amax is None:
            if self.atomic:
                amax = torch.zeros(1, dtype=torch.int32, device=device)
            else:
                amax = torch.empty(self.num_partials, dtype=torch.int32, device=device)
            self.amax(stream, x, amax, *self.amax_tail)
        row = torch.empty((M, N), dtype=dtype, device=device) if self.write_row else None
        # The C launcher reads only data_ptr() of a pointer argument, so the float8 column
        # buffer goes in as it is; Triton's first launch saw it as uint8 (same address, same bytes).
        col_t = torch.empty((N, M), dtype=dtype, device=device) if self.write_col else None
        scale = torch.empty((), dtype=torch.float32, device=device)
        any_out = row if row is not None else col_t
        self.cast(stream, x, amax, self.num_partials, any_out, col_t if col_t is not None else any_out,
                  scale, *self.cast_tail)
        if self.transposed:  # x's row-major data is the transpose's column-major buffer
            return col_t, (None if row is None else row.t()), scale, amax
        return row, (None if col_t is None else col_t.t()), scale, amax


PLANS: dict = {}
MAX_PLANS = 4096  # a plan is a few hundred bytes; re-recording one costs one Triton launch path


def quantize_triton(
    x: torch.Tensor, float8_dtype: torch.dtype, layout: str = "row", power_of_2: bool = False, **options,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Quantize a 2-D tensor. Returns (row_major | None, col_major | None, scale), as quantize_ref.

    Any 2-D strides are read in place: a column-major input is quantized as its (row-major)
    transpose with the two outputs swapped, so neither layout costs a copy. Options (amax_mode,
    num_programs, exact_round, block_m, block_n, num_warps) are those of `quantize_triton_with_amax`.
    """
    return quantize_triton_with_amax(x, float8_dtype, layout, power_of_2, **options)[:3]


def quantize_triton_with_amax(
    x: torch.Tensor, float8_dtype: torch.dtype, layout: str = "row", power_of_2: bool = False, *,
    amax: torch.Tensor | None = None, amax_mode: str = "staged", num_programs: int | None = None,
    exact_round: bool = INTERPRETING, block_m: int = 64, block_n: int = 128, num_warps: int = 8,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`quantize_triton`, plus the amax record (int32 partials) it computed or was given.

    amax: the record returned by an earlier call on a tensor with the same values and shape (a
    weight quantized again in backward): the amax pass is skipped and the scale is the same bits.
    """
    if amax is not None and (amax.dtype != torch.int32 or amax.dim() != 1 or amax.device != x.device
                             or not amax.numel() or not amax.is_contiguous()):
        raise ValueError("amax must be the int32 record returned by quantize_triton_with_amax for this tensor "
                         f"(contiguous, not empty), got {amax.dtype} {tuple(amax.shape)} on {amax.device}")
    key = None
    if x.is_cuda:
        # a given record's alignment too: Triton specializes the partials' pointer on it
        key = (x.dtype, x.shape, x.stride(), (x.data_ptr() & 15) == 0, x.get_device(), float8_dtype,
               layout, power_of_2, None if amax is None else (amax.numel(), (amax.data_ptr() & 15) == 0),
               amax_mode, num_programs, exact_round, block_m, block_n, num_warps, *specialization_key())
        plan = PLANS.get(key)
        if plan is not None and relaunch_possible():
            return plan(x, amax)
    if x.dim() != 2:
        raise ValueError(f"quantize_triton takes a 2-D tensor, got shape {tuple(x.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"can quantize bfloat16, float16 or float32 tensors, got {x.dtype}")
    if amax_mode not in ("staged", "atomic"):
        raise ValueError(f"amax_mode must be 'staged' or 'atomic', got {amax_mode!r}")
    if float8_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"float8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {float8_dtype}")
    if x.numel() == 0:  # nothing to launch; a given record still sets the scale (an empty shard, say)
        value = None if amax is None else amax.max().view(torch.float32)
        row, col, scale = quantize_ref(x, float8_dtype, layout, power_of_2, amax=value)
        return row, col, scale, torch.zeros(1, dtype=torch.int32, device=x.device) if amax is None else amax
    transposed = x.stride(1) != 1 and x.stride(0) == 1
    xt = x.t() if transposed else x  # row-major in every case below
    M, N = xt.shape
    kernel_layout = SWAPPED[layout] if transposed else layout
    blocks = dict(block_m=block_m, block_n=block_n, num_warps=num_warps)
    launched = []  # (kernel, grid, parameters after the pointers) of each launch, for the plan
    given = amax is not None
    atomic = amax_mode == "atomic"
    if not given:
        programs = amax_programs(M, N, num_programs or default_num_programs(x.device), block_m, block_n)
        amax = amax_partials(xt, num_programs=programs, atomic=atomic, launched=launched, **blocks)
    row, col, scale = launch_cast(
        xt, amax, float8_dtype, write_row=kernel_layout in ("row", "both"),
        write_col=kernel_layout in ("col", "both"), power_of_2=power_of_2, exact_round=exact_round,
        eps=EPS, launched=launched, **blocks)
    if key is not None and relaunch_possible():
        relaunches = [Relaunch.capture(kernel, grid) for kernel, grid, _ in launched]
        if None not in relaunches:
            plan = _Plan()
            plan.amax = None if given else relaunches[0]
            plan.amax_tail = None if given else launched[0][2]
            plan.cast, plan.cast_tail = relaunches[-1], launched[-1][2]
            plan.num_partials, plan.atomic = amax.numel(), atomic
            plan.shape, plan.device, plan.float8_dtype = (M, N), x.device, float8_dtype
            plan.launch_device = torch.cuda.current_device()  # in the key too
            plan.write_row, plan.write_col = row is not None, col is not None
            plan.transposed = transposed
            if len(PLANS) >= MAX_PLANS:  # e.g. a new token count every step: start over
                PLANS.clear()
            PLANS[key] = plan
    if transposed:
        return (None if col is None else col.t()), (None if row is None else row.t()), scale, amax
    return row, col, scale, amax
