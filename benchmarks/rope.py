"""Fused RoPE benchmark: f8tensor.rope's kernel vs eager PyTorch's rotate_half code and inductor's.

    python benchmarks/rope.py [--out results/rope.jsonl] [--sweep]

Shapes: q and k of the Llama-3-8B-shaped training benchmark (batch 2, 4096 positions, 32 and 8
heads of 128). rotate_half rows: laid out as Hugging Face's Llama makes them, [B, H, S, D] views
of the projections' [B, S, H, D] output, with [S, D] bf16 tables; eager = x * cos + cat(-x2, x1) *
sin. interleaved rows: torchtitan's layout, contiguous [B, S, H, D] with [S, 1, D] fp32 tables;
eager = torchtitan's complex multiply (fp32 copy, multiply by freqs_cis, copy back). Forward: ours
= one pass; compiled = torch.compile of eager's code. Backward: ours = one pass; eager = what
autograd runs for eager's formula (timed as forward + backward minus forward). GPU times (CUDA
graph replay); bytes: the read and the write of x (the tables stay in L2), as a fraction of the
copy bandwidth measured in the same run.
"""

import torch

from tools.common import gpu_ms, kernel_benchmark_start, write_rows
from f8tensor.kernels.rope import rope_triton

SHAPES = [(2, 32, 4096, 128), (2, 8, 4096, 128), (4, 64, 8192, 128)]  # [B, H, S, D]
SWEEP = [dict(block_elements=e, num_warps=w) for e in (1024, 2048, 4096, 8192) for w in (2, 4, 8)]


def eager(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def eager_complex(x, freqs_cis):
    """torchtitan's apply_rotary_emb for one tensor: x [B, S, H, D], freqs_cis [S, 1, D / 2]."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(3).type_as(x)


def cases(B, H, S, D):
    """(form, x, g, tables for ours, eager's function and its table arguments) of one shape."""
    x = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(S, D // 2, device="cuda") * 6.3
    half = torch.cat([angles, angles], dim=-1)
    yield "rotate_half", x.transpose(1, 2), g.transpose(1, 2), (half.cos().bfloat16(), half.sin().bfloat16()), \
        eager, (half.cos().bfloat16(), half.sin().bfloat16())
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    tables = tuple(t.repeat_interleave(2, dim=-1) for t in (freqs_cis.real, freqs_cis.imag))
    yield "interleaved", x, g, tables, eager_complex, (freqs_cis,)


def main():
    args, env, copy_bw = kernel_benchmark_start("rope")
    rows = []
    for B, H, S, D in SHAPES:
        for form, x, g, (cos, sin), eager_fn, eager_args in cases(B, H, S, D):
            interleaved = form == "interleaved"
            compiled = torch.compile(eager_fn, dynamic=False)
            xg = x.detach().requires_grad_()
            nbytes = 2 * x.numel() * x.element_size()
            row = dict(env, bench="rope", form=form, shape=f"{B}x{H}x{S}x{D}", copy_tbps=copy_bw, bytes=nbytes)
            ours = dict(interleaved=interleaved)
            back = dict(backward=True, out_strides=x.stride(), interleaved=interleaved)
            row["fwd_ms"] = gpu_ms(lambda: rope_triton(x, cos, sin, **ours))
            row["bwd_ms"] = gpu_ms(lambda: rope_triton(g, cos, sin, **back))
            row["eager_fwd_ms"] = gpu_ms(lambda: eager_fn(x, *eager_args))
            row["eager_bwd_ms"] = gpu_ms(lambda: torch.autograd.grad(eager_fn(xg, *eager_args), xg, g)) - row["eager_fwd_ms"]
            row["compiled_fwd_ms"] = gpu_ms(lambda: compiled(x, *eager_args))
            row["fwd_pct_copy"] = 100 * nbytes / row["fwd_ms"] / 1e9 / copy_bw
            row["bwd_pct_copy"] = 100 * nbytes / row["bwd_ms"] / 1e9 / copy_bw
            if args.sweep:
                for cfg in SWEEP:
                    tag = f"e{cfg['block_elements']}w{cfg['num_warps']}"
                    row[f"sweep_fwd_{tag}_ms"] = gpu_ms(lambda: rope_triton(x, cos, sin, **ours, **cfg))
                    row[f"sweep_bwd_{tag}_ms"] = gpu_ms(lambda: rope_triton(g, cos, sin, **back, **cfg))
            rows.append(row)
            print(f"{form:<12}{row['shape']:>16} fwd {row['fwd_ms']:.3f} ms ({row['fwd_pct_copy']:.0f}% copy) eager "
                  f"{row['eager_fwd_ms']:.3f} compiled {row['compiled_fwd_ms']:.3f} | bwd {row['bwd_ms']:.3f} ms "
                  f"({row['bwd_pct_copy']:.0f}% copy) eager {row['eager_bwd_ms']:.3f}"
                  + "".join(f" {k}={v:.3f}" for k, v in row.items() if k.startswith("sweep")), flush=True)
        del x, g, xg
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
