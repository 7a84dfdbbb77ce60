"""Linear forward+backward: bf16 nn.Linear vs f8tensor Float8Linear vs the three fp8 GEMMs alone
(vs torchao float8 eager and compiled, when torchao is importable).

    python benchmarks/linear.py [--out results/linear.jsonl] [--m 1024 4096 16384] [--profile]
                                [--recipe tensorwise | rowwise | rowwise_with_gw_hp | blockwise]

--recipe picks both libraries' recipe of that name (f8tensor's and torchao's
Float8Config / Float8LinearConfig.from_recipe_name; for blockwise, torchao 0.17's prototype
Float8BlockwiseLinear); gemms_only is timed for tensorwise only.

Times are medians of CUDA-event-timed calls (triton.testing.do_bench), taken in --rounds interleaved
rounds (bf16, f8tensor, ... then again), the median round per implementation counting; each call
is one forward and one backward of a fresh [M, K] bf16 input. Peak memory is measured over one
such call.
"""

import argparse
import copy
import os
import statistics

import torch
from torch import nn

from tools.common import bench_ms, environment, peak_mib, write_rows
from f8tensor import Float8Config, Float8Linear, GemmRole, to_float8

SHAPES = {  # (K, N): in_features -> out_features
    "llama3-8b": [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)],
    "llama3-70b": [(8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192)],
}


def fwd_bwd(mod, x, g):
    def step():
        for p in mod.parameters():
            p.grad = None
        # a new leaf each call, as a new activation each step in training: f8tensor reuses the
        # quantization of an input it has cast (q/k/v sharing one), a full view of it included
        mod(x.detach().requires_grad_()).backward(g)
    return step


def gemms_only(x, w, g):
    """The three GEMMs of a Float8Linear on pre-quantized operands: the ceiling for our casts."""
    config = Float8Config()  # same fast-accumulation choice per GEMM as Float8Linear's default
    x_row, x_col = to_float8(x, layout="both", role=GemmRole.INPUT, config=config)
    w_row, w_col = to_float8(w, layout="both", role=GemmRole.WEIGHT, config=config)
    g_row, g_col = to_float8(g, torch.float8_e5m2, layout="both", role=GemmRole.GRAD_OUTPUT, config=config)

    def step():
        torch.mm(x_row, w_row.t())
        torch.mm(g_row, w_col)
        torch.mm(g_col.t(), x_col)
    return step


def torchao_modules(lin, recipe="tensorwise"):
    if recipe == "blockwise":  # no Float8LinearConfig recipe in torchao 0.17: its prototype layer
        try:
            from torchao.prototype.blockwise_fp8_training.linear import Float8BlockwiseLinear
        except ImportError:
            return {}
        return {"torchao_eager": Float8BlockwiseLinear.from_float(copy.deepcopy(lin)),
                "torchao_compile": torch.compile(Float8BlockwiseLinear.from_float(copy.deepcopy(lin)), dynamic=False)}
    try:
        from torchao.float8 import Float8LinearConfig
        from torchao.float8 import convert_to_float8_training as ao_convert
    except ImportError:
        return {}
    config = Float8LinearConfig.from_recipe_name(recipe)
    eager = ao_convert(nn.Sequential(copy.deepcopy(lin)), config=config)
    # dynamic=False: the modules of every layer shape share one compile cache, and a second shape would
    # otherwise recompile with K symbolic (slower code than torchao compiled for one shape)
    compiled = torch.compile(ao_convert(nn.Sequential(copy.deepcopy(lin)), config=config), dynamic=False)
    return {"torchao_eager": eager, "torchao_compile": compiled}


def kernel_times(step) -> list[tuple[str, float]]:
    """Every CUDA kernel of one call of step, in launch order, with its GPU time in microseconds."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/linear.jsonl")
    ap.add_argument("--m", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the median counts")
    ap.add_argument("--torchao-compile-m", type=int, default=16384,
                    help="compile torchao only at this M (each shape recompiles)")
    ap.add_argument("--profile", action="store_true", help="list the kernels of one fwd+bwd")
    ap.add_argument("--recipe", default="tensorwise", help="both libraries' recipe of this name")
    ap.add_argument("--shapes", nargs="+", help="only these KxN layers of the models (e.g. 4096x14336)")
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    torch._dynamo.config.recompile_limit = 1000
    env = environment()
    print(env)
    rows = []
    for model in args.models:
        for K, N in SHAPES[model]:
            if args.shapes and f"{K}x{N}" not in args.shapes:
                continue
            lin = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
            ours = Float8Linear.from_float(copy.deepcopy(lin), Float8Config.from_recipe_name(args.recipe))
            others = torchao_modules(lin, args.recipe)
            for M in args.m:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
                steps = {"bf16": fwd_bwd(lin, x, g), "f8tensor": fwd_bwd(ours, x, g)}
                if args.recipe == "tensorwise":
                    steps["gemms_only"] = gemms_only(x.detach(), lin.weight.detach(), g)
                for name, mod in others.items():
                    if name == "torchao_compile" and M != args.torchao_compile_m:
                        continue
                    steps[name] = fwd_bwd(mod, x, g)
                row = dict(env, bench="linear", recipe=args.recipe, model=model, M=M, K=K, N=N)
                # Interleaved rounds, median per implementation: the fp8 GEMMs' time drifts by up
                # to +-10 % over seconds (power), and every implementation samples the same drift.
                times = {name: [] for name in steps}
                for _ in range(args.rounds):
                    for name, step in steps.items():
                        times[name].append(bench_ms(step))
                for name, step in steps.items():
                    row[f"{name}_ms"] = statistics.median(times[name])
                    row[f"{name}_round_ms"] = times[name]
                    row[f"{name}_peak_mib"] = peak_mib(step)
                for name in steps:
                    row[f"{name}_speedup"] = row["bf16_ms"] / row[f"{name}_ms"]
                rows.append(row)
                print(f"{model:<10} M={M:<6} {K:>5}->{N:<6} bf16 {row['bf16_ms']:.3f} ms  " + "  ".join(
                    f"{n} {row[f'{n}_speedup']:.2f}x" for n in steps if n != "bf16"), flush=True)
                del x, g, steps
    if args.profile:
        for K, N in [(4096, 14336), (14336, 4096)]:
            lin = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(16384, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(16384, N, device="cuda", dtype=torch.bfloat16)
            mods = {"f8tensor": Float8Linear.from_float(copy.deepcopy(lin), Float8Config.from_recipe_name(args.recipe)),
                    **torchao_modules(lin, args.recipe)}
            for name, mod in mods.items():
                kernels = kernel_times(fwd_bwd(mod, x, g))
                total = sum(us for _, us in kernels)
                print(f"{name}: {len(kernels)} kernels in one fwd+bwd (16384x{K} -> {N}), "
                      f"{total:.0f} us GPU time")
                for kname, us in kernels:
                    print(f"    {us:8.1f} us  {kname[:110]}")
                rows.append(dict(env, bench="launches", recipe=args.recipe, impl=name, M=16384, K=K, N=N, count=len(kernels),
                                 kernels=[k for k, _ in kernels], kernel_us=[us for _, us in kernels]))
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
