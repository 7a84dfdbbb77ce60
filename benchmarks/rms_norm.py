"""Fused RMSNorm benchmark: f8tensor.RMSNorm's kernels vs what eager PyTorch runs in their place.

    python benchmarks/rms_norm.py [--out results/rms_norm.jsonl] [--sweep]

Forward: ours = one pass writing y, rstd and the amax record of y; eager = PyTorch's fused
rms_norm, then the amax pass a Float8Linear runs on y (our amax kernel); compiled = torch.compile
of F.rms_norm plus the amax (inductor's fusion). Backward: ours = one pass writing dx and partial
weight gradients, plus their sum; eager = PyTorch's fused rms_norm backward (dx and dweight).
GPU times (CUDA graph replay); bytes: those a fused pass must move (forward 1 read + 1 write,
backward 2 reads + 1 write), as a fraction of the copy bandwidth measured in the same run. Also
checked: ours against the reference and against PyTorch's kernel, in units in the last place.
"""

import torch
import torch.nn.functional as F

from tools.common import gpu_ms, kernel_benchmark_start, write_rows
from f8tensor.kernels import rms_norm_backward_ref, rms_norm_ref
from f8tensor.kernels.amax import amax_partials
from f8tensor.kernels.op import amax_of_bits
from f8tensor.kernels.quantize import default_num_programs
from f8tensor.kernels.rms_norm import rms_norm_backward_triton, rms_norm_triton

# [tokens, dim]: Llama-3-8B at 2 x 4096 tokens, a 1B shape at 4 x 4096, 70B at 8192, a wide one.
SHAPES = [(8192, 4096), (16384, 2048), (8192, 8192), (4096, 16384)]
SWEEP = [dict(rows=r, num_warps=w, programs_per_sm=p) for r, w in ((1, 4), (1, 8), (2, 8), (1, 16))
         for p in (2, 4, 8, 16)]
EPS = 1e-5


def amax_pass(t):
    """The amax pass Float8Linear runs on a tensor it did not get a record for (our amax kernel)."""
    return amax_partials(t.view(-1, t.shape[-1]), num_programs=default_num_programs(t.device))


def eager_forward(x, w):
    y = F.rms_norm(x, (x.shape[-1],), w, EPS)
    return y, amax_pass(y)


def compiled_forward(x, w):
    y = F.rms_norm(x, (x.shape[-1],), w, EPS)
    return y, amax_of_bits(y)


def ulps(out, ref):
    """Largest difference in units in the last place of ref's dtype, and the count that differ."""
    o, r = out.view(torch.int16).int(), ref.view(torch.int16).int()
    return int((o - r).abs().max()), int((o != r).sum())


def main():
    args, env, copy_bw = kernel_benchmark_start("rms_norm")
    compiled = torch.compile(compiled_forward, dynamic=False)
    rows = []
    for M, D in SHAPES:
        x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        w = (1 + 0.1 * torch.randn(D, device="cuda")).to(torch.bfloat16)
        g = torch.randn(M, D, device="cuda", dtype=torch.bfloat16) * 1e-3
        y, rstd, _ = rms_norm_triton(x, w, EPS)
        # PyTorch's backward kernel takes its own rstd (the same values up to rsqrt's rounding).
        _, rstd_pt = torch.ops.aten._fused_rms_norm(x, [D], w, EPS)
        elem = x.numel() * x.element_size()
        fwd_bytes, bwd_bytes = 2 * elem, 3 * elem
        row = dict(env, bench="rms_norm", shape=f"{M}x{D}", copy_tbps=copy_bw, fwd_bytes=fwd_bytes,
                   bwd_bytes=bwd_bytes)
        y_ref, _ = rms_norm_ref(x, w, EPS)
        row["fwd_ulps_vs_ref"], row["fwd_differ_vs_ref"] = ulps(y, y_ref)
        row["fwd_ulps_vs_torch"], row["fwd_differ_vs_torch"] = ulps(y, F.rms_norm(x, (D,), w, EPS))
        dx, dw = rms_norm_backward_triton(g, x, w, rstd)
        dx_ref, dw_ref = rms_norm_backward_ref(g, x, w, rstd)
        row["bwd_ulps_vs_ref"], row["bwd_differ_vs_ref"] = ulps(dx, dx_ref)
        row["dw_ulps_vs_ref"], _ = ulps(dw, dw_ref)
        row["fwd_ms"] = gpu_ms(lambda: rms_norm_triton(x, w, EPS))
        row["bwd_ms"] = gpu_ms(lambda: rms_norm_backward_triton(g, x, w, rstd))
        row["eager_fwd_ms"] = gpu_ms(lambda: eager_forward(x, w))
        row["eager_norm_only_fwd_ms"] = gpu_ms(lambda: F.rms_norm(x, (D,), w, EPS))
        row["eager_bwd_ms"] = gpu_ms(lambda: torch.ops.aten._fused_rms_norm_backward(
            g, x, [D], rstd_pt, w, [True, True]))
        row["compiled_fwd_ms"] = gpu_ms(lambda: compiled(x, w))
        row["fwd_pct_copy"] = 100 * fwd_bytes / row["fwd_ms"] / 1e9 / copy_bw
        row["bwd_pct_copy"] = 100 * bwd_bytes / row["bwd_ms"] / 1e9 / copy_bw
        if args.sweep:
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            for cfg in SWEEP:
                if cfg["rows"] * D > 16384:
                    continue
                tag = f"r{cfg['rows']}w{cfg['num_warps']}p{cfg['programs_per_sm']}"
                kw = dict(rows=cfg["rows"], num_warps=cfg["num_warps"], num_programs=cfg["programs_per_sm"] * sms)
                row[f"sweep_fwd_{tag}_ms"] = gpu_ms(lambda: rms_norm_triton(x, w, EPS, **kw))
                row[f"sweep_bwd_{tag}_ms"] = gpu_ms(lambda: rms_norm_backward_triton(g, x, w, rstd, **kw))
        rows.append(row)
        print(f"{M:>6}x{D:<6} fwd {row['fwd_ms']:.3f} ms ({row['fwd_pct_copy']:.0f}% copy) eager+amax "
              f"{row['eager_fwd_ms']:.3f} (norm {row['eager_norm_only_fwd_ms']:.3f}) compiled "
              f"{row['compiled_fwd_ms']:.3f} | bwd {row['bwd_ms']:.3f} ms ({row['bwd_pct_copy']:.0f}% copy) "
              f"eager {row['eager_bwd_ms']:.3f} | ulps fwd ref {row['fwd_ulps_vs_ref']} "
              f"({row['fwd_differ_vs_ref']}) torch {row['fwd_ulps_vs_torch']} ({row['fwd_differ_vs_torch']}) "
              f"bwd ref {row['bwd_ulps_vs_ref']} ({row['bwd_differ_vs_ref']}) dw {row['dw_ulps_vs_ref']}"
              + "".join(f" {k}={v:.3f}" for k, v in row.items() if k.startswith("sweep")), flush=True)
        del x, g, y, rstd, dx, dw
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
