"""Blockwise quantization kernel: ours vs torch.compile of the reference and torchao's kernels, vs
copy bandwidth.

    python benchmarks/kernels_blockwise.py [--out results/kernels_blockwise.jsonl] [--sweep [--sweep-only I ...]]
        [--no-compile] [--shapes MxN ...] [--modes MODE ...]

Modes, with the bytes each must move (what the bandwidth figure counts; scales, 4 bytes per 128
elements or fewer, are left out):
    act_row     1 x 128 strips, row-major data (the forward input, grad_output without a weight
                gradient): one read of x, one write of float8 data
    act_both    1 x 128 strips row-major and 128 x 1 strips column-major (the forward input and
                grad_output of a layer that needs both): one read, two writes
    act_col     128 x 1 strips column-major alone (backward's input where forward kept none): one
                read, one write
    weight_row  128 x 128 tiles, row-major (forward's weight): one read, one write
    weight_col  128 x 128 tiles, column-major (backward's weight): one read, one write
torchao's column (torchao.prototype.blockwise_fp8_training.kernels, its eager Float8BlockwiseLinear's
kernels) does the same work with its own kernels: act_both as two of them (two reads).
"""

import argparse

import torch

from tools.common import gpu_ms, kernel_benchmark_start, write_rows
from f8tensor.kernels import quantize_blockwise_ref
from f8tensor.kernels.blockwise import COL_STRIPS_BLOCK_N, block_cast_triton

SHAPES = [(16384, 4096), (16384, 14336), (14336, 4096), (4096, 14336), (16384, 1024), (1024, 4096)]
MODES = {"act_row": (False, True, False), "act_both": (False, True, True), "act_col": (False, False, True),
         "weight_row": (True, True, False), "weight_col": (True, False, True)}  # (square, row, col)
SWEEP = [dict(num_warps=4), dict(num_warps=16), dict(block_m=32, num_warps=4), dict(block_m=64, num_warps=8),
         dict(sub_m=32, sub_n=64), dict(sub_m=64, sub_n=32), dict(sub_m=128, sub_n=128), dict(sub_n=64, num_warps=8),
         dict(sub_n=32), dict(sub_n=128), dict(block_n=16, num_warps=2), dict(block_n=32, num_warps=2),
         dict(block_n=32, num_warps=4), dict(block_n=64, num_warps=4), dict(block_n=64, num_warps=2),
         # the column strips stored four rows' bytes to a word (appended: earlier data files number the above)
         dict(packed=True), dict(packed=True, num_warps=2), dict(packed=True, num_warps=8),
         dict(packed=True, sub_m=32, sub_n=32), dict(packed=True, sub_m=64, sub_n=32),
         dict(packed=True, block_n=32, num_warps=2), dict(packed=True, block_n=64, num_warps=4),
         dict(packed=False),
         # columns per load of the word store's column slices (default COL_VEC)
         dict(col_vec=2), dict(col_vec=8), dict(col_vec=2, num_warps=8), dict(col_vec=4, num_warps=8),
         # each slice's loads ahead of the last slice's stores (both layouts, word store)
         dict(loads_ahead=True), dict(loads_ahead=True, num_warps=8), dict(loads_ahead=True, col_vec=2),
         dict(loads_ahead=True, col_vec=2, num_warps=8),
         # slice by slice (the default before c2cbada; indices 31-42 of the 127c606 sweep were other, removed options)
         dict(loads_ahead=False), dict(loads_ahead=False, col_vec=2, num_warps=8),
         # loads ahead with registers capped (more programs per SM), or programs numbered along rows of tiles
         dict(loads_ahead=True, max_registers=128), dict(loads_ahead=True, num_warps=8, max_registers=80),
         dict(loads_ahead=True, num_warps=8, max_registers=64), dict(loads_ahead=True, columns_first=True),
         dict(loads_ahead=True, columns_first=True, max_registers=128)]


def applies(cfg: dict, mode: str, M: int) -> bool:
    """Whether a sweep configuration's options apply to the cast `mode` of an input of M rows (column
    slices no wider than the column strips' programs; packed=True and col_vec where M is a multiple
    of 4, as block_cast_triton requires)."""
    return not ("block_m" in cfg and mode != "act_row" or "sub_m" in cfg and mode != "act_both"
                or "sub_n" in cfg and mode not in ("act_both", "act_col")
                or "block_n" in cfg and mode != "act_col"
                or "packed" in cfg and (mode not in ("act_both", "act_col") or cfg["packed"] and M % 4)
                or "col_vec" in cfg and (mode not in ("act_both", "act_col") or M % 4)
                or ("loads_ahead" in cfg or "columns_first" in cfg) and (mode != "act_both" or M % 4)
                or mode == "act_col" and cfg.get("sub_n", 0) > cfg.get("block_n", COL_STRIPS_BLOCK_N))


