"""Accuracy of one Float8Linear against nn.Linear on Llama-3-8B's layer shapes: SQNR (dB) of the
output, the input gradient and the weight gradient, on gaussian data and with outlier channels.

    python benchmarks/sqnr.py [--tokens 8192] [--recipes tensorwise rowwise ...] [--out results/sqnr.jsonl]

Per shape (in -> out features) and input kind: x [tokens, in] bf16, weight [out, in] bf16 (std
in^-1/2), output gradient [tokens, out] bf16; the reference is nn.Linear in bf16 (fp32
accumulation), the SQNR 20 log10(|ref| / |ref - fp8|) over the whole tensor. Input kinds:
  gaussian         x ~ N(0, 1)
  outlier_channels 0.1 % of x's input channels (at least one) scaled by 100, as activation outliers
                   in LLMs are per channel
  outliers_1eN     0.4 % of x's rows (tokens) and 0.8 % of the weight's output channels scaled by
                   10^N (N = 3, 4, 5); "ordinary" SQNR: the output's other rows and columns only
--recipes: Float8Config.from_recipe_name of each (default tensorwise), each against the same bf16 layer.
--emulate: the float8 GEMMs in fp32 on the dequantized operands (Float8Config(emulate=True): the same
quantization; fp32 accumulation in another order), for a CPU run at Llama shapes.
With tensorwise scaling one amax sets the scale of the whole tensor, so an outlier channel moves
every other value down the float8 grid; the forward uses e4m3 (3 mantissa bits, ~30 dB at best for
gaussian data), the gradients e5m2 (2 mantissa bits, ~25 dB). Runs anywhere: without a GPU the
quantization runs its PyTorch reference and the GEMMs run on the CPU (slow: use fewer --tokens).
"""

import argparse
import math

import torch
from torch import nn

from tools.common import environment, write_rows
from f8tensor import Float8Config, Float8Linear

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # q/o, k/v, w1/w3, w2
KINDS = ("gaussian", "outlier_channels", "outliers_1e3", "outliers_1e4", "outliers_1e5")


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return (20 * torch.log10(ref.norm() / (ref - out).norm())).item()


def make_input(kind: str, tokens: int, k: int, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """x, and the mask of its outlier rows (none but for outliers_1eN)."""
    x = torch.randn(tokens, k, generator=g)
    rows = torch.zeros(tokens, dtype=torch.bool)
    if kind == "outlier_channels":
        channels = torch.randperm(k, generator=g)[:max(1, k // 1000)]
        x[:, channels] *= 100
    elif kind.startswith("outliers_"):
        rows[torch.randperm(tokens, generator=g)[:max(1, tokens * 4 // 1000)]] = True
        x[rows] *= float(kind.removeprefix("outliers_"))
    return x.to(device, torch.bfloat16), rows.to(device)


def make_weight(kind: str, n: int, k: int, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    chans = torch.zeros(n, dtype=torch.bool)
    if kind.startswith("outliers_"):
        chans[torch.randperm(n, generator=g)[:max(1, n * 8 // 1000)]] = True
        w[chans] *= float(kind.removeprefix("outliers_"))
    return w.to(device, torch.bfloat16), chans.to(device)


def measure(k: int, n: int, kind: str, tokens: int, device, recipes, emulate=False) -> list[dict]:
    g = torch.Generator().manual_seed(k * 7 + n)
    x, rows = make_input(kind, tokens, k, g, device)
    w, chans = make_weight(kind, n, k, g, device)
    dy = torch.randn(tokens, n, generator=g).to(device, torch.bfloat16)
    makes = {"bf16": lambda: nn.Linear(k, n, bias=False)}
    for recipe in recipes:
        makes[recipe] = lambda r=recipe: Float8Linear(
            k, n, bias=False, config=Float8Config.from_recipe_name(r).replace(emulate=emulate))
    results = {}
    for name, make in makes.items():
        with torch.device(device):
            layer = make().to(torch.bfloat16)
        with torch.no_grad():
            layer.weight.copy_(w)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(dy)
        results[name] = (out.detach(), xi.grad, layer.weight.grad)
    ref_y, ref_dx, ref_dw = results.pop("bf16")
    ordinary = ~rows[:, None] & ~chans[None, :]
    return [{"recipe": name, "in": k, "out": n, "input": kind, "tokens": tokens,
             "sqnr_output_db": sqnr(ref_y, y), "sqnr_output_ordinary_db": sqnr(ref_y[ordinary], y[ordinary]),
             "sqnr_grad_input_db": sqnr(ref_dx, dx), "sqnr_grad_weight_db": sqnr(ref_dw, dw)}
            for name, (y, dx, dw) in results.items()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default="results/sqnr.jsonl")
    ap.add_argument("--recipes", nargs="+", default=["tensorwise"])
    ap.add_argument("--emulate", action="store_true", help="fp32 GEMMs on the dequantized operands")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    print(env)
    rows = []
    print(f"{'in -> out':>14} {'input':>17} {'recipe':>19} {'output dB':>10} {'ordinary':>9} {'grad_input dB':>14} "
          f"{'grad_weight dB':>15}")
    for k, n in SHAPES:
        for kind in KINDS:
            for r in measure(k, n, kind, a.tokens, device, a.recipes, a.emulate):
                r.update(env, bench="sqnr", emulate=a.emulate)
                rows.append(r)
                print(f"{f'{k} -> {n}':>14} {kind:>17} {r['recipe']:>19} {r['sqnr_output_db']:10.1f} "
                      f"{r['sqnr_output_ordinary_db']:9.1f} {r['sqnr_grad_input_db']:14.1f} {r['sqnr_grad_weight_db']:15.1f}")
    write_rows(a.out, rows)


if __name__ == "__main__":
    main()
