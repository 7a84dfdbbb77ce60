"""The Triton quantization path: amax partials, then one cast pass writing the requested layouts.

Reference: `naive.quantize_ref` (same signature, same results bit for bit on the GPU).
"""

import functools

import torch

from .amax import amax_partials
from .cast import launch_cast
from .naive import EPS, LAYOUTS, quantize_ref
from .scale import INTERPRETING

SWAPPED = {"row": "col", "col": "row", "both": "both"}
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_programs(device: torch.device) -> int:
    """Programs of the amax pass: a few per SM keeps enough loads in flight to fill HBM."""
    if device.type != "cuda":
        return 3  # interpreter: small, but enough to exercise the grid-stride loop and the reduce
    return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def quantize_triton(
    x: torch.Tensor, float8_dtype: torch.dtype, layout: str = "row", power_of_2: bool = False, *,
    amax_mode: str = "staged", num_programs: int | None = None, exact_round: bool = INTERPRETING,
    block_m: int = 64, block_n: int = 128, num_warps: int = 8,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Quantize a 2-D tensor. Returns (row_major | None, col_major | None, scale), as quantize_ref.

    Any 2-D strides are read in place: a column-major input is quantized as its (row-major)
    transpose with the two outputs swapped, so neither layout costs a copy.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_triton takes a 2-D tensor, got shape {tuple(x.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"can quantize bfloat16, float16 or float32 tensors, got {x.dtype}")
    if amax_mode not in ("staged", "atomic"):
        raise ValueError(f"amax_mode must be 'staged' or 'atomic', got {amax_mode!r}")
    if x.numel() == 0:
        return quantize_ref(x, float8_dtype, layout, power_of_2)  # nothing to launch
    if x.stride(1) != 1 and x.stride(0) == 1:
        row_t, col_t, scale = quantize_triton(
            x.t(), float8_dtype, SWAPPED[layout], power_of_2, amax_mode=amax_mode,
            num_programs=num_programs, exact_round=exact_round,
            block_m=block_m, block_n=block_n, num_warps=num_warps,
        )
        return (None if col_t is None else col_t.t()), (None if row_t is None else row_t.t()), scale
    blocks = dict(block_m=block_m, block_n=block_n, num_warps=num_warps)
    partials = amax_partials(
        x, num_programs=num_programs or default_num_programs(x.device),
        atomic=amax_mode == "atomic", **blocks,
    )
    return launch_cast(
        x, partials, float8_dtype, write_row=layout in ("row", "both"),
        write_col=layout in ("col", "both"), power_of_2=power_of_2,
        exact_round=exact_round, eps=EPS, **blocks,
    )