def ours(x, mode, **opts):
    square, row, col = MODES[mode]
    return lambda: block_cast_triton(x, torch.float8_e4m3fn, square=square, write_row=row, write_col=col, **opts)


def reference(x, mode):
    """The same work in plain PyTorch (layouts as the reference makes them): what torch.compile makes of it."""
    square, row, col = MODES[mode]

    def run(x):
        out = []
        if row:
            out.append(quantize_blockwise_ref(x, torch.float8_e4m3fn, (128, 128) if square else (1, 128)))
        if col:
            data, scale = quantize_blockwise_ref(x, torch.float8_e4m3fn, (128, 128) if square else (128, 1))
            out.append((data.t().contiguous(), scale))
        return out
    compiled = torch.compile(run, dynamic=False)
    return lambda: compiled(x)


def torchao(x, mode):
    try:
        from torchao.prototype.blockwise_fp8_training import kernels as k
    except ImportError:
        return None
    if mode == "act_row":
        return lambda: k.triton_fp8_blockwise_act_quant_lhs(x, 128)
    if mode == "act_both":
        return lambda: (k.triton_fp8_blockwise_act_quant_lhs(x, 128), k.triton_fp8_blockwise_act_quant_rhs(x, 128))
    if mode == "act_col":
        return lambda: k.triton_fp8_blockwise_act_quant_rhs(x, 128)
    if mode == "weight_row":
        return lambda: k.triton_fp8_blockwise_weight_quant_transposed_rhs(x, block_size=128)
    return lambda: k.triton_fp8_blockwise_weight_quant_rhs(x, block_size=128)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--shapes", nargs="+", help="MxN shapes to run (default: all of SHAPES)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), help="casts to run (default: all of MODES)")
    ap.add_argument("--sweep-only", nargs="+", type=int, metavar="I",
                    help="with --sweep, only these SWEEP configurations (indices)")
    args, env, copy_bw = kernel_benchmark_start("kernels_blockwise", ap)
    torch._dynamo.config.recompile_limit = 1000
    rows = []
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    for M, N in shapes:
        x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        for mode in args.modes or MODES:
            writes = 2 if mode == "act_both" else 1
            nbytes = (x.element_size() + writes) * x.numel()
            gpu = gpu_ms(ours(x, mode))
            row = dict(env, bench="kernels_blockwise", shape=f"{M}x{N}", mode=mode, bytes=nbytes, copy_tbps=copy_bw,
                       ours_gpu_ms=gpu, ours_pct_copy=100 * nbytes / gpu / 1e9 / copy_bw)
            if not args.no_compile:
                row["compile_gpu_ms"] = gpu_ms(reference(x, mode))
                row["ours_vs_compile"] = row["compile_gpu_ms"] / gpu
            theirs = torchao(x, mode)
            if theirs is not None:
                try:
                    row["torchao_gpu_ms"] = gpu_ms(theirs)
                    row["ours_vs_torchao"] = row["torchao_gpu_ms"] / gpu
                except Exception as e:  # noqa: BLE001  (recorded: a prototype's kernels may refuse a shape)
                    row["torchao_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if args.sweep:
                for i, cfg in enumerate(SWEEP):
                    if not applies(cfg, mode, M) or args.sweep_only and i not in args.sweep_only:
                        continue
                    row[f"sweep{i}_gpu_ms"] = gpu_ms(ours(x, mode, **cfg))
            rows.append(row)
            write_rows(args.out, [row])  # row by row: a run stopped at its time limit keeps what it measured
            extra = "".join(f" {k}={v:.3f}" for k, v in row.items()
                            if k.endswith("_ms") or k.startswith("ours_vs"))
            print(f"{M:>6}x{N:<6} {mode:<10} {row['ours_pct_copy']:.0f}% copy{extra}"
                  f"{' ' + row['torchao_error'] if 'torchao_error' in row else ''}", flush=True)
        del x
    if args.sweep:
        for i, cfg in enumerate(SWEEP):
            times = [r[f"sweep{i}_gpu_ms"] / r["ours_gpu_ms"] for r in rows if f"sweep{i}_gpu_ms" in r]
            if times:  # (a configuration may apply to none of the shapes run)
                print(f"{cfg}: mean time vs default {sum(times) / len(times):.3f}")


if __name__ == "__main__":
    main()
