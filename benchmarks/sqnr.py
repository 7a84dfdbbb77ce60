"""Accuracy of one Float8Linear against nn.Linear on Llama-3-8B's layer shapes: SQNR (dB) of the
output, the input gradient and the weight gradient, on gaussian data and with outlier channels.

    python benchmarks/sqnr.py [--tokens 8192] [--out results/sqnr.jsonl]

Per shape (in -> out features) and input kind: x [tokens, in] bf16, weight [out, in] bf16 (std
in^-1/2), output gradient [tokens, out] bf16; the reference is nn.Linear in bf16 (fp32
accumulation), the SQNR 20 log10(|ref| / |ref - fp8|) over the whole tensor. Input kinds:
  gaussian         x ~ N(0, 1)
  outlier_channels 0.1 % of x's input channels (at least one) scaled by 100, as activation outliers
                   in LLMs are per channel
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
from f8tensor import Float8Linear

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # q/o, k/v, w1/w3, w2
KINDS = ("gaussian", "outlier_channels")


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return (20 * torch.log10(ref.norm() / (ref - out).norm())).item()


def make_input(kind: str, tokens: int, k: int, g: torch.Generator, device) -> torch.Tensor:
    x = torch.randn(tokens, k, generator=g)
    if kind == "outlier_channels":
        channels = torch.randperm(k, generator=g)[:max(1, k // 1000)]
        x[:, channels] *= 100
    return x.to(device, torch.bfloat16)


def measure(k: int, n: int, kind: str, tokens: int, device) -> dict:
    g = torch.Generator().manual_seed(k * 7 + n)
    x = make_input(kind, tokens, k, g, device)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(device, torch.bfloat16)
    dy = torch.randn(tokens, n, generator=g).to(device, torch.bfloat16)
    results = []
    for make in (lambda: nn.Linear(k, n, bias=False), lambda: Float8Linear(k, n, bias=False)):
        with torch.device(device):
            layer = make().to(torch.bfloat16)
        with torch.no_grad():
            layer.weight.copy_(w)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(dy)
        results.append((out.detach(), xi.grad, layer.weight.grad))
    (ref_y, ref_dx, ref_dw), (y, dx, dw) = results
    return {"in": k, "out": n, "input": kind, "tokens": tokens, "sqnr_output_db": sqnr(ref_y, y),
            "sqnr_grad_input_db": sqnr(ref_dx, dx), "sqnr_grad_weight_db": sqnr(ref_dw, dw)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default="results/sqnr.jsonl")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    print(env)
    rows = []
    print(f"{'in -> out':>14} {'input':>17} {'output dB':>10} {'grad_input dB':>14} {'grad_weight dB':>15}")
    for k, n in SHAPES:
        for kind in KINDS:
            r = {**measure(k, n, kind, a.tokens, device), **env, "bench": "sqnr"}
            rows.append(r)
            print(f"{f'{k} -> {n}':>14} {kind:>17} {r['sqnr_output_db']:10.1f} {r['sqnr_grad_input_db']:14.1f} "
                  f"{r['sqnr_grad_weight_db']:15.1f}")
    write_rows(a.out, rows)


if __name__ == "__main__":
    main()
