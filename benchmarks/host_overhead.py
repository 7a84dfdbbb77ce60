"""Host (CPU) time per call of the quantization entry point and of a small Float8Linear fwd+bwd.

    python benchmarks/host_overhead.py [--profile]

The fused ops (RMSNorm, SwiGLU gate, RoPE) are timed beside the PyTorch code they replace, and
stacks of layers give a layer's host time in steady state (`stack_cases`).

Eager training is fast only if the CPU issues kernels faster than the GPU runs them; on small
layers the host time is the bound. Shapes are tiny so that the GPU never holds the CPU back. The
quantizations are timed twice: replaying their recorded plans (kernels/launch.py), and through
Triton's own launch path.
"""

import argparse
import cProfile
import pstats

import torch

import f8tensor.kernels.quantize as quantize_module
from f8tensor import Float8Config, Float8Linear, RMSNorm, rope, swiglu, to_float8
from f8tensor.kernels.quantize import quantize_triton
from tools.common import host_us


def rotate_half(x):
    """Hugging Face's rotate_half, as the model code writes it."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def fused_op_cases(device="cuda") -> dict:
    """The fused ops against the PyTorch they replace, forward + backward at small sizes (a batch
    of 256 tokens, 256 wide; RoPE on 8 heads of 64): where host time, not the GPU, is the bound."""
    h = torch.randn(256, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    a, b = (torch.randn(256, 256, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    ours, theirs = (cls(256, device=device, dtype=torch.bfloat16) for cls in (RMSNorm, torch.nn.RMSNorm))
    q = torch.randn(1, 8, 256, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    angles = torch.randn(256, 32, device=device)
    cos, sin = (f(torch.cat((angles, angles), -1)).bfloat16() for f in (torch.cos, torch.sin))
    return {
        "f8tensor.RMSNorm fwd+bwd": lambda: ours(h).sum().backward(),
        "nn.RMSNorm fwd+bwd": lambda: theirs(h).sum().backward(),
        "f8tensor.swiglu fwd+bwd": lambda: swiglu(a, b).sum().backward(),
        "silu(a) * b fwd+bwd": lambda: (torch.nn.functional.silu(a) * b).sum().backward(),
        "f8tensor.rope fwd+bwd": lambda: rope(q, cos, sin).sum().backward(),
        "rotate_half RoPE fwd+bwd": lambda: (q * cos + rotate_half(q) * sin).sum().backward(),
    }


STACK = 8  # layers per stack


def stack_cases(device="cuda") -> dict:
    """STACK layers of 256 x 256 in sequence, forward + backward, as one call: its host time / STACK
    is a layer's cost in steady state. A single layer's backward starts and ends on autograd's device
    thread, so its time holds that hand-over (once per backward pass of a model, not per layer)."""
    x = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    stacks = {name: torch.nn.Sequential(*(cls(256, 256, bias=False, device=device, dtype=torch.bfloat16)
                                          for _ in range(STACK)))
              for name, cls in (("Float8Linear", Float8Linear), ("nn.Linear", torch.nn.Linear))}
    return {f"{name} x{STACK} fwd+bwd": (lambda m=m: m(leaf(x)).sum().backward()) for name, m in stacks.items()}


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A new input each call, as a new activation each step: Float8Linear reuses the cast of an input
    it has cast already (q, k and v share theirs), which would leave the cast out of its time."""
    return x.detach().requires_grad_()


class _ThreeGemms(torch.autograd.Function):
    """One GEMM in forward and two in backward, as a linear layer's, with nothing else: the host
    cost of a GEMM kind where the layer calls it (backward runs on autograd's device thread)."""

    @staticmethod
    def forward(ctx, x, gemm):
        ctx.gemm = gemm
        return gemm()

    @staticmethod
    def backward(ctx, grad):
        ctx.gemm()
        ctx.gemm()
        return None, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    lin = Float8Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16)
    kept = Float8Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16,
                        config=Float8Config(keep_fp8_weight=True))
    a8, b8 = x.to(torch.float8_e4m3fn), x.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    g8 = x.to(torch.float8_e5m2)

    def scaled():
        return torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16)
    cases = {
        "quantize_triton row": lambda: quantize_triton(x, torch.float8_e4m3fn, "row"),
        "quantize_triton both": lambda: quantize_triton(x, torch.float8_e4m3fn, "both"),
        "to_float8 both": lambda: to_float8(x, layout="both"),
        "torch.empty x3": lambda: [torch.empty(256, 256, device="cuda") for _ in range(3)],
        "Float8Linear fwd+bwd": lambda: lin(leaf(x)).sum().backward(),
        "nn.Linear fwd+bwd (bf16)": lambda: torch.nn.functional.linear(leaf(x), lin.weight).sum().backward(),
        # forward alone (its graph is built, then dropped), and with the weight's float8 copies kept
        "Float8Linear fwd": lambda: lin(leaf(x)),
        "nn.Linear fwd (bf16)": lambda: torch.nn.functional.linear(leaf(x), lin.weight),
        "Float8Linear fwd+bwd, keep_fp8_weight": lambda: kept(leaf(x)).sum().backward(),
        # the floor under the layer's three GEMMs: PyTorch's own per-call cost of each kind of GEMM
        "torch._scaled_mm x3": lambda: [torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16)
                                        for _ in range(3)],
        "torch.mm x3 (bf16)": lambda: [torch.mm(x, x) for _ in range(3)],
        # the same GEMMs as the layer calls them: fast accumulation (forward), e5m2 x e4m3 (backward),
        # and one in forward and two in an autograd backward
        "torch._scaled_mm x3, fast accum": lambda: [
            torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True) for _ in range(3)],
        "torch._scaled_mm x3, e5m2 x e4m3": lambda: [
            torch._scaled_mm(g8, b8.t(), one, one, out_dtype=torch.bfloat16) for _ in range(3)],
        "_scaled_mm 1 fwd + 2 bwd (autograd)": lambda: _ThreeGemms.apply(leaf(x), scaled).sum().backward(),
        "torch.mm 1 fwd + 2 bwd (autograd)": lambda: _ThreeGemms.apply(leaf(x), lambda: torch.mm(x, x)).sum().backward(),
        **fused_op_cases(),
    }
    for name, fn in cases.items():
        print(f"{name:<40} {host_us(fn):8.1f} us per call")
    stacked = {name: host_us(fn, 50) / STACK for name, fn in stack_cases().items()}
    for name, us in stacked.items():
        print(f"{name:<40} {us:8.1f} us per layer")
    f8, bf16 = stacked.values()
    print(f"{'per layer in a stack: Float8Linear / nn.Linear':<40} {f8 / bf16:8.2f}")
    # The same quantizations through Triton's own launch path: what the recorded plans spare.
    direct = quantize_module.relaunch_possible
    quantize_module.relaunch_possible = lambda: False
    try:
        for layout in ("row", "both"):
            fn = lambda: quantize_triton(x, torch.float8_e4m3fn, layout)  # noqa: E731
            print(f"{'quantize_triton ' + layout + ', Triton launch path':<40} {host_us(fn):8.1f} us per call")
    finally:
        quantize_module.relaunch_possible = direct
    if args.profile:
        fn = cases["Float8Linear fwd+bwd"]
        with cProfile.Profile() as prof:
            for _ in range(200):
                fn()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
