"""Experiment: variants of the blockwise both-layouts cast (1 x 128 row strips and 128 x 1 column
strips of one x), each checked bit for bit against block_cast_triton and timed against the copy
bandwidth of the same run (docs/benchmarks.md, "Blockwise scaling"; results in
docs/data/kernels_blockwise_both_variants.txt).

    python benchmarks/tools/blockwise_both_variants.py OUT.jsonl [NAME_PART ...]   (only variants whose names contain one)
    TRITON_INTERPRET=1 python benchmarks/tools/blockwise_both_variants.py --exact [NAME_PART ...]   (no GPU: bit for bit)
    python benchmarks/tools/blockwise_both_variants.py --sm90 [NAME_PART ...]     (no GPU: registers, shared memory)

`col_kernel` / `run_col`: variants of the column strips alone (the layout a layer's backward casts
x into when forward kept no float8 copy).

TRANS picks the column path: 0 the tile's own layout stored transposed, 1 an explicit tl.trans of
the fp8 data, 2 tl.trans of x, 3 x loaded again transposed, 4 both paths in slices (RCH rows,
CHUNK columns, the columns loaded transposed; what kernels/blockwise.py now does), 5 the same with
the column slices loaded as laid out and their fp8 data stored transposed (as torchao's kernel for
the column strips does). CHUNK < 128 with TRANS < 4: column chunks cast
first, rows read again; `persistent` > 0: a persistent grid of that many programs per SM, tl.range
with STAGES. `lean_kernel`: 64-bit arithmetic only in each program's base pointers, no masks for
whole tiles, and the "amax from rows" order. `piped_kernel`: the "amax from rows" order with both
passes as tl.range loops over row slices, which Triton pipelines through shared memory (cp.async:
`--sm90` counts them), so bytes stay in flight without holding registers; its late column
reduction for both layouts was the kernel's `stages` path until an H200 sweep (at 06f3558) measured
it at 45-50 % of copy in its 8-warp configurations (34 % with 4 warps) against the sliced path's
60-62 % on 16384x4096 and 16384x14336, and it was removed. The column strips in programs of fewer
columns became the kernel's `block_n`: `run_kernel` times those through block_cast_triton itself.
`packed_kernel`: the column strips' bytes packed four rows to a 32-bit word before the transposed
store (no byte-wide shared-memory stores); the kernel's `packed=True`. `tma_kernel`: the column
strips' transpose stored through a tensor descriptor made on the host (Hopper's TMA, one bulk copy per slice,
clipped at the edges; M a multiple of 16), the bytes as they are or packed first (`tmapacked`).
`tma_all_kernel` (`tmaall`): x's slices loaded through descriptors too, and the row-major data
stored through one, every descriptor made on the host (no allocator, no per-program descriptor
setup): no masks and no per-element addresses (M and N multiples of 16); `tmaall persistent`: the same
tiles in a persistent grid, the tile loop pipelined by Triton (tl.range with num_stages).
The earlier runs' VARIANTS lists (recorded in the data file) were edits of the one below.
"""
import json
import sys

import torch
import triton
import triton.language as tl

from f8tensor.kernels.amax import cdiv, magnitude_bits
from f8tensor.kernels.blockwise import _load, block_cast_triton
from f8tensor.kernels.rowwise import _cast_tile, _format
from f8tensor.kernels.scale import INTERPRETING, scale_from_amax


