"""Rowwise quantization kernels: ours vs torch.compile of the reference, vs copy bandwidth.

    python benchmarks/kernels_rowwise.py [--out results/kernels_rowwise.jsonl] [--sweep]

Modes, with the bytes each must move (what the bandwidth figure counts):
    row    row-major data with per-row scales (one read of x, one write of float8 data)
    col    column-major data with per-column scales, the column amaxes given (as Float8Linear's
           backward casts its weight): one read, one write
    both   both layouts and both kinds of scales: three reads (rows, column amaxes, columns), two
           writes
Scales (4 bytes per row or column) are left out of the count. Scales are not rounded to powers
of two (the recipes' default).
"""

import argparse

import torch

from tools.common import bench_ms, gpu_ms, kernel_benchmark_start, write_rows
from f8tensor.kernels import quantize_rowwise_ref
from f8tensor.kernels.naive import axis_amax_ref
from f8tensor.kernels.rowwise import col_cast_triton, row_cast_triton

SHAPES = [(16384, 4096), (16384, 14336), (14336, 4096), (4096, 14336), (16384, 1024), (1024, 4096),
          (8192, 8192), (4096, 4096)]
MODES = ["row", "col", "both"]
# row pass: rows per program (one-pass tiles of whole rows), warps; and the two-pass fallback
ROW_SWEEP = [dict(block_m=1, num_warps=4), dict(block_m=2, num_warps=8), dict(block_m=4, num_warps=8),
             dict(block_m=8, num_warps=8), dict(block_m=16, block_n=256, num_warps=4),
             dict(block_m=2, num_warps=16)]
# the column amax pass: (rows, columns, warps) of its blocks
AMAX_SWEEP = [dict(amax_blocks=b) for b in [(64, 64, 4), (128, 64, 8), (256, 64, 8), (128, 128, 8), (64, 128, 4)]]
COL_SWEEP = [dict(block_m=m, block_n=n, num_warps=w) for m, n, w in
             [(64, 64, 4), (128, 64, 8), (64, 128, 8), (32, 128, 4), (128, 128, 8), (64, 32, 4)]]


def ours(x, dt, mode, col_amax, row_opts=None, col_opts=None):
    row_opts, col_opts = row_opts or {}, col_opts or {}
    if mode == "row":
        return lambda: row_cast_triton(x, dt, **row_opts)
    if mode == "col":
        return lambda: col_cast_triton(x, dt, col_amax, **col_opts)

    def both():
        _, _, amax = row_cast_triton(x, dt, col_amax=True, **row_opts)
        return col_cast_triton(x, dt, amax, **col_opts)
    return both


def reference(x, dt, mode, col_amax):
    """The same work in plain PyTorch: what torch.compile makes of it."""
    def run(x, col_amax):
        if mode == "col":
            return quantize_rowwise_ref(x, dt, "col", col_amax=col_amax)
        return quantize_rowwise_ref(x, dt, mode)
    compiled = torch.compile(run, dynamic=False)
    return lambda: compiled(x, col_amax)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--shapes", nargs="+", help="MxN shapes to run (default: all of SHAPES)")
    args, env, copy_bw = kernel_benchmark_start("kernels_rowwise", ap)
    torch._dynamo.config.recompile_limit = 1000
    rows = []
    dt = torch.float8_e4m3fn
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    for M, N in shapes:
        x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        col_amax = axis_amax_ref(x, 0).reshape(-1)
        for mode in MODES:
            reads, writes = (3, 2) if mode == "both" else (1, 1)
            nbytes = (reads * x.element_size() + writes) * x.numel()
            fn = ours(x, dt, mode, col_amax)
            gpu = gpu_ms(fn)
            row = dict(env, bench="kernels_rowwise", shape=f"{M}x{N}", mode=mode, bytes=nbytes,
                       copy_tbps=copy_bw, ours_ms=bench_ms(fn), ours_gpu_ms=gpu,
                       ours_pct_copy=100 * nbytes / gpu / 1e9 / copy_bw)
            if not args.no_compile:
                ref = reference(x, dt, mode, col_amax)
                row["compile_gpu_ms"] = gpu_ms(ref)
                row["ours_vs_compile"] = row["compile_gpu_ms"] / gpu
            if args.sweep:
                for i, cfg in enumerate(ROW_SWEEP if mode != "col" else []):
                    if cfg.get("block_n") is None and x.shape[1] > 16384:
                        continue
                    row[f"row_sweep{i}_gpu_ms"] = gpu_ms(ours(x, dt, mode, col_amax, row_opts=cfg))
                for i, cfg in enumerate(COL_SWEEP if mode != "row" else []):
                    row[f"col_sweep{i}_gpu_ms"] = gpu_ms(ours(x, dt, mode, col_amax, col_opts=cfg))
                for i, cfg in enumerate(AMAX_SWEEP if mode == "both" else []):
                    row[f"amax_sweep{i}_gpu_ms"] = gpu_ms(ours(x, dt, mode, col_amax, row_opts=cfg))
            rows.append(row)
            extra = "".join(f" {k}={v:.3f}" for k, v in row.items() if k.endswith("_ms") and k != "ours_gpu_ms")
            print(f"{M:>6}x{N:<6} {mode:<4} GPU {gpu:.3f} ms ({row['ours_pct_copy']:.0f}% copy)"
                  f"{' vs compile %.2fx' % row['ours_vs_compile'] if 'ours_vs_compile' in row else ''}{extra}",
                  flush=True)
        del x
    if args.sweep:
        for mode, sweep, key in (("row", ROW_SWEEP, "row_sweep"), ("col", COL_SWEEP, "col_sweep"),
                                 ("amax", AMAX_SWEEP, "amax_sweep")):
            for i, cfg in enumerate(sweep):
                times = [r[f"{key}{i}_gpu_ms"] / r["ours_gpu_ms"] for r in rows if f"{key}{i}_gpu_ms" in r]
                print(f"{mode} kernel {cfg}: mean time vs default {sum(times) / len(times):.3f}")
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
