"""Quantization kernel benchmark: ours vs eager reference vs torch.compile(reference), vs copy bandwidth.

    python benchmarks/kernels.py [--out results/kernels.jsonl] [--sweep]

Bytes counted are those the algorithm must move: the input read twice (amax pass, cast pass) and
each requested layout written once. --sweep also times a few block configurations of our kernels.
"""

import argparse
import time

import torch

from tools.common import bench_ms, gpu_ms, kernel_benchmark_start, write_rows
from f8tensor.kernels import quantize_ref
from f8tensor.kernels.quantize import quantize_triton

SHAPES = [(16384, 4096), (16384, 14336), (14336, 4096), (8192, 8192), (4096, 4096), (1024, 1024)]
MODES = ["row", "col", "both"]
SWEEP = [
    dict(block_m=64, block_n=128, num_warps=8), dict(block_m=128, block_n=128, num_warps=8),
    dict(block_m=32, block_n=128, num_warps=4), dict(block_m=64, block_n=256, num_warps=8),
    dict(block_m=128, block_n=64, num_warps=4), dict(block_m=32, block_n=256, num_warps=8),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compile", action="store_true")
    args, env, copy_bw = kernel_benchmark_start("kernels", ap)
    torch._dynamo.config.recompile_limit = 1000  # one compiled graph per shape and mode
    compiled = torch.compile(quantize_ref, dynamic=False)
    rows = []
    dt = torch.float8_e4m3fn
    for M, N in SHAPES:
        x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        for mode in MODES:
            nbytes = 2 * x.numel() * x.element_size() + x.numel() * (2 if mode == "both" else 1)
            ours = bench_ms(lambda: quantize_triton(x, dt, mode))
            # GPU time alone (CUDA graph replay): the bandwidth figure. The eager time above also
            # holds the CPU's launch latency, which training hides when the CPU runs ahead.
            gpu = gpu_ms(lambda: quantize_triton(x, dt, mode))
            row = dict(env, bench="kernels", shape=f"{M}x{N}", mode=mode, mib=x.numel() * 2 / 2**20,
                       bytes=nbytes, copy_tbps=copy_bw, ours_ms=ours, ours_gpu_ms=gpu,
                       ours_tbps=nbytes / gpu / 1e9, ours_pct_copy=100 * nbytes / gpu / 1e9 / copy_bw)
            row["eager_ms"] = bench_ms(lambda: quantize_ref(x, dt, mode))
            if not args.no_compile:
                row["compile_ms"] = bench_ms(lambda: compiled(x, dt, mode))
                row["compile_gpu_ms"] = gpu_ms(lambda: compiled(x, dt, mode))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                quantize_triton(x, dt, mode)
            row["ours_cpu_us"] = (time.perf_counter() - t0) / 50 * 1e6  # host time per call
            torch.cuda.synchronize()
            row["ours_again_ms"] = bench_ms(lambda: quantize_triton(x, dt, mode))  # the spread
            if args.sweep:
                for i, cfg in enumerate(SWEEP):
                    row[f"sweep{i}_ms"] = bench_ms(lambda: quantize_triton(x, dt, mode, **cfg))
                for mult in (2, 8):
                    row[f"progs{mult}_ms"] = bench_ms(
                        lambda: quantize_triton(x, dt, mode, num_programs=mult * 132))
                row["atomic_ms"] = bench_ms(lambda: quantize_triton(x, dt, mode, amax_mode="atomic"))
            rows.append(row)
            extra = "".join(f" {k}={v:.3f}" for k, v in row.items() if k.endswith("_ms") and k != "ours_ms")
            print(f"{M:>6}x{N:<6} {mode:<4} ours {ours:.3f} ms (GPU {gpu:.3f} ms) {row['ours_tbps']:.2f} TB/s "
                  f"({row['ours_pct_copy']:.0f}% copy){extra}", flush=True)
        del x
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
