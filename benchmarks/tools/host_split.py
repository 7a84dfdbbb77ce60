"""Where a Float8Linear forward + backward spends host time (docs/benchmarks.md, "Host overhead").

    python benchmarks/tools/host_split.py     (writes $OUT/f8linear_trace.json, or /tmp/...)

The layer's own kernel calls (its four quantizations and three GEMMs on a 256 x 256 layer) run
(B) inline on the main thread, (C) inline on another Python thread, (A) split across an autograd
Function's forward and backward as the layer splits them; then a torch.profiler table and trace
of 20 Float8Linear forward + backward calls. Host time per call and wall time (host plus the wait
for the GPU at the end) side by side: equal, the GPU never held the CPU back.
"""
import os
import sys
import threading

import torch
from torch.profiler import ProfilerActivity, profile

from f8tensor import Float8Linear
from f8tensor.core.ops import scaled_mm_data
from f8tensor.kernels import quantize_with_amax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from host_overhead import leaf  # noqa: E402
from tools.common import host_and_wall_us  # noqa: E402

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
N = 300  # calls per timing


class LayerCalls:
    """A Float8Linear's own calls on (x, its weight, a gradient g), without the layer: forward's
    (x in both layouts, the weight row-major, the GEMM) and backward's (g in both layouts, the
    weight-gradient GEMM, the weight column-major from forward's amax, the input-gradient GEMM)."""

    def __init__(self, lin: Float8Linear, x: torch.Tensor, g: torch.Tensor):
        self.w, self.config, self.x, self.g = lin.weight.detach(), lin.config, x, g
        calls = self

        class Split(torch.autograd.Function):
            """Forward's calls in forward, backward's in backward, as the layer splits them."""

            @staticmethod
            def forward(ctx, x):
                out, *saved = calls.forward(x)
                ctx.save_for_backward(*saved)
                return out

            @staticmethod
            def backward(ctx, grad):
                return calls.backward(grad.contiguous(), *ctx.saved_tensors)[0]

        class EmptyBackward(torch.autograd.Function):
            """Forward's calls in forward, a backward that does nothing."""

            @staticmethod
            def forward(ctx, x):
                return calls.forward(x)[0]

            @staticmethod
            def backward(ctx, grad):
                return grad

        self.split, self.empty_backward = Split, EmptyBackward

    def forward(self, x):
        x_row, x_col, x_scale, _ = quantize_with_amax(x, E4, "both")
        w_row, _, w_scale, w_amax = quantize_with_amax(self.w, E4, "row")
        out = scaled_mm_data(x_row, x_scale, w_row.t(), w_scale, torch.bfloat16, True, self.config)
        return out, x_col, x_scale, w_amax

    def backward(self, g, x_col, x_scale, w_amax):
        g_row, g_col, g_scale, _ = quantize_with_amax(g, E5, "both")
        grad_w = scaled_mm_data(g_col.t(), g_scale, x_col, x_scale, torch.bfloat16, False, self.config)
        _, w_col, w_scale, _ = quantize_with_amax(self.w, E4, "col", amax=w_amax)
        grad_x = scaled_mm_data(g_row, g_scale, w_col, w_scale, torch.bfloat16, False, self.config)
        return grad_x, grad_w

    def inline(self):
        """Forward's and backward's calls one after the other, no autograd."""
        self.backward(self.g, *self.forward(self.x)[1:])

    def in_autograd(self, xg):
        """The same calls split across an autograd Function's forward and backward."""
        self.split.apply(xg).sum().backward()


def in_thread(fn, n=N):
    """host_and_wall_us(fn) on a new Python thread."""
    result = []
    thread = threading.Thread(target=lambda: result.append(host_and_wall_us(fn, n)))
    thread.start()
    thread.join()
    return result[0]


def main():
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    lin = Float8Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16)
    calls = LayerCalls(lin, x, torch.randn(256, 256, device="cuda", dtype=torch.bfloat16))
    cases = {
        "B: layer ops inline, main thread": lambda: host_and_wall_us(calls.inline, N),
        "C: layer ops inline, other thread": lambda: in_thread(calls.inline),
        "A: layer ops in autograd fwd/bwd": lambda: host_and_wall_us(lambda: calls.in_autograd(xg), N),
        "A0: fwd ops, empty backward": lambda: host_and_wall_us(
            lambda: calls.empty_backward.apply(xg).sum().backward(), N),
        "fwd ops only": lambda: host_and_wall_us(lambda: calls.forward(x), N),
        "bwd ops only": lambda: host_and_wall_us(lambda: calls.backward(calls.g, *calls.forward(x)[1:]), N),
        "Float8Linear fwd+bwd": lambda: host_and_wall_us(lambda: lin(leaf(x)).sum().backward(), N),
        "nn.Linear fwd+bwd": lambda: host_and_wall_us(
            lambda: torch.nn.functional.linear(leaf(x), lin.weight).sum().backward(), N),
    }
    for _ in range(2):
        for name, fn in cases.items():
            host, wall = fn()
            print(f"{name:<40} host {host:8.1f} us  wall {wall:8.1f} us per call", flush=True)

    for _ in range(5):
        lin(leaf(x)).sum().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            lin(leaf(x)).sum().backward()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(averages.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))
    prof.export_chrome_trace(os.path.join(os.environ.get("OUT", "/tmp"), "f8linear_trace.json"))


if __name__ == "__main__":
    main()
