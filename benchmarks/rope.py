"""Fused RoPE benchmark: f8tensor.rope's kernel vs eager PyTorch's rotate_half code and inductor's.

    python benchmarks/rope.py [--out results/rope.jsonl] [--sweep]

Shapes: q and k of the Llama-3-8B-shaped training benchmark (batch 2, 4096 positions, 32 and 8
heads of 128), laid out as Hugging Face's Llama makes them: [B, H, S, D] views of the projections'
[B, S, H, D] output, with [S, D] bf16 tables. Forward: ours = one pass; eager = x * cos +
cat(-x2, x1) * sin; compiled = torch.compile of that. Backward: ours = one pass; eager = what
autograd runs for eager's formula (timed as forward + backward minus forward). GPU times (CUDA
graph replay); bytes: the read and the write of x (the tables stay in L2), as a fraction of the
copy bandwidth measured in the same run.
"""

import argparse
import os

import torch
import triton

from common import environment_and_copy_bandwidth, write_rows
from f8tensor.kernels.rope import rope_triton

SHAPES = [(2, 32, 4096, 128), (2, 8, 4096, 128), (4, 64, 8192, 128)]
SWEEP = [dict(block_elements=e, num_warps=w) for e in (1024, 2048, 4096, 8192) for w in (2, 4, 8)]


def gpu_ms(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=100)


def eager(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/rope.jsonl")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    env, copy_bw = environment_and_copy_bandwidth()
    compiled = torch.compile(eager, dynamic=False)
    rows = []
    for B, H, S, D in SHAPES:
        x = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        g = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        angles = torch.rand(S, D, device="cuda") * 6.3
        cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
        xg = x.detach().requires_grad_()
        nbytes = 2 * x.numel() * x.element_size()
        row = dict(env, bench="rope", shape=f"{B}x{H}x{S}x{D}", copy_tbps=copy_bw, bytes=nbytes)
        row["fwd_ms"] = gpu_ms(lambda: rope_triton(x, cos, sin))
        row["bwd_ms"] = gpu_ms(lambda: rope_triton(g, cos, sin, backward=True, out_strides=x.stride()))
        row["eager_fwd_ms"] = gpu_ms(lambda: eager(x, cos, sin))
        row["eager_bwd_ms"] = gpu_ms(lambda: torch.autograd.grad(eager(xg, cos, sin), xg, g)) - row["eager_fwd_ms"]
        row["compiled_fwd_ms"] = gpu_ms(lambda: compiled(x, cos, sin))
        row["fwd_pct_copy"] = 100 * nbytes / row["fwd_ms"] / 1e9 / copy_bw
        row["bwd_pct_copy"] = 100 * nbytes / row["bwd_ms"] / 1e9 / copy_bw
        if args.sweep:
            for cfg in SWEEP:
                tag = f"e{cfg['block_elements']}w{cfg['num_warps']}"
                row[f"sweep_fwd_{tag}_ms"] = gpu_ms(lambda: rope_triton(x, cos, sin, **cfg))
                row[f"sweep_bwd_{tag}_ms"] = gpu_ms(
                    lambda: rope_triton(g, cos, sin, backward=True, out_strides=x.stride(), **cfg))
        rows.append(row)
        print(f"{row['shape']:>16} fwd {row['fwd_ms']:.3f} ms ({row['fwd_pct_copy']:.0f}% copy) eager "
              f"{row['eager_fwd_ms']:.3f} compiled {row['compiled_fwd_ms']:.3f} | bwd {row['bwd_ms']:.3f} ms "
              f"({row['bwd_pct_copy']:.0f}% copy) eager {row['eager_bwd_ms']:.3f}"
              + "".join(f" {k}={v:.3f}" for k, v in row.items() if k.startswith("sweep")), flush=True)
        del x, g, xg
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
