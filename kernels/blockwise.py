"""Saturating cast to float8 with one dynamic scale per tile (blockwise scaling, DeepSeek-V3's recipe).

Reference: `naive.quantize_blockwise_ref` (same results bit for bit on the GPU).

One kernel, `block_kernel`, one read of x from memory. Each program owns one BLOCK_M x BLOCK_N
tile (128 x 128, but for the row strips alone, BLOCK_M rows, and the column strips alone, BLOCK_N
columns) and writes what the caller asked for from it:
- activations and gradients (SQUARE off): the row-major data with one scale per 1 x 128 strip
  of a row, and the column-major data with one scale per 128 x 1 strip of a column. A tile of
  128 rows holds whole strips of both kinds, so both layouts, with their scales along different
  axes, come from one program: it casts the rows in row slices, then loads the tile again in
  transposed column slices, which the row slices have just brought into L2 (the rowwise recipe
  reads x twice from memory for its two layouts); with the word store (below), in 64-row and
  64-column slices, two slices of a kind are loaded before either is stored (LOADS_AHEAD,
  `_both_loads_ahead`: Triton keeps a load behind any earlier store, so slice by slice each slice
  waits out a full memory latency);
- weights (SQUARE on): one scale per 128 x 128 tile, the data row-major and/or column-major;
- the column strips alone (a layer's backward casting a saved x): `_col_strips`, slices of the
  tile loaded as laid out and stored transposed, with 64-bit arithmetic only in the tile's base
  pointers and no masks when the shape is a multiple of the tile (the both-layouts path's slices
  did not gain from either: docs/benchmarks.md, "Blockwise scaling");
- where M is a multiple of 4, the column strips of either cast are stored four rows' bytes to a
  32-bit word (`_packed_col_slice`; on the GPU two conversions and a move of inline PTX per word,
  `_float8_word`), so the transpose moves words, not single bytes, through shared memory
  (PACKED_COLUMNS; packed=False stores bytes); where the tiles are not whole compiled without M's
  divisibility (`block_kernel_m_unaligned`).

Scales are written straight into the layouts torch._scaled_mm takes (docs/design.md,
"Blockwise scaling"); `quantize_blocks` in kernels/__init__.py documents them.
"""

import torch
import triton
import triton.language as tl

from .amax import cdiv, magnitude_bits
from .naive import BLOCK
from .rowwise import _cast_tile, _check, _empty_scale, _format
from .launch import launch_kernel
from .scale import INTERPRETING, INTERPRETING_C, scale_from_amax


@triton.jit
def _load(x_ptr, rows, cols, M, N, stride_m, stride_n):
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_n
    return tl.load(x_ptr + offsets, mask=mask, other=0.0), mask


@triton.jit
def _tile_slice(x_tile, lr, lc, m0, n0, M, N, stride_m, stride_n, EVEN: tl.constexpr):
    """(x at rows m0 + lr, columns n0 + lc, loaded from the tile's base pointer with int32 offsets;
    its mask). EVEN: the tile is whole, the load takes no mask (nor, through `_store`, the stores)."""
    mask = (m0 + lr < M)[:, None] & (n0 + lc < N)[None, :]
    offsets = lr[:, None] * stride_m + lc[None, :] * stride_n
    if EVEN:
        x = tl.load(x_tile + offsets)
    else:
        x = tl.load(x_tile + offsets, mask=mask, other=0.0)
    return x, mask


