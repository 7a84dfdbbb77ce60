"""max(|x|) of a 2-D tensor, on the GPU, with no host synchronization.

Reference: `naive.amax_ref`. The kernel keeps |x| as fp32 bit patterns in int32: for non-negative
floats integer order is float order, and every NaN pattern sorts above inf, so NaN propagates exactly
as `x.abs().amax()` propagates it, with one integer max per element.

Two ways to finish the reduction:
- staged: a persistent grid of P programs, each writes one partial; whoever needs the amax reduces
  the P partials (the cast kernel does it in its prologue, so this costs no launch);
- atomic: every program does an atomic max into one zeroed word (one more launch, for the zeroing).
"""

import torch
import triton
import triton.language as tl



@triton.jit
def magnitude_bits(x):
    """|x| as fp32 bits in int32: integer order is float order, every NaN above inf."""
    return x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def amax_kernel(
    x_ptr, out_ptr, M, N, stride_m, stride_n, TILES_N, NUM_PROGRAMS, ITERS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    # Tiles pid, pid + P, ...; the last round may run past the end, and the mask empties it.
    for i in range(ITERS):
        tile = pid + i * NUM_PROGRAMS
        rows = (tile // TILES_N) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (tile % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_n
        x = tl.load(ptrs, mask=mask, other=0.0)
        acc = tl.maximum(acc, magnitude_bits(x))
    result = tl.max(tl.max(acc, 1), 0)
    if ATOMIC:
        tl.atomic_max(out_ptr, result)
    else:
        tl.store(out_ptr + pid, result)


def cdiv(a: int, b: int) -> int:
    # triton.cdiv is a constexpr_function in 3.6, a costly call on the host; this is plain integer math.
    return -(-a // b)


def tile_grid(M: int, N: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(number of tiles, tiles per row of tiles) for an M x N matrix."""
    tiles_n = cdiv(N, block_n)
    return cdiv(M, block_m) * tiles_n, tiles_n


def amax_programs(M: int, N: int, num_programs: int, block_m: int, block_n: int) -> int:
    """Programs the amax pass launches (and partials it writes): never more than there are tiles."""
    return max(1, min(num_programs, tile_grid(M, N, block_m, block_n)[0]))


def amax_partials(
    x: torch.Tensor, *, num_programs: int, atomic: bool = False,
    block_m: int = 64, block_n: int = 128, num_warps: int = 8, launched: list | None = None,
) -> torch.Tensor:
    """int32 buffer whose max, bit-cast to fp32, is max(|x|): P partials, or one word if atomic.

    launched: a list that receives (CompiledKernel Triton ran, grid, parameters after the two
    pointers) for a later direct relaunch.
    """
    M, N = x.shape
    num_programs = amax_programs(M, N, num_programs, block_m, block_n)
    if atomic:
        out = torch.zeros(1, dtype=torch.int32, device=x.device)
    else:
        out = torch.empty(num_programs, dtype=torch.int32, device=x.device)
    num_tiles, tiles_n = tile_grid(M, N, block_m, block_n)
    # Every parameter after (x_ptr, out_ptr) in signature order, constexprs included (as replayed).
    args = (M, N, x.stride(0), x.stride(1), tiles_n, num_programs, cdiv(num_tiles, num_programs),
            block_m, block_n, atomic)
    kernel = amax_kernel[(num_programs,)](x, out, *args[:-3], BLOCK_M=block_m, BLOCK_N=block_n,
                                           ATOMIC=atomic, num_warps=num_warps)
    if launched is not None:
        launched.append((kernel, (num_programs,), args))
    return out


def amax_triton(x: torch.Tensor, **kwargs) -> torch.Tensor:
    """0-d fp32 max(|x|) of a non-empty 2-D tensor (reduces the partials with one torch op)."""
    return amax_partials(x, **kwargs).max().view(torch.float32)
