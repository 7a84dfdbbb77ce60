"""Fused cross-entropy benchmark: f8tensor.cross_entropy's kernels vs the written loss
F.cross_entropy(logits.float(), target) in eager PyTorch and under torch.compile.

    python benchmarks/cross_entropy.py [--out results/cross_entropy.jsonl] [--sweep]

Kernels alone (CUDA graph replay, no host time): forward reads the logits once (bytes: N V of the
logits' dtype), backward reads them and writes their gradient (twice that); as a fraction of the
copy bandwidth measured in the same run. Forward + backward through autograd (`triton.testing.do_bench`,
a fresh gradient each call): ours, the written loss eager, and torch.compile of the written loss
(what torchtitan compiles), with the peak memory each allocates beyond the logits.
"""

import torch
import torch.nn.functional as F

from tools.common import bench_ms, gpu_ms, kernel_benchmark_start, peak_mib, write_rows
from f8tensor import cross_entropy
from f8tensor.kernels.cross_entropy import cross_entropy_backward_triton, cross_entropy_forward_triton

# [tokens, vocab]: Llama 3 at batch 2 x 4096 and 4 x 4096, Qwen2's vocabulary, a 32 K vocabulary
SHAPES = [(8192, 128256), (16384, 128256), (8192, 151936), (8192, 32000)]
SWEEP = [dict(block_v=b, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)]


def written(x, t):
    return F.cross_entropy(x.float(), t)


def fwd_bwd(loss_fn, x, t):
    def step():
        torch.autograd.grad(loss_fn(x, t), x)
    return step


def main():
    args, env, copy_bw = kernel_benchmark_start("cross_entropy")
    compiled = torch.compile(written, dynamic=False)
    rows = []
    for N, V in SHAPES:
        x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).mul_(4).requires_grad_()
        t = torch.randint(0, V, (N,), device="cuda")
        loss, lse = cross_entropy_forward_triton(x.detach(), t, -100)
        g = torch.tensor(1.0 / N, device="cuda")
        nbytes = x.numel() * x.element_size()
        row = dict(env, bench="cross_entropy", shape=f"{N}x{V}", dtype="bfloat16", copy_tbps=copy_bw)
        row["fwd_ms"] = gpu_ms(lambda: cross_entropy_forward_triton(x.detach(), t, -100))
        row["bwd_ms"] = gpu_ms(lambda: cross_entropy_backward_triton(x.detach(), t, lse, g, -100))
        row["fwd_pct_copy"] = 100 * nbytes / row["fwd_ms"] / 1e9 / copy_bw
        row["bwd_pct_copy"] = 100 * 2 * nbytes / row["bwd_ms"] / 1e9 / copy_bw
        for name, fn in (("ours", cross_entropy), ("eager", written), ("compiled", compiled)):
            step = fwd_bwd(fn, x, t)
            step()
            row[f"{name}_fwd_bwd_ms"] = bench_ms(step, rep=500)  # 500 ms: 25+ calls at the largest shape
            row[f"{name}_peak_mib"] = peak_mib(step)
            del step
        if args.sweep:
            for cfg in SWEEP:
                tag = f"b{cfg['block_v']}w{cfg['num_warps']}"
                row[f"sweep_fwd_{tag}_ms"] = gpu_ms(lambda: cross_entropy_forward_triton(x.detach(), t, -100, **cfg))
                row[f"sweep_bwd_{tag}_ms"] = gpu_ms(
                    lambda: cross_entropy_backward_triton(x.detach(), t, lse, g, -100, **cfg))
        rows.append(row)
        print(f"{N:>6}x{V:<6} fwd {row['fwd_ms']:.3f} ms ({row['fwd_pct_copy']:.0f}% copy) bwd {row['bwd_ms']:.3f} ms "
              f"({row['bwd_pct_copy']:.0f}% copy) | fwd+bwd ours {row['ours_fwd_bwd_ms']:.3f} eager "
              f"{row['eager_fwd_bwd_ms']:.3f} compiled {row['compiled_fwd_bwd_ms']:.3f} ms | peak MiB ours "
              f"{row['ours_peak_mib']:.0f} eager {row['eager_peak_mib']:.0f} compiled {row['compiled_peak_mib']:.0f}"
              + "".join(f" {k}={v:.3f}" for k, v in row.items() if k.startswith("sweep")), flush=True)
        del x, t, loss, lse, g  # (the next shape's memory starts empty)
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
