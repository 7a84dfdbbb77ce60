"""Rotary position embedding, forward and backward, each one pass.

Reference: `naive.rope_ref`, `naive.rope_backward_ref`. With x's pairs x1, x2 — last-dim halves
(rotate_half form) or even and odd elements (interleaved form) — and the tables' entries at the
same places c1, c2, s1, s2 (cos and sin broadcast to x):

    forward      out1 = x1 c1 - x2 s1        out2 = x2 c2 + x1 s2
    backward     dx1  = g1 c1 + g2 s2        dx2  = g2 c2 - g1 s1

in fp32, one rounding to the output dtype. Eager PyTorch's `x * cos + cat(-x2, x1) * sin` is five
kernels forward (neg, cat, two muls, add) and as many backward, each a full pass over q or k,
strided where q is a transposed view (the complex form: an fp32 copy, the multiply, a copy back);
here each direction reads x (or g) once and writes once.

Any strides in the leading dims (a [B, H, S, D] view of [B, S, H, D] memory is read in place); the
last dim must be contiguous. The tables are read through broadcast strides (0 where they repeat),
so one [S, D] table serves every batch and head from L2.
"""

import torch
import triton
import triton.language as tl

from .launch import launch_kernel


@triton.jit
def _load_pair(row_ptrs, row_ok, HALF, INTERLEAVED: tl.constexpr, BLOCK_ROWS: tl.constexpr,
               BLOCK_HALF: tl.constexpr):
    """The two elements of each pair j < HALF of each row ([BLOCK_ROWS, 1] pointers to the rows'
    first elements), as fp32 [BLOCK_ROWS, BLOCK_HALF] each."""
    if INTERLEAVED:  # (2j, 2j + 1): whole rows loaded contiguously, split in registers
        full = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        t = tl.load(row_ptrs + full, mask=row_ok & (full < 2 * HALF), other=0.0).to(tl.float32)
        first, second = tl.split(tl.reshape(t, [BLOCK_ROWS, BLOCK_HALF, 2]))
    else:  # (j, j + HALF): the two halves
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        mask = row_ok & (cols < HALF)
        first = tl.load(row_ptrs + cols, mask=mask, other=0.0).to(tl.float32)
        second = tl.load(row_ptrs + cols + HALF, mask=mask, other=0.0).to(tl.float32)
    return first, second


@triton.jit
def _store_pair(row_ptrs, first, second, row_ok, HALF, INTERLEAVED: tl.constexpr,
                BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """_load_pair's inverse: first and second (already in the output dtype) back to their places."""
    if INTERLEAVED:
        full = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        t = tl.reshape(tl.join(first, second), [BLOCK_ROWS, 2 * BLOCK_HALF])
        tl.store(row_ptrs + full, t, mask=row_ok & (full < 2 * HALF))
    else:
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        mask = row_ok & (cols < HALF)
        tl.store(row_ptrs + cols, first, mask=mask)
        tl.store(row_ptrs + cols + HALF, second, mask=mask)


@triton.jit
def rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, ROWS, N1, N2, HALF,
    x_s0, x_s1, x_s2, c_s0, c_s1, c_s2, s_s0, s_s1, s_s2, o_s0, o_s1, o_s2,
    BACKWARD: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # A block of rows; one row is one [.., position, head] vector of D = 2 HALF elements.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = (rows < ROWS)[:, None]
    i0, i1, i2 = rows // N2 // N1, (rows // N2) % N1, rows % N2  # the leading indices (int64)
    x_rows = x_ptr + (i0 * x_s0 + i1 * x_s1 + i2 * x_s2)[:, None]
    x1, x2 = _load_pair(x_rows, row_ok, HALF, INTERLEAVED, BLOCK_ROWS, BLOCK_HALF)
    c1, c2 = _load_pair(cos_ptr + (i0 * c_s0 + i1 * c_s1 + i2 * c_s2)[:, None], row_ok, HALF,
                        INTERLEAVED, BLOCK_ROWS, BLOCK_HALF)
    s1, s2 = _load_pair(sin_ptr + (i0 * s_s0 + i1 * s_s1 + i2 * s_s2)[:, None], row_ok, HALF,
                        INTERLEAVED, BLOCK_ROWS, BLOCK_HALF)
    if BACKWARD:
        out1 = x1 * c1 + x2 * s2
        out2 = x2 * c2 - x1 * s1
    else:
        out1 = x1 * c1 - x2 * s1
        out2 = x2 * c2 + x1 * s2
    dtype = out_ptr.dtype.element_ty
    _store_pair(out_ptr + (i0 * o_s0 + i1 * o_s1 + i2 * o_s2)[:, None], out1.to(dtype), out2.to(dtype),
                row_ok, HALF, INTERLEAVED, BLOCK_ROWS, BLOCK_HALF)


# Chosen by benchmarks/rope.py --sweep (docs/design.md, "Block sizes").
BLOCKS = dict(block_elements=4096, num_warps=4)


def _as_4d(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """t broadcast to shape (a view: repeated dims get stride 0), with leading size-1 dims up to 4."""
    t = t.broadcast_to(shape)
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False,
                out_strides: tuple | None = None, interleaved: bool = False, **blocks) -> torch.Tensor:
    """rope_ref(x, cos, sin, interleaved), or rope_backward_ref(x, cos, sin, interleaved) with
    backward=True (x is then the gradient), for x of 2 to 4 dims with a contiguous last dim of even size D, and tables whose
    last dim is D, broadcastable to x. The output has x's shape, and out_strides (a dense layout of
    that shape), or else x's strides where x is dense, or else contiguous ones."""
    if x.dim() < 2 or x.dim() > 4:
        raise ValueError(f"rope_triton takes tensors of 2 to 4 dims, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if D % 2 or x.stride(-1) != 1 or cos.shape[-1] != D or sin.shape[-1] != D:
        raise ValueError(f"rope_triton needs an even, contiguous last dim shared by x, cos and sin, got "
                         f"x {tuple(x.shape)} strides {x.stride()}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if out_strides is None:
        out = torch.empty_like(x)
    else:
        out = torch.empty_strided(x.shape, out_strides, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    cos4, sin4 = (_as_4d(t if t.stride(-1) == 1 else t.contiguous(), x.shape) for t in (cos, sin))
    x4, out4 = _as_4d(x, x.shape), _as_4d(out, x.shape)
    rows = x4.shape[0] * x4.shape[1] * x4.shape[2]
    half = D // 2
    block_elements, num_warps = (blocks or BLOCKS)["block_elements"], (blocks or BLOCKS)["num_warps"]
    if block_elements & (block_elements - 1):
        raise ValueError(f"block_elements must be a power of two, got {block_elements}")
    block_half = triton.next_power_of_2(half)
    block_rows = max(1, block_elements // (2 * block_half))
    args = (x4, cos4, sin4, out4, rows, x4.shape[1], x4.shape[2], half,
            *x4.stride()[:3], *cos4.stride()[:3], *sin4.stride()[:3], *out4.stride()[:3])
    launch_kernel(rope_kernel, (triton.cdiv(rows, block_rows),), args, num_warps,
           BACKWARD=backward, INTERLEAVED=interleaved, BLOCK_ROWS=block_rows, BLOCK_HALF=block_half)
    return out
