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
from tools.common import host_and_wall_us  # noqa: E402

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2

x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
xg = x.clone().requires_grad_()
lin = Float8Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16)
w = lin.weight.detach()
g = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
cfg = lin.config

def fwd_ops(x):
    xr, xc, xs, _ = quantize_with_amax(x, E4, "both")
    wr, _, ws, wa = quantize_with_amax(w, E4, "row")
    out = scaled_mm_data(xr, xs, wr.t(), ws, torch.bfloat16, True, cfg)
    return out, xc, xs, wa

def bwd_ops(g, xc, xs, wa):
    gr, gc, gs, _ = quantize_with_amax(g, E5, "both")
    gw = scaled_mm_data(gc.t(), gs, xc, xs, torch.bfloat16, False, cfg)
    _, wc, ws, _ = quantize_with_amax(w, E4, "col", amax=wa)
    gx = scaled_mm_data(gr, gs, wc, ws, torch.bfloat16, False, cfg)
    return gx, gw

def inline():
    out, xc, xs, wa = fwd_ops(x)
    bwd_ops(g, xc, xs, wa)

class Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out, xc, xs, wa = fwd_ops(x)
        ctx.save_for_backward(xc, xs, wa)
        return out
    @staticmethod
    def backward(ctx, grad):
        xc, xs, wa = ctx.saved_tensors
        gx, gw = bwd_ops(grad.contiguous(), xc, xs, wa)
        return gx

class FnEmptyBwd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return fwd_ops(x)[0]
    @staticmethod
    def backward(ctx, grad):
        return grad

N = 300  # calls per timing


def in_thread(fn, n=N):
    res = []
    th = threading.Thread(target=lambda: res.append(host_and_wall_us(fn, n)))
    th.start(); th.join()
    return res[0]

cases = {
    "B: layer ops inline, main thread": lambda: host_and_wall_us(inline, N),
    "C: layer ops inline, other thread": lambda: in_thread(inline),
    "A: layer ops in autograd fwd/bwd": lambda: host_and_wall_us(lambda: Fn.apply(xg).sum().backward(), N),
    "A0: fwd ops, empty backward": lambda: host_and_wall_us(lambda: FnEmptyBwd.apply(xg).sum().backward(), N),
    "fwd ops only": lambda: host_and_wall_us(lambda: fwd_ops(x), N),
    "bwd ops only": lambda: host_and_wall_us(lambda: bwd_ops(g, *fwd_ops(x)[1:]), N),
    "Float8Linear fwd+bwd": lambda: host_and_wall_us(lambda: lin(xg).sum().backward(), N),
    "nn.Linear fwd+bwd": lambda: host_and_wall_us(lambda: torch.nn.functional.linear(xg, lin.weight).sum().backward(), N),
}
for _ in range(2):
    for name, fn in cases.items():
        h, wall = fn()
        print(f"{name:<40} host {h:8.1f} us  wall {wall:8.1f} us per call", flush=True)

for _ in range(5): lin(xg).sum().backward()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(20): lin(xg).sum().backward()
    torch.cuda.synchronize()
ka = prof.key_averages()
print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
print(ka.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))
prof.export_chrome_trace(os.path.join(os.environ.get("OUT", "/tmp"), "f8linear_trace.json"))
