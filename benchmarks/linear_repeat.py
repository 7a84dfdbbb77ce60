"""How much a Float8Linear speedup moves between repeats of the same measurement, and where.

    python benchmarks/linear_repeat.py [--reps 4]

For the two large Llama-3-8B FFN shapes at M = 16384, repeats in one process: bf16 and f8tensor
fwd+bwd (median of CUDA-event-timed calls, as linear.py), the three fp8 GEMMs alone, and the
profiler's sum of f8tensor's kernel times split into GEMMs and the rest (our casts).
"""

import argparse
import copy

import torch
from torch import nn

from tools.common import bench_ms, environment
from f8tensor import Float8Linear
from linear import fwd_bwd, gemms_only, kernel_times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    print(environment())
    for K, N in [(14336, 4096), (4096, 14336)]:
        lin = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        ours = Float8Linear.from_float(copy.deepcopy(lin))
        x = torch.randn(16384, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(16384, N, device="cuda", dtype=torch.bfloat16)
        for rep in range(args.reps):
            bf16 = bench_ms(fwd_bwd(lin, x, g))
            f8 = bench_ms(fwd_bwd(ours, x, g))
            gemms = bench_ms(gemms_only(x.detach(), lin.weight.detach(), g))
            kernels = kernel_times(fwd_bwd(ours, x, g))
            gemm_us = sum(us for name, us in kernels if "nvjet" in name or "gemm" in name)
            rest_us = sum(us for _, us in kernels) - gemm_us
            print(f"{K}->{N} rep {rep}: bf16 {bf16:.3f} ms, f8tensor {f8:.3f} ms ({bf16 / f8:.2f}x), "
                  f"fp8 GEMMs alone {gemms:.3f} ms | f8tensor kernels: GEMMs {gemm_us / 1e3:.3f} ms, "
                  f"rest {rest_us / 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