@triton.jit
def _rows(x, r, cols, row_ptr, row_scale_ptr, pid_n, M, N, mask, FP8_MAX: tl.constexpr, EPS: tl.constexpr,
          POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """The 1 x 128 row strips of x [r, cols]: scales along axis 1, the data row-major."""
    rm, rs = scale_from_amax(tl.max(magnitude_bits(x), 1).to(tl.float32, bitcast=True), FP8_MAX, EPS, POWER_OF_2)
    tl.store(row_scale_ptr + pid_n * M + r, rs, mask=r < M)
    q = _cast_tile(x, rm[:, None], row_ptr.dtype.element_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
    tl.store(row_ptr + r[:, None].to(tl.int64) * N + cols[None, :], q, mask=mask)


@triton.jit
def _cols(x, rows, c, col_ptr, col_scale_ptr, pid_m, M, N, mask, out_ty: tl.constexpr, TRANS_DATA: tl.constexpr,
          FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
          MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """The 128 x 1 column strips of x [rows, c] as laid out: scales along axis 0, the data stored
    column-major through the store's layout (TRANS_DATA off) or tl.trans of the fp8 data (on)."""
    cm, cs = scale_from_amax(tl.max(magnitude_bits(x), 0).to(tl.float32, bitcast=True), FP8_MAX, EPS, POWER_OF_2)
    tl.store(col_scale_ptr + pid_m * N + c, cs, mask=c < N)
    q = _cast_tile(x, cm[None, :], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND).to(tl.uint8, bitcast=True)
    if TRANS_DATA:
        tl.store(col_ptr + c[:, None].to(tl.int64) * M + rows[None, :], tl.trans(q), mask=tl.trans(mask))
    else:
        tl.store(col_ptr + rows[:, None] + c[None, :].to(tl.int64) * M, q, mask=mask)


@triton.jit
def _cols_of_transpose(xt, rows, c, col_ptr, col_scale_ptr, pid_m, M, N, mask_t, out_ty: tl.constexpr,
                       FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                       MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """The same strips from x's transpose xt [c, rows]: scales along axis 1, the data stored as laid out."""
    cm, cs = scale_from_amax(tl.max(magnitude_bits(xt), 1).to(tl.float32, bitcast=True), FP8_MAX, EPS, POWER_OF_2)
    tl.store(col_scale_ptr + pid_m * N + c, cs, mask=c < N)
    q = _cast_tile(xt, cm[:, None], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
    tl.store(col_ptr + c[:, None].to(tl.int64) * M + rows[None, :], q.to(tl.uint8, bitcast=True), mask=mask_t)


@triton.jit
def _tile(x_ptr, row_ptr, row_scale_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n, pid_m, pid_n,
          FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
          MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
          TRANS: tl.constexpr, RCH: tl.constexpr):
    out_ty = row_ptr.dtype.element_ty
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    if TRANS >= 4:  # both paths in slices: RCH-row slices read from memory, then CHUNK-column slices
        # read again (L2): 4 loads them transposed, 5 as laid out, their fp8 data stored transposed
        cols = pid_n * BLOCK + tl.arange(0, BLOCK)
        for i in tl.static_range(BLOCK // RCH):
            r = pid_m * BLOCK + i * RCH + tl.arange(0, RCH)
            x, mask = _load(x_ptr, r, cols, M, N, stride_m, stride_n)
            _rows(x, r, cols, row_ptr, row_scale_ptr, pid_n, M, N, mask,
                  FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
        for j in tl.static_range(BLOCK // CHUNK):
            c = pid_n * BLOCK + j * CHUNK + tl.arange(0, CHUNK)
            if TRANS == 4:
                xt, mask = _load(x_ptr, c, rows, N, M, stride_n, stride_m)
                _cols_of_transpose(xt, rows, c, col_ptr, col_scale_ptr, pid_m, M, N, mask, out_ty,
                                   FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
            else:
                x, mask = _load(x_ptr, rows, c, M, N, stride_m, stride_n)
                _cols(x, rows, c, col_ptr, col_scale_ptr, pid_m, M, N, mask, out_ty, False,
                      FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
    elif CHUNK == BLOCK:
        cols = pid_n * BLOCK + tl.arange(0, BLOCK)
        x, mask = _load(x_ptr, rows, cols, M, N, stride_m, stride_n)
        _rows(x, rows, cols, row_ptr, row_scale_ptr, pid_n, M, N, mask,
              FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
        if TRANS >= 2:  # the column path on x's transpose: 2 = tl.trans in registers, 3 = loaded again
            if TRANS == 2:
                xt = tl.trans(x)
            else:
                xt, _ = _load(x_ptr, cols, rows, N, M, stride_n, stride_m)
            _cols_of_transpose(xt, rows, cols, col_ptr, col_scale_ptr, pid_m, M, N, tl.trans(mask), out_ty,
                               FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
        else:
            _cols(x, rows, cols, col_ptr, col_scale_ptr, pid_m, M, N, mask, out_ty, TRANS == 1,
                  FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
    else:
        # column chunks: each chunk's columns are whole (128 rows): cast and store them now; the rows'
        # amax accumulates, and the row cast reads the chunks again (L2).
        racc = tl.zeros([BLOCK], dtype=tl.int32)
        for c in tl.static_range(BLOCK // CHUNK):
            cols = pid_n * BLOCK + c * CHUNK + tl.arange(0, CHUNK)
            x, mask = _load(x_ptr, rows, cols, M, N, stride_m, stride_n)
            racc = tl.maximum(racc, tl.max(magnitude_bits(x), 1))
            _cols(x, rows, cols, col_ptr, col_scale_ptr, pid_m, M, N, mask, out_ty, TRANS == 1,
                  FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
        rm, rs = scale_from_amax(racc.to(tl.float32, bitcast=True), FP8_MAX, EPS, POWER_OF_2)
        tl.store(row_scale_ptr + pid_n * M + rows, rs, mask=rows < M)
        for c in tl.static_range(BLOCK // CHUNK):
            cols = pid_n * BLOCK + c * CHUNK + tl.arange(0, CHUNK)
            x, mask = _load(x_ptr, rows, cols, M, N, stride_m, stride_n)
            q = _cast_tile(x, rm[:, None], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
            tl.store(row_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], q, mask=mask)


@triton.jit
def grid_kernel(x_ptr, row_ptr, row_scale_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n,
                FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                TRANS: tl.constexpr, RCH: tl.constexpr):
    _tile(x_ptr, row_ptr, row_scale_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n,
          tl.program_id(0), tl.program_id(1), FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND,
          BLOCK, CHUNK, TRANS, RCH)


@triton.jit
def persistent_kernel(x_ptr, row_ptr, row_scale_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n, NB, TILES,
                      FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                      MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr,
                      CHUNK: tl.constexpr, TRANS: tl.constexpr, STAGES: tl.constexpr, RCH: tl.constexpr):
    for t in tl.range(tl.program_id(0), TILES, tl.num_programs(0), num_stages=STAGES):
        _tile(x_ptr, row_ptr, row_scale_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n,
              t // NB, t % NB, FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND,
              BLOCK, CHUNK, TRANS, RCH)


@triton.jit
def col_kernel(x_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n,
               FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
               MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
               ORIENT: tl.constexpr):
    """The 128 x 1 column strips alone, in CHUNK-column slices: ORIENT 0 loads the slice as laid out and
    stores it transposed, 1 the same with tl.trans of the fp8 data, 2 loads it transposed."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    for j in tl.static_range(BLOCK // CHUNK):
        c = pid_n * BLOCK + j * CHUNK + tl.arange(0, CHUNK)
        if ORIENT == 2:
            xt, mask = _load(x_ptr, c, rows, N, M, stride_n, stride_m)
            _cols_of_transpose(xt, rows, c, col_ptr, col_scale_ptr, pid_m, M, N, mask, tl.float8e4nv,
                               FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
        else:
            x, mask = _load(x_ptr, rows, c, M, N, stride_m, stride_n)
            _cols(x, rows, c, col_ptr, col_scale_ptr, pid_m, M, N, mask, tl.float8e4nv, ORIENT == 1,
                  FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)


def run_col(x, warps=4, chunk=64, orient=0, meta=None):
    """The column strips alone (e4m3): (col, col_scale) as block_cast_triton(write_row=False, write_col=True)."""
    M, N = x.shape
    mb, nb = cdiv(M, 128), cdiv(N, 128)
    col_t = torch.empty((N, M), dtype=torch.float8_e4m3fn, device=x.device)
    col_scale = torch.empty((mb, N), dtype=torch.float32, device=x.device)
    k = col_kernel[(mb, nb)](x, col_t.view(torch.uint8), col_scale, M, N, x.stride(0), x.stride(1),
                             **_format(torch.float8_e4m3fn, False, INTERPRETING, x), BLOCK=128, CHUNK=chunk,
                             ORIENT=orient, num_warps=warps)
    if meta is not None and hasattr(k, "n_regs"):
        meta.update(regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared)
    return None, None, col_t.t(), col_scale


def run(x, warps=4, chunk=128, trans=0, persistent=0, stages=1, meta=None, rch=None):
    rch = rch or chunk
    M, N = x.shape
    B = 128
    mb, nb = cdiv(M, B), cdiv(N, B)
    row = torch.empty((M, N), dtype=torch.float8_e4m3fn, device=x.device)
    col_t = torch.empty((N, M), dtype=torch.float8_e4m3fn, device=x.device)
    row_scale = torch.empty((nb, M), dtype=torch.float32, device=x.device).t()
    col_scale = torch.empty((mb, N), dtype=torch.float32, device=x.device)
    fmt = _format(torch.float8_e4m3fn, False, INTERPRETING, x)
    args = (x, row, row_scale, col_t.view(torch.uint8), col_scale, M, N, x.stride(0), x.stride(1))
    if persistent:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        persistent_kernel[(min(mb * nb, sms * persistent),)](*args, nb, mb * nb, **fmt, BLOCK=B, CHUNK=chunk,
                                                            TRANS=trans, STAGES=stages, RCH=rch, num_warps=warps)
    else:
        k = grid_kernel[(mb, nb)](*args, **fmt, BLOCK=B, CHUNK=chunk, TRANS=trans, RCH=rch, num_warps=warps)
        if meta is not None:
            meta.update(regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared)
    return row, row_scale, col_t.t(), col_scale


@triton.jit
def lean_kernel(x_ptr, row_ptr, row_scale_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n,
                FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr, RCH: tl.constexpr,
                CHUNK: tl.constexpr, EVEN: tl.constexpr, WRITE_ROW: tl.constexpr, ORIENT: tl.constexpr,
                AMAX_FROM_ROWS: tl.constexpr = False):
    """The strips cast (t4 slices; the column strips alone with WRITE_ROW off) with 64-bit arithmetic
    only in each program's base pointers: offsets inside a tile in int32 (the caller checks that
    128 * max(stride_m, M, N) fits), and no masks when M and N are multiples of 128 (EVEN).
    ORIENT 0 loads column slices transposed, 1 as laid out (stored transposed). AMAX_FROM_ROWS (with
    WRITE_ROW, CHUNK = BLOCK): the column amaxes come from the row slices' loads, so the column pass
    only casts, in the same row slices (CHUNK and ORIENT unused)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m0, n0 = pid_m * BLOCK, pid_n * BLOCK
    x_tile = x_ptr + m0.to(tl.int64) * stride_m + n0.to(tl.int64) * stride_n
    out_ty = row_ptr.dtype.element_ty
    lc = tl.arange(0, BLOCK)
    if WRITE_ROW:
        row_tile = row_ptr + m0.to(tl.int64) * N + n0
        for i in tl.static_range(BLOCK // RCH):
            lr = i * RCH + tl.arange(0, RCH)
            if EVEN:
                x = tl.load(x_tile + lr[:, None] * stride_m + lc[None, :] * stride_n)
            else:
                mask = (m0 + lr < M)[:, None] & (n0 + lc < N)[None, :]
                x = tl.load(x_tile + lr[:, None] * stride_m + lc[None, :] * stride_n, mask=mask, other=0.0)
            bits = magnitude_bits(x)
            if AMAX_FROM_ROWS:
                if i == 0:
                    cacc = tl.max(bits, 0)
                else:
                    cacc = tl.maximum(cacc, tl.max(bits, 0))
            rm, rs = scale_from_amax(tl.max(bits, 1).to(tl.float32, bitcast=True), FP8_MAX, EPS,
                                     POWER_OF_2)
            q = _cast_tile(x, rm[:, None], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
            if EVEN:
                tl.store(row_scale_ptr + pid_n.to(tl.int64) * M + m0 + lr, rs)
                tl.store(row_tile + lr[:, None] * N + lc[None, :], q)
            else:
                tl.store(row_scale_ptr + pid_n.to(tl.int64) * M + m0 + lr, rs, mask=m0 + lr < M)
                tl.store(row_tile + lr[:, None] * N + lc[None, :], q, mask=mask)
    col_tile = col_ptr + n0.to(tl.int64) * M + m0
    if AMAX_FROM_ROWS:  # the column pass in the same row slices, read again (L2), cast with known scales
        cm, cs = scale_from_amax(cacc.to(tl.float32, bitcast=True), FP8_MAX, EPS, POWER_OF_2)
        for i in tl.static_range(BLOCK // RCH):
            lr = i * RCH + tl.arange(0, RCH)
            offs = lr[:, None] * stride_m + lc[None, :] * stride_n
            if EVEN:
                x = tl.load(x_tile + offs)
            else:
                mask = (m0 + lr < M)[:, None] & (n0 + lc < N)[None, :]
                x = tl.load(x_tile + offs, mask=mask, other=0.0)
            q = _cast_tile(x, cm[None, :], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
            q = q.to(tl.uint8, bitcast=True)
            if EVEN:
                tl.store(col_tile + lc[None, :] * M + lr[:, None], q)
            else:
                tl.store(col_tile + lc[None, :] * M + lr[:, None], q, mask=mask)
        if EVEN:
            tl.store(col_scale_ptr + pid_m.to(tl.int64) * N + n0 + lc, cs)
        else:
            tl.store(col_scale_ptr + pid_m.to(tl.int64) * N + n0 + lc, cs, mask=n0 + lc < N)
    else:
        lr = tl.arange(0, BLOCK)
        for j in tl.static_range(BLOCK // CHUNK):
            jc = j * CHUNK + tl.arange(0, CHUNK)
            if ORIENT == 0:  # [CHUNK, BLOCK]: the transpose of the slice
                offs = jc[:, None] * stride_n + lr[None, :] * stride_m
                if EVEN:
                    xt = tl.load(x_tile + offs)
                else:
                    mask = (n0 + jc < N)[:, None] & (m0 + lr < M)[None, :]
                    xt = tl.load(x_tile + offs, mask=mask, other=0.0)
                cm, cs = scale_from_amax(tl.max(magnitude_bits(xt), 1).to(tl.float32, bitcast=True), FP8_MAX, EPS,
                                         POWER_OF_2)
                q = _cast_tile(xt, cm[:, None], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
                q = q.to(tl.uint8, bitcast=True)
                if EVEN:
                    tl.store(col_tile + jc[:, None] * M + lr[None, :], q)
                else:
                    tl.store(col_tile + jc[:, None] * M + lr[None, :], q, mask=mask)
            else:  # [BLOCK, CHUNK] as laid out
                offs = lr[:, None] * stride_m + jc[None, :] * stride_n
                if EVEN:
                    x = tl.load(x_tile + offs)
                else:
                    mask = (m0 + lr < M)[:, None] & (n0 + jc < N)[None, :]
                    x = tl.load(x_tile + offs, mask=mask, other=0.0)
                if AMAX_FROM_ROWS:
                    cm, cs = scale_from_amax(cacc.to(tl.float32, bitcast=True), FP8_MAX, EPS, POWER_OF_2)
                else:
                    cm, cs = scale_from_amax(tl.max(magnitude_bits(x), 0).to(tl.float32, bitcast=True), FP8_MAX, EPS,
                                             POWER_OF_2)
                q = _cast_tile(x, cm[None, :], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
                q = q.to(tl.uint8, bitcast=True)
                if EVEN:
                    tl.store(col_tile + jc[None, :] * M + lr[:, None], q)
                else:
                    tl.store(col_tile + jc[None, :] * M + lr[:, None], q, mask=mask)
            if EVEN:
                tl.store(col_scale_ptr + pid_m.to(tl.int64) * N + n0 + jc, cs)
            else:
                tl.store(col_scale_ptr + pid_m.to(tl.int64) * N + n0 + jc, cs, mask=n0 + jc < N)


def run_lean(x, warps=4, rch=64, chunk=64, write_row=True, orient=0, amax_from_rows=False, meta=None):
    M, N = x.shape
    assert 128 * (x.stride(0) + x.stride(1) + M + N) < 2 ** 31  # every offset inside a tile, in and out
    mb, nb = cdiv(M, 128), cdiv(N, 128)
    row = torch.empty((M, N), dtype=torch.float8_e4m3fn, device=x.device) if write_row else None
    col_t = torch.empty((N, M), dtype=torch.float8_e4m3fn, device=x.device)
    row_scale = torch.empty((nb, M), dtype=torch.float32, device=x.device).t() if write_row else None
    col_scale = torch.empty((mb, N), dtype=torch.float32, device=x.device)
    args = (x, row if write_row else col_t, row_scale if write_row else col_scale, col_t.view(torch.uint8),
            col_scale, M, N, x.stride(0), x.stride(1))
    consts = dict(_format(torch.float8_e4m3fn, False, INTERPRETING, x), BLOCK=128, RCH=rch, CHUNK=chunk,
                  EVEN=M % 128 == 0 and N % 128 == 0, WRITE_ROW=write_row, ORIENT=orient,
                  AMAX_FROM_ROWS=amax_from_rows)
    if meta is not None and meta.get("sm90"):
        return sm90_meta(meta, lean_kernel, args, warps, consts)
    k = lean_kernel[(mb, nb)](*args, **consts, num_warps=warps)
    if meta is not None and hasattr(k, "n_regs"):
        meta.update(regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared)
    return row, row_scale, col_t.t(), col_scale


def run_kernel(x, meta=None, **opts):
    """block_cast_triton itself (e4m3) with launch options: its own paths (block_n) beside
    the variants. Their sm_90 resources: python benchmarks/tools/sm90_compile.py."""
    if meta is not None and meta.get("sm90"):
        raise NotImplementedError("the kernel's configurations: python benchmarks/tools/sm90_compile.py")
    return block_cast_triton(x, torch.float8_e4m3fn, **opts)


@triton.jit
def piped_kernel(x_ptr, row_ptr, row_scale_ptr, col_ptr, col_scale_ptr, M, N, stride_m, stride_n,
                 FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                 MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr, RCH: tl.constexpr,
                 EVEN: tl.constexpr, STAGES: tl.constexpr, WRITE_ROW: tl.constexpr, LATE_REDUCE: tl.constexpr = False):
    """Both layouts as lean_kernel's "amax from rows", its two passes over RCH-row slices as
    tl.range loops with num_stages=STAGES: Triton's pipeliner loads the next slices into shared
    memory (cp.async) while this one is cast, so bytes stay in flight without holding registers.
    Pass 1 casts the row strips and takes the column amaxes; pass 2 reads the slices again (L2)
    and casts the column strips. WRITE_ROW off: the column strips alone, pass 1 only takes the
    amaxes (x read twice, the second time from L2). LATE_REDUCE: pass 1 keeps an elementwise
    running max of the slices and reduces it across rows (warps) once, after the loop, instead of
    once per slice."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m0, n0 = pid_m * BLOCK, pid_n * BLOCK
    x_tile = x_ptr + m0.to(tl.int64) * stride_m + n0.to(tl.int64) * stride_n
    lc = tl.arange(0, BLOCK)
    if LATE_REDUCE:
        cacc = tl.zeros([RCH, BLOCK], dtype=tl.int32)
    else:
        cacc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.range(0, BLOCK // RCH, num_stages=STAGES):
        lr = i * RCH + tl.arange(0, RCH)
        offs = lr[:, None] * stride_m + lc[None, :] * stride_n
        if EVEN:
            x = tl.load(x_tile + offs)
        else:
            mask = (m0 + lr < M)[:, None] & (n0 + lc < N)[None, :]
            x = tl.load(x_tile + offs, mask=mask, other=0.0)
        bits = magnitude_bits(x)
        if LATE_REDUCE:
            cacc = tl.maximum(cacc, bits)
        else:
            cacc = tl.maximum(cacc, tl.max(bits, 0))
        if WRITE_ROW:
            rm, rs = scale_from_amax(tl.max(bits, 1).to(tl.float32, bitcast=True), FP8_MAX, EPS, POWER_OF_2)
            q = _cast_tile(x, rm[:, None], row_ptr.dtype.element_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP,
                           EXACT_ROUND)
            row_tile = row_ptr + m0.to(tl.int64) * N + n0
            if EVEN:
                tl.store(row_scale_ptr + pid_n.to(tl.int64) * M + m0 + lr, rs)
                tl.store(row_tile + lr[:, None] * N + lc[None, :], q)
            else:
                tl.store(row_scale_ptr + pid_n.to(tl.int64) * M + m0 + lr, rs, mask=m0 + lr < M)
                tl.store(row_tile + lr[:, None] * N + lc[None, :], q, mask=mask)
    if LATE_REDUCE:
        cacc = tl.max(cacc, 0)
    cm, cs = scale_from_amax(cacc.to(tl.float32, bitcast=True), FP8_MAX, EPS, POWER_OF_2)
    col_tile = col_ptr + n0.to(tl.int64) * M + m0
    for i in tl.range(0, BLOCK // RCH, num_stages=STAGES):
        lr = i * RCH + tl.arange(0, RCH)
        offs = lr[:, None] * stride_m + lc[None, :] * stride_n
        if EVEN:
            x = tl.load(x_tile + offs)
        else:
            mask = (m0 + lr < M)[:, None] & (n0 + lc < N)[None, :]
            x = tl.load(x_tile + offs, mask=mask, other=0.0)
        q = _cast_tile(x, cm[None, :], row_ptr.dtype.element_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
        q = q.to(tl.uint8, bitcast=True)
        if EVEN:
            tl.store(col_tile + lc[None, :] * M + lr[:, None], q)
        else:
            tl.store(col_tile + lc[None, :] * M + lr[:, None], q, mask=mask)
    if EVEN:
        tl.store(col_scale_ptr + pid_m.to(tl.int64) * N + n0 + lc, cs)
    else:
        tl.store(col_scale_ptr + pid_m.to(tl.int64) * N + n0 + lc, cs, mask=n0 + lc < N)


def run_piped(x, warps=4, rch=32, stages=2, write_row=True, late_reduce=False, meta=None):
    M, N = x.shape
    assert 128 * (x.stride(0) + x.stride(1) + M) < 2 ** 31
    mb, nb = cdiv(M, 128), cdiv(N, 128)
    row = torch.empty((M, N), dtype=torch.float8_e4m3fn, device=x.device) if write_row else None
    col_t = torch.empty((N, M), dtype=torch.float8_e4m3fn, device=x.device)
    row_scale = torch.empty((nb, M), dtype=torch.float32, device=x.device).t() if write_row else None
    col_scale = torch.empty((mb, N), dtype=torch.float32, device=x.device)
    args = (x, row if write_row else col_t, row_scale if write_row else col_scale, col_t.view(torch.uint8),
            col_scale, M, N, x.stride(0), x.stride(1))
    consts = dict(_format(torch.float8_e4m3fn, False, INTERPRETING, x), BLOCK=128, RCH=rch,
                  EVEN=M % 128 == 0 and N % 128 == 0, STAGES=stages, WRITE_ROW=write_row,
                  LATE_REDUCE=late_reduce)
    if meta is not None and meta.get("sm90"):
        return sm90_meta(meta, piped_kernel, args, warps, consts)
    piped_kernel[(mb, nb)](*args, **consts, num_warps=warps)
    return row, row_scale, col_t.t(), col_scale


@triton.jit
def _row_slices(x_tile, row_ptr, row_scale_ptr, m0, n0, pid_n, M, N, stride_m, stride_n, FP8_MAX: tl.constexpr,
                EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr,
                EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr, RCH: tl.constexpr,
                EVEN: tl.constexpr):
    """The 1 x 128 row strips of the BLOCK x BN tile at (m0, n0) in RCH-row slices (lean_kernel's), the
    data row-major; 32-bit offsets inside the tile, no masks where the tile is whole (EVEN)."""
    out_ty = row_ptr.dtype.element_ty
    lc = tl.arange(0, BN)
    row_tile = row_ptr + m0.to(tl.int64) * N + n0
    for s in tl.static_range(BLOCK // RCH):
        lr = s * RCH + tl.arange(0, RCH)
        offs = lr[:, None] * stride_m + lc[None, :] * stride_n
        if EVEN:
            x = tl.load(x_tile + offs)
        else:
            mask = (m0 + lr < M)[:, None] & (n0 + lc < N)[None, :]
            x = tl.load(x_tile + offs, mask=mask, other=0.0)
        rm, rs = scale_from_amax(tl.max(magnitude_bits(x), 1).to(tl.float32, bitcast=True), FP8_MAX, EPS,
                                 POWER_OF_2)
        q = _cast_tile(x, rm[:, None], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
        if EVEN:
            tl.store(row_scale_ptr + pid_n.to(tl.int64) * M + m0 + lr, rs)
            tl.store(row_tile + lr[:, None] * N + lc[None, :], q)
        else:
            tl.store(row_scale_ptr + pid_n.to(tl.int64) * M + m0 + lr, rs, mask=m0 + lr < M)
            tl.store(row_tile + lr[:, None] * N + lc[None, :], q, mask=mask)


@triton.jit
def _packed_slice(x_tile, col_scale_ptr, c, m0, n0, pid_m, M, N, stride_m, stride_n, out_ty: tl.constexpr,
                  FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                  MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """The 128 x 1 column strips of the tile's columns c, loaded as x viewed [BLOCK / 4, 4, len(c)]
    (row 4 i + k), their scales stored; returns each column's rows 4 i .. 4 i + 3 cast and packed
    into one 32-bit word [BLOCK / 4, len(c)] (byte k at bits 8 k, the little-endian order of the
    column-major bytes)."""
    i = tl.arange(0, BLOCK // 4)
    k = tl.arange(0, 4)
    offs = (4 * i[:, None, None] + k[None, :, None]) * stride_m + c[None, None, :] * stride_n
    if EVEN:
        x = tl.load(x_tile + offs)
    else:
        mask3 = (m0 + 4 * i[:, None, None] + k[None, :, None] < M) & (n0 + c < N)[None, None, :]
        x = tl.load(x_tile + offs, mask=mask3, other=0.0)
    cm, cs = scale_from_amax(tl.max(tl.max(magnitude_bits(x), 1), 0).to(tl.float32, bitcast=True),
                             FP8_MAX, EPS, POWER_OF_2)
    if EVEN:
        tl.store(col_scale_ptr + pid_m.to(tl.int64) * N + n0 + c, cs)
    else:
        tl.store(col_scale_ptr + pid_m.to(tl.int64) * N + n0 + c, cs, mask=n0 + c < N)
    q = _cast_tile(x, cm[None, None, :], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
    # the four bytes are disjoint bit fields: their sum is their bitwise or
    return tl.sum(q.to(tl.uint8, bitcast=True).to(tl.uint32) << (8 * k).to(tl.uint32)[None, :, None], axis=1)


@triton.jit
def packed_kernel(x_ptr, row_ptr, row_scale_ptr, col32_ptr, col_scale_ptr, M, N, stride_m, stride_n,
                  FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                  MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
                  RCH: tl.constexpr, CCH: tl.constexpr, EVEN: tl.constexpr, WRITE_ROW: tl.constexpr):
    """lean_kernel's row slices, and column slices packed four rows to a 32-bit word (`_packed_slice`)
    before the transposed store, so the layout change goes through shared memory in 32-bit words,
    not bytes (STS.U8). col32_ptr: the column-major data [N, M] viewed as int32 [N, M / 4] (M a
    multiple of 4). A program owns BLOCK rows x BN columns (BN = BLOCK where it writes the row strips)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m0, n0 = pid_m * BLOCK, pid_n * BN
    x_tile = x_ptr + m0.to(tl.int64) * stride_m + n0.to(tl.int64) * stride_n
    out_ty = row_ptr.dtype.element_ty
    if WRITE_ROW:
        _row_slices(x_tile, row_ptr, row_scale_ptr, m0, n0, pid_n, M, N, stride_m, stride_n, FP8_MAX, EPS,
                    POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND, BLOCK, BN, RCH, EVEN)
    i = tl.arange(0, BLOCK // 4)
    col_tile = col32_ptr + n0.to(tl.int64) * (M // 4) + m0 // 4
    for s in tl.static_range(BN // CCH):
        c = s * CCH + tl.arange(0, CCH)
        w = _packed_slice(x_tile, col_scale_ptr, c, m0, n0, pid_m, M, N, stride_m, stride_n, out_ty, FP8_MAX, EPS,
                          POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND, BLOCK, EVEN)
        if EVEN:
            tl.store(col_tile + c[None, :] * (M // 4) + i[:, None], w)
        else:
            tl.store(col_tile + c[None, :] * (M // 4) + i[:, None], w,
                     mask=(m0 + 4 * i < M)[:, None] & (n0 + c < N)[None, :])


@triton.jit
def packed_once_kernel(x_ptr, row_ptr, row_scale_ptr, col32_ptr, col_scale_ptr, M, N, stride_m, stride_n,
                       FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                       MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr):
    """Both layouts of a whole BLOCK x BLOCK tile from one load of x viewed [BLOCK / 4, 4, BLOCK]: the
    rows' amax along axis 2, the columns' along axes 0 and 1, both casts from the same registers, the
    column-major data packed four rows to a word (packed_kernel's store). Whole tiles only."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m0, n0 = pid_m * BLOCK, pid_n * BLOCK
    x_tile = x_ptr + m0.to(tl.int64) * stride_m + n0.to(tl.int64) * stride_n
    i = tl.arange(0, BLOCK // 4)
    k = tl.arange(0, 4)
    c = tl.arange(0, BLOCK)
    r = 4 * i[:, None, None] + k[None, :, None]
    x = tl.load(x_tile + r * stride_m + c[None, None, :] * stride_n)
    bits = magnitude_bits(x)
    out_ty = row_ptr.dtype.element_ty
    rm, rs = scale_from_amax(tl.max(bits, 2).to(tl.float32, bitcast=True), FP8_MAX, EPS, POWER_OF_2)
    tl.store(row_scale_ptr + pid_n.to(tl.int64) * M + m0 + 4 * i[:, None] + k[None, :], rs)
    q = _cast_tile(x, rm[:, :, None], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
    tl.store(row_ptr + m0.to(tl.int64) * N + n0 + r * N + c[None, None, :], q)
    cm, cs = scale_from_amax(tl.max(tl.max(bits, 1), 0).to(tl.float32, bitcast=True), FP8_MAX, EPS, POWER_OF_2)
    tl.store(col_scale_ptr + pid_m.to(tl.int64) * N + n0 + c, cs)
    q = _cast_tile(x, cm[None, None, :], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
    w = tl.sum(q.to(tl.uint8, bitcast=True).to(tl.uint32) << (8 * k).to(tl.uint32)[None, :, None], axis=1)
    tl.store(col32_ptr + n0.to(tl.int64) * (M // 4) + m0 // 4 + c[None, :] * (M // 4) + i[:, None], w)


def run_packed_once(x, warps=8, meta=None):
    M, N = x.shape
    if M % 128 or N % 128:
        return run_packed(x, warps=4, meta=meta)  # whole tiles only: other shapes are checked on packed_kernel
    assert 128 * (x.stride(0) + x.stride(1) + M + N) < 2 ** 31  # every offset inside a tile, in and out
    row = torch.empty((M, N), dtype=torch.float8_e4m3fn, device=x.device)
    col_t = torch.empty((N, M), dtype=torch.float8_e4m3fn, device=x.device)
    row_scale = torch.empty((N // 128, M), dtype=torch.float32, device=x.device).t()
    col_scale = torch.empty((M // 128, N), dtype=torch.float32, device=x.device)
    args = (x, row, row_scale, col_t.view(torch.int32), col_scale, M, N, x.stride(0), x.stride(1))
    consts = dict(_format(torch.float8_e4m3fn, False, INTERPRETING, x), BLOCK=128)
    if meta is not None and meta.get("sm90"):
        return sm90_meta(meta, packed_once_kernel, args, warps, consts)
    k = packed_once_kernel[(M // 128, N // 128)](*args, **consts, num_warps=warps)
    if meta is not None and hasattr(k, "n_regs"):
        meta.update(regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared)
    return row, row_scale, col_t.t(), col_scale


def _run_sliced(kernel, x, warps, rch, cch, bn, write_row, col_dtype, meta, col_block=None, **extra):
    """Launch a sliced variant (packed_kernel, tma_kernel) on x with the column-major data viewed as
    col_dtype (with col_block, as a tensor descriptor of that block shape, made here); meta: its
    resources on the GPU, or on sm_90 compiled here where meta["sm90"]."""
    M, N = x.shape
    assert bn == 128 or not write_row
    mb, nb = cdiv(M, 128), cdiv(N, bn)
    row = torch.empty((M, N), dtype=torch.float8_e4m3fn, device=x.device) if write_row else None
    col_t = torch.empty((N, M), dtype=torch.float8_e4m3fn, device=x.device)
    row_scale = torch.empty((cdiv(N, 128), M), dtype=torch.float32, device=x.device).t() if write_row else None
    col_scale = torch.empty((mb, N), dtype=torch.float32, device=x.device)
    col_arg = col_t.view(col_dtype)
    if col_block is not None:
        from triton.tools.tensor_descriptor import TensorDescriptor
        col_arg = TensorDescriptor.from_tensor(col_arg, col_block)
    args = (x, row if write_row else col_t, row_scale if write_row else col_scale, col_arg,
            col_scale, M, N, x.stride(0), x.stride(1))
    consts = dict(_format(torch.float8_e4m3fn, False, INTERPRETING, x), BLOCK=128, BN=bn, RCH=rch, CCH=cch,
                  EVEN=M % 128 == 0 and N % bn == 0, WRITE_ROW=write_row, **extra)
    if meta is not None and meta.get("sm90"):
        return sm90_meta(meta, kernel, args, warps, consts)
    k = kernel[(mb, nb)](*args, **consts, num_warps=warps)
    if meta is not None and hasattr(k, "n_regs"):
        meta.update(regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared)
    return row, row_scale, col_t.t(), col_scale


def run_packed(x, warps=4, rch=64, cch=64, bn=128, write_row=True, meta=None):
    M, N = x.shape
    assert M % 4 == 0 and 128 * (x.stride(0) + x.stride(1) + M + N) < 2 ** 31
    return _run_sliced(packed_kernel, x, warps, rch, cch, bn, write_row, torch.int32, meta)


@triton.jit
def tma_kernel(x_ptr, row_ptr, row_scale_ptr, cols_out, col_scale_ptr, M, N, stride_m, stride_n,
               FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
               MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
               RCH: tl.constexpr, CCH: tl.constexpr, EVEN: tl.constexpr, WRITE_ROW: tl.constexpr,
               PACK: tl.constexpr):
    """The row slices (`_row_slices`); the column slices loaded as laid out, cast, and their transpose
    stored through a tensor descriptor made on the host (Hopper's tensor memory accelerator: the fp8
    tile goes to shared memory once and one bulk copy writes it, clipped at the buffer's edges, so
    the store takes no mask). cols_out: the column-major data [N, M] row-major in [CCH, BLOCK]
    blocks, M a multiple of 16 (the descriptor's row stride must be 16-byte aligned); with PACK, the
    same data viewed as int32 [N, M / 4] in [CCH, BLOCK / 4] blocks, the slices packed four rows to
    a word (`_packed_slice`: no byte-wide shared-memory stores), and the words' transpose stored. A program owns BLOCK rows x BN columns."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m0, n0 = pid_m * BLOCK, pid_n * BN
    x_tile = x_ptr + m0.to(tl.int64) * stride_m + n0.to(tl.int64) * stride_n
    out_ty = row_ptr.dtype.element_ty  # float8 (the column-major buffer where no row strips are written)
    if WRITE_ROW:
        _row_slices(x_tile, row_ptr, row_scale_ptr, m0, n0, pid_n, M, N, stride_m, stride_n, FP8_MAX, EPS,
                    POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND, BLOCK, BN, RCH, EVEN)
    if PACK:
        for s in tl.static_range(BN // CCH):
            c = s * CCH + tl.arange(0, CCH)
            w = _packed_slice(x_tile, col_scale_ptr, c, m0, n0, pid_m, M, N, stride_m, stride_n, out_ty, FP8_MAX,
                              EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND, BLOCK, EVEN)
            cols_out.store([n0 + s * CCH, m0 // 4], tl.trans(w.to(tl.int32, bitcast=True)))
    else:
        lr = tl.arange(0, BLOCK)
        for s in tl.static_range(BN // CCH):
            c = s * CCH + tl.arange(0, CCH)
            offs = lr[:, None] * stride_m + c[None, :] * stride_n
            if EVEN:
                x = tl.load(x_tile + offs)
            else:
                x = tl.load(x_tile + offs, mask=(m0 + lr < M)[:, None] & (n0 + c < N)[None, :], other=0.0)
            cm, cs = scale_from_amax(tl.max(magnitude_bits(x), 0).to(tl.float32, bitcast=True), FP8_MAX, EPS,
                                     POWER_OF_2)
            if EVEN:
                tl.store(col_scale_ptr + pid_m.to(tl.int64) * N + n0 + c, cs)
            else:
                tl.store(col_scale_ptr + pid_m.to(tl.int64) * N + n0 + c, cs, mask=n0 + c < N)
            q = _cast_tile(x, cm[None, :], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
            cols_out.store([n0 + s * CCH, m0], tl.trans(q))


def run_tma(x, warps=4, rch=64, cch=64, bn=128, write_row=True, pack=False, meta=None):
    M, N = x.shape
    assert M % 16 == 0 and 128 * (x.stride(0) + x.stride(1)) < 2 ** 31
    return _run_sliced(tma_kernel, x, warps, rch, cch, bn, write_row, torch.int32 if pack else torch.float8_e4m3fn,
                       meta, col_block=[cch, 32 if pack else 128], PACK=pack)


@triton.jit
def _tma_all_tile(x_rows, x_cols, rows_out, cols_out, row_scale_ptr, col_scale_ptr, pid_m, pid_n, M, N,
                  FP8_MAX: tl.constexpr, EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                  MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr, RCH: tl.constexpr,
                  CCH: tl.constexpr):
    """Both layouts of the BLOCK x BLOCK tile (pid_m, pid_n), every bulk move through the descriptors
    (see tma_all_kernel)."""
    m0, n0 = pid_m * BLOCK, pid_n * BLOCK
    out_ty = rows_out.dtype
    for s in tl.static_range(BLOCK // RCH):
        x = x_rows.load([m0 + s * RCH, n0])
        lr = m0 + s * RCH + tl.arange(0, RCH)
        rm, rs = scale_from_amax(tl.max(magnitude_bits(x), 1).to(tl.float32, bitcast=True), FP8_MAX, EPS,
                                 POWER_OF_2)
        tl.store(row_scale_ptr + pid_n.to(tl.int64) * M + lr, rs, mask=lr < M)
        rows_out.store([m0 + s * RCH, n0], _cast_tile(x, rm[:, None], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP,
                                                      EXACT_ROUND))
    for s in tl.static_range(BLOCK // CCH):
        x = x_cols.load([m0, n0 + s * CCH])
        c = n0 + s * CCH + tl.arange(0, CCH)
        cm, cs = scale_from_amax(tl.max(magnitude_bits(x), 0).to(tl.float32, bitcast=True), FP8_MAX, EPS,
                                 POWER_OF_2)
        tl.store(col_scale_ptr + pid_m.to(tl.int64) * N + c, cs, mask=c < N)
        q = _cast_tile(x, cm[None, :], out_ty, FP8_MAX, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND)
        cols_out.store([n0 + s * CCH, m0], tl.trans(q))


@triton.jit
def tma_all_kernel(x_rows, x_cols, rows_out, cols_out, row_scale_ptr, col_scale_ptr, M, N, FP8_MAX: tl.constexpr,
                   EPS: tl.constexpr, POWER_OF_2: tl.constexpr, MANT_BITS: tl.constexpr,
                   MIN_NORMAL_EXP: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr,
                   RCH: tl.constexpr, CCH: tl.constexpr, STAGES: tl.constexpr):
    """Every bulk move through a tensor descriptor made on the host (`run_tma_all`): x's row slices
    (x_rows, [RCH, BLOCK] blocks) and column slices (x_cols, [BLOCK, CCH]) loaded by TMA (zeros past
    the edges, as the masked loads' other=0.0), the row-major data stored through rows_out, the
    column slices' transpose through cols_out ([N, M], [CCH, BLOCK] blocks; clipped at the edges);
    only the scales through pointers. No masks, no per-element addresses. STAGES 0: one program a
    tile; else a persistent grid looping over the tiles in a tl.range of that many stages (Triton's
    pipelining of the loop's loads)."""
    if STAGES == 0:
        _tma_all_tile(x_rows, x_cols, rows_out, cols_out, row_scale_ptr, col_scale_ptr, tl.program_id(0),
                      tl.program_id(1), M, N, FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND,
                      BLOCK, RCH, CCH)
    else:
        nb = tl.cdiv(N, BLOCK)
        for t in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK) * nb, tl.num_programs(0), num_stages=STAGES):
            _tma_all_tile(x_rows, x_cols, rows_out, cols_out, row_scale_ptr, col_scale_ptr, t // nb, t % nb, M, N,
                          FP8_MAX, EPS, POWER_OF_2, MANT_BITS, MIN_NORMAL_EXP, EXACT_ROUND, BLOCK, RCH, CCH)


def run_tma_all(x, warps=4, rch=64, cch=64, stages=0, per_sm=4, meta=None):
    """tma_all_kernel on x (contiguous, M and N multiples of 16: each descriptor's row stride
    16-byte aligned); with stages, a persistent grid of per_sm programs an SM."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, N = x.shape
    assert M % 16 == 0 and N % 16 == 0 and x.is_contiguous()
    row = torch.empty((M, N), dtype=torch.float8_e4m3fn, device=x.device)
    col_t = torch.empty((N, M), dtype=torch.float8_e4m3fn, device=x.device)
    row_scale = torch.empty((cdiv(N, 128), M), dtype=torch.float32, device=x.device).t()
    col_scale = torch.empty((cdiv(M, 128), N), dtype=torch.float32, device=x.device)
    args = (TensorDescriptor.from_tensor(x, [rch, 128]), TensorDescriptor.from_tensor(x, [128, cch]),
            TensorDescriptor.from_tensor(row, [rch, 128]), TensorDescriptor.from_tensor(col_t, [cch, 128]),
            row_scale, col_scale, M, N)
    consts = dict(_format(torch.float8_e4m3fn, False, INTERPRETING, x), BLOCK=128, RCH=rch, CCH=cch, STAGES=stages)
    if meta is not None and meta.get("sm90"):
        return sm90_meta(meta, tma_all_kernel, args, warps, consts)
    tiles = (cdiv(M, 128), cdiv(N, 128))
    if stages:
        # in the interpreter 1, so that programs loop over several tiles
        sms = 1 if INTERPRETING else torch.cuda.get_device_properties(x.device).multi_processor_count
        grid = (min(tiles[0] * tiles[1], per_sm * sms),)
    else:
        grid = tiles
    k = tma_all_kernel[grid](*args, **consts, num_warps=warps)
    if meta is not None and hasattr(k, "n_regs"):
        meta.update(regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared)
    return row, row_scale, col_t.t(), col_scale


def sm90_meta(meta, kernel, args, warps, consts):
    """Fill meta with the kernel's sm_90 resources, compiled here (benchmarks/tools/sm90_compile.py)."""
    from tools.sm90_compile import sm90_resources
    meta.update(sm90_resources(kernel, args, warps, **consts))
    return None


# name -> (runner, options, what it writes): "both" layouts (4 bytes moved per element of a bf16 x)
# or the column strips alone ("col", 3 bytes).
VARIANTS = {}
for w in (1, 2, 4):  # the column strips alone in 128 x pn programs (torchao's shape): the kernel's block_n
    for pn in (16, 32, 64):
        VARIANTS[f"kernel col w{w} b{pn}"] = (
            run_kernel, dict(write_row=False, write_col=True, block_n=pn, sub_n=pn, num_warps=w), "col")
for w in (2, 4, 8):
    for rch in (16, 32):
        for stages in (2, 3, 4):
            VARIANTS[f"piped both w{w} r{rch} s{stages}"] = (run_piped, dict(warps=w, rch=rch, stages=stages), "both")
            VARIANTS[f"piped col w{w} r{rch} s{stages}"] = (
                run_piped, dict(warps=w, rch=rch, stages=stages, write_row=False), "col")
            VARIANTS[f"piped late col w{w} r{rch} s{stages}"] = (
                run_piped, dict(warps=w, rch=rch, stages=stages, write_row=False, late_reduce=True), "col")
for w in (2, 4, 8):
    for rch in (16, 32, 64):
        VARIANTS[f"lean both w{w} r{rch} amax from rows"] = (
            run_lean, dict(warps=w, rch=rch, amax_from_rows=True), "both")
for w in (2, 4, 8):
    for rch, cch in ((64, 64), (32, 64), (64, 32)):
        for orient in (0, 1):
            VARIANTS[f"lean both w{w} r{rch} c{cch} o{orient}"] = (
                run_lean, dict(warps=w, rch=rch, chunk=cch, orient=orient), "both")
    for cch in (32, 64, 128):
        for orient in (0, 1):
            VARIANTS[f"lean col w{w} c{cch} o{orient}"] = (
                run_lean, dict(warps=w, chunk=cch, write_row=False, orient=orient), "col")


for packed in (False, True):  # the kernel's two column stores (its default is printed first as "kernel")
    VARIANTS[f"packed kernel both packed={packed}"] = (run_kernel, dict(write_col=True, packed=packed), "both")
    VARIANTS[f"packed kernel col packed={packed}"] = (
        run_kernel, dict(write_row=False, write_col=True, packed=packed), "col")
for w in (2, 4, 8):  # four rows' bytes packed in a word before the transposed store
    for rch, cch in ((64, 64), (64, 32), (32, 64), (32, 32)):
        VARIANTS[f"packed both w{w} r{rch} c{cch}"] = (run_packed, dict(warps=w, rch=rch, cch=cch), "both")
VARIANTS["packed once both w16"] = (run_packed_once, dict(warps=16), "both")  # one load of the whole tile
for w in (2, 4):
    for bn, cch in ((64, 64), (64, 32), (128, 64), (32, 32)):
        VARIANTS[f"packed col w{w} b{bn} c{cch}"] = (
            run_packed, dict(warps=w, bn=bn, cch=cch, write_row=False), "col")


for w in (2, 4, 8):  # the column-major data stored through a tensor descriptor (TMA)
    for rch, cch in ((64, 64), (64, 32), (32, 64), (32, 32), (64, 128)):
        VARIANTS[f"tma both w{w} r{rch} c{cch}"] = (run_tma, dict(warps=w, rch=rch, cch=cch), "both")
    for bn, cch in ((64, 64), (64, 32), (128, 64), (128, 128)):
        VARIANTS[f"tma col w{w} b{bn} c{cch}"] = (run_tma, dict(warps=w, bn=bn, cch=cch, write_row=False), "col")
    for rch, cch in ((64, 64), (64, 32), (32, 32)):  # and four rows' bytes to a word first
        VARIANTS[f"tmapacked both w{w} r{rch} c{cch}"] = (run_tma, dict(warps=w, rch=rch, cch=cch, pack=True), "both")
    for bn, cch in ((64, 64), (128, 64)):
        VARIANTS[f"tmapacked col w{w} b{bn} c{cch}"] = (
            run_tma, dict(warps=w, bn=bn, cch=cch, write_row=False, pack=True), "col")
    for rch, cch in ((64, 64), (32, 64), (64, 32), (32, 32)):  # loads and both stores through descriptors
        VARIANTS[f"tmaall both w{w} r{rch} c{cch}"] = (run_tma_all, dict(warps=w, rch=rch, cch=cch), "both")
    for stages, per_sm in ((2, 3), (2, 2), (3, 1)):  # persistent, the tile loop pipelined (as many as fit an SM)
        VARIANTS[f"tmaall persistent both w{w} r64 c64 s{stages} p{per_sm}"] = (
            run_tma_all, dict(warps=w, rch=64, cch=64, stages=stages, per_sm=per_sm), "both")


def same(a, b):
    return all(p is None and q is None or torch.equal(
        p.view(torch.uint8) if p.dtype.itemsize == 1 else p.view(torch.int32),
        q.view(torch.uint8) if q.dtype.itemsize == 1 else q.view(torch.int32)) for p, q in zip(a, b))


def applies(runner, opts, x):
    """Whether a variant takes x: the packed stores view the column-major data as 32-bit words (M a
    multiple of 4), the descriptor store needs its rows 16-byte aligned (M a multiple of 16)."""
    if runner is run_tma:
        return x.shape[0] % 16 == 0
    if runner is run_tma_all:
        return x.shape[0] % 16 == 0 and x.shape[1] % 16 == 0 and x.is_contiguous()
    return not (runner in (run_packed, run_packed_once) or opts.get("packed")) or x.shape[0] % 4 == 0


def selected(name, parts):
    """Whether a variant is chosen: no name parts given, or its name contains one of them."""
    return not parts or any(part in name for part in parts)


def cpu_check(mode, parts):
    """Without a GPU: --exact runs each variant in the interpreter (TRITON_INTERPRET=1) on small
    inputs, bit for bit against block_cast_triton; --sm90 compiles it for sm_90 and prints its
    registers, shared memory and programs per SM (a screen before a GPU run, not a timing)."""
    if mode == "--exact" and not INTERPRETING:
        raise SystemExit("--exact runs the interpreter: TRITON_INTERPRET=1 python ... --exact")
    if mode == "--sm90" and INTERPRETING:
        raise SystemExit("--sm90 compiles for the GPU: run it without TRITON_INTERPRET")
    torch.manual_seed(0)
    tests = [torch.randn(300, 200, dtype=torch.bfloat16) * 3, torch.randn(256, 384, dtype=torch.bfloat16),
             torch.randn(130, 256, dtype=torch.float32), torch.randn(272, 200, dtype=torch.bfloat16) * 3,
             torch.randn(272, 208, dtype=torch.bfloat16) * 3]  # both multiples of 16, tiles ending mid-tile
    for t in tests[0], tests[3], tests[4]:  # M = 272: a multiple of 16 whose tiles end mid-tile in both dims
        t[5, 3] = float("inf"); t[200, 130] = float("nan"); t[7] *= 1e4
    writes = {"both": dict(write_row=True, write_col=True), "col": dict(write_row=False, write_col=True)}
    big = torch.empty(16384, 4096, dtype=torch.bfloat16)
    for name, (runner, opts, what) in VARIANTS.items():
        if not selected(name, parts):
            continue
        if mode == "--exact":
            # the packed variants view the column-major data as 32-bit words: rows a multiple of 4 only
            ts = [t for t in tests if applies(runner, opts, t)]
            ok = all(same(runner(t, **opts), block_cast_triton(t, torch.float8_e4m3fn, **writes[what])) for t in ts)
            print(f"{name:<34} exact={ok} ({len(ts)} inputs)", flush=True)
        else:
            meta = {"sm90": True}
            try:
                runner(big, **opts, meta=meta)
                del meta["sm90"]
            except Exception as e:  # noqa: BLE001  (recorded: a variant may not compile)
                meta = repr(e)[:200]
            print(f"{name:<34} {meta}", flush=True)


def main():
    import os
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if sys.argv[1] in ("--exact", "--sm90"):
        return cpu_check(sys.argv[1], sys.argv[2:])
    from tools.common import copy_bandwidth_tbps, gpu_ms
    out = open(sys.argv[1], "w")
    torch.manual_seed(0)
    tests = [torch.randn(1000, 700, device="cuda", dtype=torch.bfloat16) * 3,
             torch.randn(384, 512, device="cuda", dtype=torch.float32),
             torch.randn(4096, 4100, device="cuda", dtype=torch.bfloat16) * 3,  # the shape test_blockwise failed at
             torch.randn(4096, 4112, device="cuda", dtype=torch.bfloat16) * 3]  # both multiples of 16, mid-tile
    for t in tests[0], tests[2], tests[3]:
        t[5, 3] = float("inf"); t[200, 130] = float("nan"); t[7] *= 1e4
    copy_bw = copy_bandwidth_tbps()
    print(f"copy {copy_bw:.3f} TB/s", flush=True)
    shapes = [(16384, 4096), (16384, 14336), (14336, 4096)]
    xs = {s: torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in shapes}
    writes = {"both": dict(write_row=True, write_col=True), "col": dict(write_row=False, write_col=True)}
    chosen = [name for name in VARIANTS if selected(name, sys.argv[2:])]
    for what, kw in writes.items():
        if not any(VARIANTS[name][2] == what for name in chosen):
            continue
        per = 4 if what == "both" else 3
        base = {s: gpu_ms(lambda: block_cast_triton(xs[s], torch.float8_e4m3fn, **kw)) for s in shapes}
        print(f"kernel {what}", {f"{m}x{n}": f"{ms:.4f} {per * m * n / ms / 1e9 / copy_bw:.3f}"
                                 for (m, n), ms in base.items()}, flush=True)
    for name in chosen:
        runner, opts, what = VARIANTS[name]
        per = 4 if what == "both" else 3
        try:
            ok = all(same(runner(t, **opts), block_cast_triton(t, torch.float8_e4m3fn, **writes[what]))
                     for t in tests + [xs[shapes[0]]] if applies(runner, opts, t))
            res = {}
            for (m, n) in shapes:
                ms = gpu_ms(lambda: runner(xs[m, n], **opts))
                res[f"{m}x{n}"] = (round(ms, 4), round(per * m * n / ms / 1e9 / copy_bw, 3))
        except Exception as e:  # noqa: BLE001  (recorded: a variant may not compile)
            ok, res = False, repr(e)[:200]
        meta = {}
        try:
            runner(xs[shapes[0]], **opts, meta=meta)
        except Exception:  # noqa: BLE001
            pass
        print(f"{name:<28} exact={ok} {res} {meta}", flush=True)
        out.write(json.dumps(dict(name=name, exact=ok, res=res, copy=copy_bw, **meta)) + "\n")
        out.flush()  # a run cut off at its time limit keeps what it measured


if __name__ == "__main__":
    main()