@triton.jit
def _store(ptr, value, mask, EVEN: tl.constexpr):
    """tl.store, masked unless EVEN (the tile is whole)."""
    if EVEN:
        tl.store(ptr, value)
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _float8_word(y0, y1, y2, y3, out_ty: tl.constexpr):
    """Four fp32 values (each already scaled) cast to float8 with saturation and packed into one
    32-bit word, y_k in byte k: two `cvt.rn.satfinite` of value pairs and one move on the GPU
    (Triton's own cast and byte packing took about four times the instructions); the same bits
    as casting each (`saturate_to_float8`) and packing. GPU only: the interpreter runs no PTX."""
    if out_ty == tl.float8e5:
        asm: tl.constexpr = ("{ .reg .b16 lo, hi; cvt.rn.satfinite.e5m2x2.f32 lo, $2, $1; "
                             "cvt.rn.satfinite.e5m2x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }")
    else:
        asm: tl.constexpr = ("{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; "
                             "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }")
    return tl.inline_asm_elementwise(asm, "=r,r,r,r,r", [y0, y1, y2, y3], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _float8_byte(x, multiplier, out_ty: tl.constexpr, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr,
                 MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """x cast with multiplier (`_cast_tile`), each float8 byte as a uint32 (for `_float8_word`'s
    Triton twin, where the interpreter runs)."""
    q = _cast_tile(x, multiplier, out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
    return q.to(tl.uint8, bitcast=True).to(tl.uint32)


@triton.jit
def _in_runs(lc, VEC: tl.constexpr):
    """The same columns lc, contiguous only in runs of VEC as far as Triton can tell: loads through
    them take VEC columns at a time (16 bytes, Triton's widest, where VEC is that wide or wider).
    Fewer columns per thread mean fewer of the column scales' divisions per thread (each thread
    computes the scales of the columns it holds), at more loads."""
    return (lc // VEC) * VEC + lc % VEC


@triton.jit
def _packed_col_load(x_tile, lc, m0, n0, M, N, stride_m, stride_n, BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """(x_0, x_1, x_2, x_3, mask) of `_packed_col_slice`: the tile's columns lc (`_in_runs`), rows
    4 i + k in x_k."""
    i = tl.arange(0, BLOCK_M // 4)
    x0, mask = _tile_slice(x_tile, 4 * i, lc, m0, n0, M, N, stride_m, stride_n, EVEN)
    x1, _ = _tile_slice(x_tile, 4 * i + 1, lc, m0, n0, M, N, stride_m, stride_n, EVEN)
    x2, _ = _tile_slice(x_tile, 4 * i + 2, lc, m0, n0, M, N, stride_m, stride_n, EVEN)
    x3, _ = _tile_slice(x_tile, 4 * i + 3, lc, m0, n0, M, N, stride_m, stride_n, EVEN)
    return x0, x1, x2, x3, mask


@triton.jit
def _packed_col_store(x0, x1, x2, x3, mask, col32_tile, scale_row, lc, n0, M, N, out_ty: tl.constexpr,
                      FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                      MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK_M: tl.constexpr,
                      EVEN: tl.constexpr):
    """Cast and store what `_packed_col_load` loaded at the columns lc (see `_packed_col_slice`)."""
    i = tl.arange(0, BLOCK_M // 4)
    bits = tl.maximum(tl.maximum(magnitude_bits(x0), magnitude_bits(x1)),
                      tl.maximum(magnitude_bits(x2), magnitude_bits(x3)))
    multiplier, scale = scale_from_amax(tl.max(bits, 0).to(tl.float32, bitcast=True), FP8_MAX, EPS, POWER_OF_2)
    m = multiplier[None, :]
    if EXACT_ROUND or INTERPRETING_C:
        words = (_float8_byte(x0, m, out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
                 | _float8_byte(x1, m, out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND) << 8
                 | _float8_byte(x2, m, out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND) << 16
                 | _float8_byte(x3, m, out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND) << 24)
        words = words.to(tl.int32, bitcast=True)
    else:
        words = _float8_word(x0.to(tl.float32) * m, x1.to(tl.float32) * m, x2.to(tl.float32) * m,
                             x3.to(tl.float32) * m, out_ty)
    _store(scale_row + lc, scale, n0 + lc < N, EVEN)
    _store(col32_tile + lc[None, :] * (M // 4) + i[:, None], words, mask, EVEN)


@triton.jit
def _packed_col_slice(x_tile, col32_tile, scale_row, lc, m0, n0, M, N, stride_m, stride_n, out_ty: tl.constexpr,
                      FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                      MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK_M: tl.constexpr,
                      EVEN: tl.constexpr, VEC: tl.constexpr):
    """The 128 x 1 column strips of the tile's columns lc, loaded as four slices x_k of rows 4 i + k:
    each column's rows 4 i .. 4 i + 3 are cast and packed into one 32-bit word, row 4 i + k in byte k
    (the column-major bytes' little-endian order; on the GPU by `_float8_word`), then stored
    transposed: the layout change moves 32-bit words through shared memory instead of single bytes.
    col32_tile: the tile's column-major data as int32 words ([N, M / 4], M a multiple of 4). Offsets
    inside the tile int32; VEC columns per load (`_in_runs`)."""
    lc = _in_runs(lc, VEC)
    x0, x1, x2, x3, mask = _packed_col_load(x_tile, lc, m0, n0, M, N, stride_m, stride_n, BLOCK_M, EVEN)
    _packed_col_store(x0, x1, x2, x3, mask, col32_tile, scale_row, lc, n0, M, N, out_ty, FP8_MAX, EPS, POWER_OF_2,
                      MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND, BLOCK_M, EVEN)


@triton.jit
def _row_slice_store(x, mask, row_slice, row_scale_ptr, rows, M, N, out_ty: tl.constexpr, FP8_MAX: tl.constexpr,
                     EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                     MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, EVEN: tl.constexpr):
    """The 1 x 128 row strips of a loaded row slice x (the rows `rows`, 128 columns): scales stored
    at row_scale_ptr + rows, the data at row_slice + local row * N + local column (row_slice: the
    slice's first row-major element; offsets int32)."""
    lr = tl.arange(0, x.shape[0])
    lc = tl.arange(0, x.shape[1])
    multiplier, scale = scale_from_amax(tl.max(magnitude_bits(x), 1).to(tl.float32, bitcast=True),
                                        FP8_MAX, EPS, POWER_OF_2)
    _store(row_scale_ptr + rows, scale, rows < M, EVEN)
    q = _cast_tile(x, multiplier[:, None], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
    _store(row_slice + lr[:, None] * N + lc[None, :], q, mask, EVEN)


@triton.jit
def _both_loads_ahead(x_ptr, row_ptr, row_scale_ptr, col32_ptr, col_scale_ptr, M, N, stride_m, stride_n,
                      out_ty: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr,
                      MANT_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, VEC: tl.constexpr,
                      COLUMNS_FIRST: tl.constexpr):
    """Both layouts of one BLOCK_M x BLOCK_N tile with the word store, in two row slices and two
    column slices as the sliced path, loaded two at a time: both row slices, then both cast and
    stored; both column slices, then both cast and stored. (Triton keeps a load after a store it
    cannot tell apart from it, so in the sliced path each slice waits a full memory latency behind
    the last: four waits a tile; here two.) Offsets inside the tile int32. COLUMNS_FIRST: the grid is
    (column tiles, row tiles), so that consecutive programs take the tiles along a row of tiles."""
    if COLUMNS_FIRST:
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    else:
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    x_tile = x_ptr + m0.to(tl.int64) * stride_m + n0.to(tl.int64) * stride_n
    row_tile = row_ptr + m0.to(tl.int64) * N + n0
    col32_tile = col32_ptr + n0.to(tl.int64) * (M // 4) + m0 // 4
    scale_row = col_scale_ptr + pid_m.to(tl.int64) * N + n0
    half_m: tl.constexpr = BLOCK_M // 2
    half_n: tl.constexpr = BLOCK_N // 2
    lr = tl.arange(0, half_m)
    lc = tl.arange(0, BLOCK_N)
    top, top_mask = _tile_slice(x_tile, lr, lc, m0, n0, M, N, stride_m, stride_n, EVEN)
    bottom, bottom_mask = _tile_slice(x_tile, half_m + lr, lc, m0, n0, M, N, stride_m, stride_n, EVEN)
    _row_slice_store(top, top_mask, row_tile, row_scale_ptr + pid_n * M, m0 + lr, M, N, out_ty, FP8_MAX, EPS,
                     POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND, EVEN)
    _row_slice_store(bottom, bottom_mask, row_tile + half_m * N, row_scale_ptr + pid_n * M, m0 + half_m + lr, M,
                     N, out_ty, FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND, EVEN)
    lc_left = _in_runs(tl.arange(0, half_n), VEC)
    lc_right = _in_runs(half_n + tl.arange(0, half_n), VEC)
    left = _packed_col_load(x_tile, lc_left, m0, n0, M, N, stride_m, stride_n, BLOCK_M, EVEN)
    right = _packed_col_load(x_tile, lc_right, m0, n0, M, N, stride_m, stride_n, BLOCK_M, EVEN)
    _packed_col_store(left[0], left[1], left[2], left[3], left[4], col32_tile, scale_row, lc_left, n0, M, N, out_ty,
                      FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND, BLOCK_M, EVEN)
    _packed_col_store(right[0], right[1], right[2], right[3], right[4], col32_tile, scale_row, lc_right, n0, M, N,
                      out_ty, FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND, BLOCK_M, EVEN)


@triton.jit
def _col_strips(x_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n, out_ty: tl.constexpr,
                FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, EVEN: tl.constexpr, PACKED: tl.constexpr,
                COL_VEC: tl.constexpr):
    """The 128 x 1 column strips of one BLOCK_M x BLOCK_N tile, in SUB_N-column slices loaded as laid
    out, each column's scale along axis 0, the data stored column-major (PACKED: col_ptr is its
    int32 words, `_packed_col_slice`). Offsets inside the tile are int32 (the caller checks that
    they fit), the tile's base pointers int64; EVEN: the tile is whole."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    x_tile = x_ptr + m0.to(tl.int64) * stride_m + n0.to(tl.int64) * stride_n
    scale_row = col_scale_ptr + pid_m.to(tl.int64) * N + n0
    if PACKED:
        col32_tile = col_ptr + n0.to(tl.int64) * (M // 4) + m0 // 4
        for j in tl.static_range(BLOCK_N // SUB_N):
            _packed_col_slice(x_tile, col32_tile, scale_row, j * SUB_N + tl.arange(0, SUB_N), m0, n0, M, N,
                              stride_m, stride_n, out_ty, FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP,
                              EXACT_ROUND, BLOCK_M, EVEN, COL_VEC)
    else:
        col_tile = col_ptr + n0.to(tl.int64) * M + m0
        lr = tl.arange(0, BLOCK_M)
        for j in tl.static_range(BLOCK_N // SUB_N):
            lc = j * SUB_N + tl.arange(0, SUB_N)
            x, mask = _tile_slice(x_tile, lr, lc, m0, n0, M, N, stride_m, stride_n, EVEN)
            multiplier, scale = scale_from_amax(tl.max(magnitude_bits(x), 0).to(tl.float32, bitcast=True),
                                                FP8_MAX, EPS, POWER_OF_2)
            q = _cast_tile(x, multiplier[None, :], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
            _store(scale_row + lc, scale, n0 + lc < N, EVEN)
            _store(col_tile + lc[None, :] * M + lr[:, None], q.to(tl.uint8, bitcast=True), mask, EVEN)


@triton.jit
def block_kernel(
    x_ptr, row_ptr, row_scale_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n,
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
    MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, SQUARE: tl.constexpr,
    WRITE_ROW: tl.constexpr, WRITE_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUB_M: tl.constexpr, SUB_N: tl.constexpr, EVEN: tl.constexpr, OFFSETS_32: tl.constexpr,
    PACKED: tl.constexpr, COL_VEC: tl.constexpr, LOADS_AHEAD: tl.constexpr, COLUMNS_FIRST: tl.constexpr,
):
    """row_ptr is float8 (when WRITE_ROW is off, any float8 buffer of the format: it gives the type);
    col_ptr is the column-major buffer [N, M] row-major, as bytes (uint8) or, PACKED, as int32 words.
    For the column strips (strips only): OFFSETS_32, offsets inside a tile fit int32 (`_col_strips`
    casts them; otherwise column slices loaded transposed with 64-bit offsets); EVEN, M and N are
    multiples of the tile; PACKED (needs OFFSETS_32 and M a multiple of 4), four rows' bytes stored
    as one word (`_packed_col_slice`, which loads COL_VEC columns at a time); LOADS_AHEAD (both
    layouts with the word store, two row and two column slices), `_both_loads_ahead`; COLUMNS_FIRST
    (LOADS_AHEAD only), its grid's axes swapped."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ty = row_ptr.dtype.element_ty
    if SQUARE:  # one scale per tile; row scales [Mb, Nb] row-major, column scales its transpose's memory
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        x, mask = _load(x_ptr, rows, cols, M, N, stride_m, stride_n)
        amax = tl.max(tl.max(magnitude_bits(x), 1), 0).to(tl.float32, bitcast=True)
        multiplier, scale = scale_from_amax(amax, FP8_MAX, EPS, POWER_OF_2)
        q = _cast_tile(x, multiplier, out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
        if WRITE_ROW:
            tl.store(row_scale_ptr + pid_m * tl.num_programs(1) + pid_n, scale)
            tl.store(row_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], q, mask=mask)
        if WRITE_COL:
            tl.store(col_scale_ptr + pid_n * tl.num_programs(0) + pid_m, scale)
            tl.store(col_ptr + rows[:, None] + cols[None, :].to(tl.int64) * M, q.to(tl.uint8, bitcast=True), mask=mask)
    else:
        # Strips: a row's scale over the tile's 128 columns (row scales [M, Nb] stored as their
        # transpose [Nb, M]), a column's over its 128 rows ([Mb, N] row-major). Each kind is cast in
        # slices that hold whole strips, so no slice waits on another: SUB_M-row slices for the rows,
        # then SUB_N-column slices of the tile for the columns (after the row slices, those loads
        # hit L2). Small slices keep registers low and more programs resident.
        if LOADS_AHEAD:  # both layouts, word store, two slices of each kind
            _both_loads_ahead(x_ptr, row_ptr, row_scale_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n, out_ty,
                              FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND, BLOCK_M, BLOCK_N,
                              EVEN, COL_VEC, COLUMNS_FIRST)
        else:
            if WRITE_ROW:
                for i in tl.static_range(BLOCK_M // SUB_M):
                    rows = pid_m * BLOCK_M + i * SUB_M + tl.arange(0, SUB_M)
                    x, mask = _load(x_ptr, rows, cols, M, N, stride_m, stride_n)
                    multiplier, scale = scale_from_amax(tl.max(magnitude_bits(x), 1).to(tl.float32, bitcast=True),
                                                        FP8_MAX, EPS, POWER_OF_2)
                    tl.store(row_scale_ptr + pid_n * M + rows, scale, mask=rows < M)
                    q = _cast_tile(x, multiplier[:, None], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
                    tl.store(row_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], q, mask=mask)
            if WRITE_COL and OFFSETS_32:
                _col_strips(x_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n, out_ty, FP8_MAX, EPS, POWER_OF_2,
                            MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND, BLOCK_M, BLOCK_N, SUB_N, EVEN, PACKED, COL_VEC)
            elif WRITE_COL:
                rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
                for j in tl.static_range(BLOCK_N // SUB_N):
                    c = pid_n * BLOCK_N + j * SUB_N + tl.arange(0, SUB_N)
                    xt, mask = _load(x_ptr, c, rows, N, M, stride_n, stride_m)  # [SUB_N, BLOCK_M]: x's transpose
                    multiplier, scale = scale_from_amax(tl.max(magnitude_bits(xt), 1).to(tl.float32, bitcast=True),
                                                        FP8_MAX, EPS, POWER_OF_2)
                    tl.store(col_scale_ptr + pid_m * N + c, scale, mask=c < N)
                    q = _cast_tile(xt, multiplier[:, None], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
                    tl.store(col_ptr + c[:, None].to(tl.int64) * M + rows[None, :], q.to(tl.uint8, bitcast=True),
                             mask=mask)


# block_kernel compiled as though M's divisibility by 16 were unknown (for the masked word store, below).
block_kernel_m_unaligned = triton.jit(do_not_specialize_on_alignment=["M"])(block_kernel.fn)

# Slices of a strips tile (rows per row slice, columns per column slice), from the H200 runs of the
# both-layouts cast and of the column strips alone (docs/benchmarks.md, "Blockwise scaling").
SUB_M = SUB_N = 64
COL_STRIPS_SUB_N = 128
# Columns per program of the column strips alone (each program a 128 x COL_STRIPS_BLOCK_N tile, two
# warps where the tile is 64 columns or fewer; H200 sweep: docs/benchmarks.md, "Blockwise scaling").
COL_STRIPS_BLOCK_N = 64
# Whether the column strips are stored four rows' bytes to a 32-bit word by default where that
# applies (`_packed_col_slice`): on, the both-layouts cast 5-8 % faster on the H200 and 2.6-4 % on
# the H100 than the byte store, and since the word packing moved to inline PTX 6-7 % on the H100
# (docs/benchmarks.md, "Blockwise scaling"); packed=False stores bytes.
PACKED_COLUMNS = True
# Columns per load in the word store's column slices (`_packed_col_slice`): 4 where Triton's widest
# load would take 8 bf16 columns: half the column scales' divisions per thread; on an H100 the
# both-layouts cast 2-3 % faster than with 8, and 2 about 1 % faster again (slice by slice), but 2
# stored wrong bytes for float32 inputs in whole tiles on the GPU (refused for them); with the
# slices loaded ahead (the default) 2 was not timed (docs/benchmarks.md, "Blockwise scaling").
COL_VEC = 4
# Whether the both-layouts cast with the word store loads its slices two at a time, ahead of the
# stores (`_both_loads_ahead`; its 64-row and 64-column slices only): on, on an H100 that cast 4-7 %
# faster than slice by slice (85-89 % of copy against 81-84 %) though it holds 168 registers per
# thread against 118 (three programs per SM against four); docs/benchmarks.md, "Blockwise scaling".
LOADS_AHEAD = True
# How that cast (loads ahead) is launched by default: its programs numbered along a row of tiles first
# (the grid's axes swapped, where M has at most 65,535 row tiles) and its registers capped at 128 per
# thread (four programs per SM against three, no spill): on an H100 together 0.986-0.989x the
# time of the launch before (programs down a column of tiles first, ptxas's 168 registers), no
# benchmark shape slower; each alone 0.993x and 1.016x (docs/benchmarks.md, "Blockwise scaling").
COLUMNS_FIRST = True
LOADS_AHEAD_MAX_REGISTERS = 128
# Programs a CUDA grid takes along its second axis (the first takes 2**31 - 1).
GRID_AXIS_1_MAX = 65535
# Where the tile is not whole (masked stores) the word store launches `block_kernel_m_unaligned`,
# the same kernel compiled without M's divisibility by 16: compiled with it, the masked word store
# mis-stored one row in eight of the column-major data on the H200 and the H100 wherever M was a
# multiple of 16 (bf16 at N = 300 and 4100; fp32 with the column strips alone at N = 272 and 4112),
# while it was exact where M was not (132 x 300) and wherever the tile was whole. Compiled for
# sm_90, the failing cases convert the words into a store layout of four words a thread through
# ldmatrix .b16, the exact 132 x 300 into one word a thread (docs/benchmarks.md, "Blockwise scaling").

# Launch defaults from the H200 sweep of benchmarks/kernels_blockwise.py (docs/benchmarks.md, "Blockwise
# scaling"): 1 x 128 row strips alone in programs of 32 rows; warps per kind of cast.
ROW_STRIP_BLOCK_M = 32


def _default_warps(square: bool, write_row: bool, write_col: bool, block_n: int = BLOCK) -> int:
    if write_col and not write_row and not square and block_n <= 64:
        return 2  # the column strips alone in narrow programs
    if not square:
        return 4  # row strips alone (32-row programs), column strips or both kinds (128-column tiles)
    return 16 if write_col and not write_row else 4 if write_row and not write_col else 8


def block_cast_triton(
    x: torch.Tensor, float8_dtype: torch.dtype, power_of_2: bool = False, *, square: bool = False,
    write_row: bool = True, write_col: bool = False, exact_round: bool = INTERPRETING,
    block_m: int | None = None, block_n: int | None = None, sub_m: int | None = None, sub_n: int | None = None,
    num_warps: int | None = None, packed: bool | None = None, col_vec: int | None = None,
    loads_ahead: bool | None = None, max_registers: int | None = None, columns_first: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(row | None, row_scale | None, col | None, col_scale | None) of a 2-D x [M, N]; see
    `kernels.quantize_blocks` for the layouts. block_m: rows per program when only the 1 x 128
    row strips are written (any power of two; ROW_STRIP_BLOCK_M by default; 128 otherwise, where
    tiles are scale blocks). block_n: columns per program for the column strips alone (a power of
    two <= 128; COL_STRIPS_BLOCK_N by default; 128 otherwise). Each option given where it does
    not apply is a ValueError.
    Strips only: sub_m rows per row slice of a program's tile (a power of two <= its rows; SUB_M
    by default), sub_n columns per column slice (a power of two <= 128; SUB_N by default, and
    COL_STRIPS_SUB_N for the column strips alone where `_col_strips` casts them).
    packed: the column strips' bytes stored four rows to a 32-bit word (`_packed_col_slice`); by
    default (None) wherever it applies (PACKED_COLUMNS on, strips written column-major, M a multiple
    of 4, offsets inside a tile within int32); True where it does not apply is a ValueError.
    col_vec: columns per load of the word store's column slices (2, 4 or 8; COL_VEC by default);
    given where the word store does not run, a ValueError. loads_ahead: the both-layouts cast with
    the word store and 64-row, 64-column slices loads its slices two at a time, ahead of their
    stores (`_both_loads_ahead`; LOADS_AHEAD by default); True where that cast does not run, a
    ValueError. columns_first: that cast (loads_ahead) numbers its programs along a row of tiles
    first (the grid's axes swapped; M up to 65,535 row tiles); by default (None) COLUMNS_FIRST
    where it runs and the row tiles fit; True where it does not run or they do not fit, a ValueError.
    max_registers: registers per thread the compiled kernel may use (Triton's maxnreg option, 16
    to 255, 255 leaving ptxas its choice): fewer registers, more programs resident per SM, where
    ptxas fits the kernel without spilling (benchmarks/tools/sm90_compile.py shows both); by
    default (None) LOADS_AHEAD_MAX_REGISTERS where the slices are loaded ahead, else ptxas's choice.
    The grid's second axis holds the column tiles (the row tiles under columns_first): more than
    GRID_AXIS_1_MAX of them, a ValueError."""
    _check(x, float8_dtype, "blockwise")
    if not (write_row or write_col):
        raise ValueError("block_cast_triton: nothing to do (write_row and write_col both off)")
    if max_registers is not None and (isinstance(max_registers, bool) or not isinstance(max_registers, int)
                                      or not 16 <= max_registers <= 255):
        raise ValueError(f"block_cast_triton: max_registers must be an int from 16 to 255 (ptxas's range), "
                         f"got {max_registers!r}")
    M, N = x.shape
    mb, nb = cdiv(M, BLOCK), cdiv(N, BLOCK)
    device = x.device
    f32 = dict(dtype=torch.float32, device=device)
    row = torch.empty((M, N), dtype=float8_dtype, device=device) if write_row else None
    col_t = torch.empty((N, M), dtype=float8_dtype, device=device) if write_col else None
    if square:
        row_scale = torch.empty((mb, nb), **f32) if write_row else None
        col_scale = torch.empty((nb, mb), **f32).t() if write_col else None
    else:
        row_scale = torch.empty((nb, M), **f32).t() if write_row else None
        col_scale = torch.empty((mb, N), **f32) if write_col else None
    bm = BLOCK if square or write_col else (block_m or ROW_STRIP_BLOCK_M)
    col_alone = write_col and not write_row and not square
    for name, value, applies, where in (
            ("block_m", block_m, not (square or write_col), "the row strips alone (write_col=False, square=False); "
             "other casts take whole 128-row tiles"),
            ("block_n", block_n, col_alone, "the column strips alone (write_row=False, write_col=True, "
             "square=False); other casts take whole 128-column tiles"),
            ("sub_m", sub_m, not square, "the strips (square=False); 128 x 128 tiles are cast whole"),
            ("sub_n", sub_n, not square, "the strips (square=False); 128 x 128 tiles are cast whole")):
        if value is not None and not applies:  # an option that would change nothing: a sweep would time a no-op
            raise ValueError(f"block_cast_triton: {name} applies to {where}")
    bn = (block_n or COL_STRIPS_BLOCK_N) if col_alone else BLOCK
    for name, value, bound in (("block_m", block_m, None), ("block_n", block_n, BLOCK), ("sub_m", sub_m, bm),
                               ("sub_n", sub_n, bn)):
        if value is not None and (value < 1 or value & (value - 1) or bound is not None and value > bound):
            raise ValueError(f"block_cast_triton: {name} must be a power of two" + (
                f" <= {bound} here" if bound is not None else "") + f", got {value}")
    tiles_m, tiles_n = cdiv(M, bm), cdiv(N, bn)  # the programs' tiles
    # Offsets inside one tile (rows x stride_m + columns x stride_n; the column-major store's
    # columns x M + rows) fit int32 where this holds: `_col_strips` then adds 64 bits only per tile.
    fits_32 = BLOCK * (x.stride(0) + x.stride(1) + M) < 2 ** 31
    why_not = ("square (128 x 128) tiles have no column strips" if square else
               "the column strips are not written (write_col=False)" if not write_col else
               f"M = {M} is not a multiple of 4" if M % 4 else
               "offsets inside a 128 x 128 tile exceed int32" if not fits_32 else None)
    if packed and why_not:
        raise ValueError(f"block_cast_triton: packed=True does not apply here: {why_not}")
    packed = why_not is None and (PACKED_COLUMNS if packed is None else packed)
    if col_vec is not None and not packed:
        raise ValueError("block_cast_triton: col_vec applies to the word store of the column strips (packed), "
                         "which does not run here")
    if col_vec is not None and col_vec not in (2, 4, 8):
        raise ValueError(f"block_cast_triton: col_vec must be 2, 4 or 8, got {col_vec}")
    if col_vec == 2 and x.dtype == torch.float32:  # GPU-tested wrong: docs/benchmarks.md, "Blockwise scaling"
        raise ValueError("block_cast_triton: col_vec=2 with a float32 input stored wrong column-major bytes on an "
                         "H100 (the both-layouts cast, whole 128 x 128 tiles), so it is refused for float32; use "
                         "col_vec=4 (the default) or 8")
    ahead_applies = packed and write_row and (sub_m or SUB_M) == BLOCK // 2 and (sub_n or SUB_N) == BLOCK // 2
    if loads_ahead and not ahead_applies:
        raise ValueError("block_cast_triton: loads_ahead applies to the both-layouts cast with the word store "
                         "(packed) in 64-row and 64-column slices, which does not run here")
    loads_ahead = ahead_applies and (LOADS_AHEAD if loads_ahead is None else loads_ahead)
    if columns_first is None:
        columns_first = COLUMNS_FIRST and loads_ahead and tiles_m <= GRID_AXIS_1_MAX
    if max_registers is None and loads_ahead:
        max_registers = LOADS_AHEAD_MAX_REGISTERS
    if columns_first and not loads_ahead:
        raise ValueError("block_cast_triton: columns_first applies to the both-layouts cast with its slices loaded "
                         "ahead (loads_ahead), which does not run here")
    if columns_first and tiles_m > GRID_AXIS_1_MAX:
        raise ValueError(f"block_cast_triton: columns_first puts the {tiles_m} row tiles on the grid's second "
                         f"axis, which takes at most {GRID_AXIS_1_MAX:,}; use columns_first=False")
    if M and N:
        if not columns_first and tiles_n > GRID_AXIS_1_MAX:
            raise ValueError(f"block_cast_triton: N = {N} makes {tiles_n} column tiles of {bn} on the grid's second "
                             f"axis, which takes at most {GRID_AXIS_1_MAX:,}; cast x in column slices of at most "
                             f"{GRID_AXIS_1_MAX * bn:,} columns at multiples of {BLOCK} (no scale spans them)")
        # The column strips through `_col_strips` (alone, or packed after the row strips); other
        # column strips in slices loaded transposed with 64-bit offsets. Casts of 128 x 128 tiles
        # take none of the flags (one compiled kernel each).
        offsets_32 = fits_32 and (col_alone or packed)
        sub = bm if square else min(sub_m or SUB_M, bm)
        even = offsets_32 and M % BLOCK == 0 and N % bn == 0
        sub_n = BLOCK if square else sub_n or min(COL_STRIPS_SUB_N if col_alone and offsets_32 else SUB_N, bn)
        num_warps = num_warps or _default_warps(square, write_row, write_col, bn)
        # The column-major data is stored as bytes (a uint8 view), as in cast.py, or as words.
        col_bytes = None if col_t is None else col_t.view(torch.int32 if packed else torch.uint8)
        kernel = block_kernel_m_unaligned if packed and not even else block_kernel
        grid = (tiles_n, tiles_m) if columns_first else (tiles_m, tiles_n)
        launch_kernel(kernel, grid,
                      (x, row if row is not None else col_t, row_scale, col_bytes, col_scale, M, N, x.stride(0),
                       x.stride(1)), num_warps, maxnreg=max_registers,
                      **_format(float8_dtype, power_of_2, exact_round, x), SQUARE=square,
                      WRITE_ROW=write_row, WRITE_COL=write_col, BLOCK_M=bm, BLOCK_N=bn, SUB_M=sub, SUB_N=sub_n,
                      EVEN=even, OFFSETS_32=offsets_32, PACKED=packed, COL_VEC=col_vec or COL_VEC,
                      LOADS_AHEAD=loads_ahead, COLUMNS_FIRST=columns_first)
    else:  # no elements: scales of empty tiles, where there are tiles
        for s in (row_scale, col_scale):
            if s is not None and s.numel():
                s.copy_(_empty_scale(float8_dtype, power_of_2, device))
    return row, row_scale, None if col_t is None else col_t.t(), col_scale
