"""Fused SwiGLU gate benchmark: f8tensor.swiglu's kernels vs what eager PyTorch runs in their place.

    python benchmarks/swiglu.py [--out results/swiglu.jsonl] [--sweep]

Forward: ours = one pass writing h and its amax record; eager = silu, mul, then the amax pass a
Float8Linear runs on h (our amax kernel); compiled = torch.compile of the reference plus amax
(inductor's fusion). Backward: ours = one pass writing grad_a, grad_b and their records; eager =
what autograd runs for F.silu(a) * b (two muls, silu's backward) plus the two amax passes (our amax
kernel). GPU times (CUDA graph replay); bytes: those the fused pass must move (forward 2 reads + 1
write, backward 3 reads + 2 writes), as a fraction of the copy bandwidth measured in the same run.
Halves (`halves_*`): the same passes over the two halves of one y [tokens, 2 ffn] read in place
(f8tensor.swiglu_halves, Phi-3's and GLM's gate_up output), backward writing one dy of y's shape;
eager there is the chunk's views, the same ops, and the concatenation the chunk's backward makes.
"""

import torch
import torch.nn.functional as F

from tools.common import gpu_ms, kernel_benchmark_start, write_rows
from f8tensor.kernels import swiglu_ref
from f8tensor.kernels.amax import amax_partials
from f8tensor.kernels.op import amax_of_bits
from f8tensor.kernels.quantize import default_num_programs
from f8tensor.kernels.swiglu import (swiglu_backward_triton, swiglu_halves_backward_triton, swiglu_halves_triton,
                                     swiglu_triton)

# [tokens, ffn]: Llama-3-8B's gate at 8192 and 16384 tokens, 70B's at 8192, a small one.
SHAPES = [(8192, 14336), (16384, 14336), (8192, 28672), (4096, 4096)]
SWEEP = [dict(block=1024, num_warps=4), dict(block=2048, num_warps=4), dict(block=2048, num_warps=8),
         dict(block=4096, num_warps=8), dict(block=8192, num_warps=8)]


def amax_pass(t):
    """The amax pass Float8Linear runs on a tensor it did not get a record for (our amax kernel)."""
    return amax_partials(t.view(-1, t.shape[-1]), num_programs=default_num_programs(t.device))


def eager_forward(a, b):
    h = F.silu(a) * b
    return h, amax_pass(h)


def eager_backward(g, a, b, silu_a):
    grad_b = g * silu_a
    grad_a = torch.ops.aten.silu_backward(g * b, a)
    return grad_a, grad_b, amax_pass(grad_a), amax_pass(grad_b)


def compiled_forward(a, b):
    h = swiglu_ref(a, b)
    return h, amax_of_bits(h)


def main():
    args, env, copy_bw = kernel_benchmark_start("swiglu")
    compiled = torch.compile(compiled_forward, dynamic=False)
    rows = []
    for M, N in SHAPES:
        a, b, g = (torch.randn(M, N, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        silu_a = F.silu(a)
        elem = a.numel() * a.element_size()
        fwd_bytes, bwd_bytes = 3 * elem, 5 * elem
        row = dict(env, bench="swiglu", shape=f"{M}x{N}", copy_tbps=copy_bw, fwd_bytes=fwd_bytes,
                   bwd_bytes=bwd_bytes)
        row["fwd_ms"] = gpu_ms(lambda: swiglu_triton(a, b))
        row["bwd_ms"] = gpu_ms(lambda: swiglu_backward_triton(g, a, b))
        row["eager_fwd_ms"] = gpu_ms(lambda: eager_forward(a, b))
        row["eager_bwd_ms"] = gpu_ms(lambda: eager_backward(g, a, b, silu_a))
        row["compiled_fwd_ms"] = gpu_ms(lambda: compiled(a, b))
        row["fwd_pct_copy"] = 100 * fwd_bytes / row["fwd_ms"] / 1e9 / copy_bw
        row["bwd_pct_copy"] = 100 * bwd_bytes / row["bwd_ms"] / 1e9 / copy_bw
        y = torch.cat((a, b), dim=-1)
        y_gate, y_up = y.chunk(2, dim=-1)
        row["halves_fwd_ms"] = gpu_ms(lambda: swiglu_halves_triton(y))
        row["halves_bwd_ms"] = gpu_ms(lambda: swiglu_halves_backward_triton(g, y))
        row["halves_eager_fwd_ms"] = gpu_ms(lambda: eager_forward(y_gate, y_up))
        row["halves_eager_bwd_ms"] = gpu_ms(lambda: torch.cat(eager_backward(g, y_gate, y_up, silu_a)[:2], dim=-1))
        row["halves_fwd_pct_copy"] = 100 * fwd_bytes / row["halves_fwd_ms"] / 1e9 / copy_bw
        row["halves_bwd_pct_copy"] = 100 * bwd_bytes / row["halves_bwd_ms"] / 1e9 / copy_bw
        del y, y_gate, y_up
        if args.sweep:
            for cfg in SWEEP:
                tag = f"b{cfg['block']}w{cfg['num_warps']}"
                row[f"sweep_fwd_{tag}_ms"] = gpu_ms(lambda: swiglu_triton(a, b, **cfg))
                row[f"sweep_bwd_{tag}_ms"] = gpu_ms(lambda: swiglu_backward_triton(g, a, b, **cfg))
        rows.append(row)
        print(f"{M:>6}x{N:<6} fwd {row['fwd_ms']:.3f} ms ({row['fwd_pct_copy']:.0f}% copy) eager "
              f"{row['eager_fwd_ms']:.3f} compiled {row['compiled_fwd_ms']:.3f} | bwd {row['bwd_ms']:.3f} ms "
              f"({row['bwd_pct_copy']:.0f}% copy) eager {row['eager_bwd_ms']:.3f} | halves fwd "
              f"{row['halves_fwd_ms']:.3f} ({row['halves_fwd_pct_copy']:.0f}%) bwd {row['halves_bwd_ms']:.3f} "
              f"({row['halves_bwd_pct_copy']:.0f}%) eager {row['halves_eager_fwd_ms']:.3f} / "
              f"{row['halves_eager_bwd_ms']:.3f}"
              + "".join(f" {k}={v:.3f}" for k, v in row.items() if k.startswith("sweep")), flush=True)
        del a, b, g, silu_a
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
