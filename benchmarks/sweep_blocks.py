"""GPU-time sweep of the quantization kernels' block shapes (CUDA-graph replay, no host latency).

    python benchmarks/sweep_blocks.py

Prints, per shape and output mode, each (block_m x block_n, num_warps) with its GPU time and TB/s
(bytes as in kernels.py: two reads of the input plus the writes). Defaults: 64x128, 8 warps.
"""

import torch
import triton

from f8tensor.kernels.quantize import quantize_triton

CONFIGS = [(64, 128, 8), (128, 128, 8), (128, 64, 4), (128, 128, 4), (128, 256, 8), (256, 64, 8),
           (64, 256, 8), (128, 64, 8)]
SHAPES = [(16384, 14336), (14336, 4096), (16384, 4096)]


def main():
    for M, N in SHAPES:
        x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        for mode in ("row", "col", "both"):
            nbytes = 2 * x.numel() * 2 + x.numel() * (2 if mode == "both" else 1)
            cells = []
            for bm, bn, nw in CONFIGS:
                def call():
                    quantize_triton(x, torch.float8_e4m3fn, mode, block_m=bm, block_n=bn, num_warps=nw)
                call()  # compile outside the timing
                ms = triton.testing.do_bench_cudagraph(call, rep=60)
                cells.append(f"{bm}x{bn}w{nw}:{ms * 1e3:.0f}us/{nbytes / ms / 1e9:.2f}")
            print(M, N, mode, " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
