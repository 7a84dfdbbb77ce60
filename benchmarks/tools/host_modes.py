"""Float8Linear vs nn.Linear host time under process settings (docs/benchmarks.md, "Host overhead").

    python benchmarks/tools/host_modes.py

Settings: the default; torch.autograd.set_multithreading_enabled(False) (backward runs on the
calling thread instead of autograd's CUDA device thread); the process pinned to one CPU; both;
Python's GIL switch interval at 20 us instead of 5 ms.
Five rounds, the settings interleaved within each, medians (the GPU machine's host time varies
from run to run by more than the cases differ). A single layer, and stacks of host_overhead.STACK
layers (a layer's cost in steady state, the hand-over to autograd's thread shared by the stack).
Also three _scaled_mm calls of the layer's three kinds in turn against one kind three times, and
the layer's own calls inline and split across an autograd Function (host_split.py's B and A).
"""
import os
import statistics
import sys

import torch

from f8tensor import Float8Config, Float8Linear

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tools.common import host_us  # noqa: E402
from tools.host_split import LayerCalls  # noqa: E402
from host_overhead import STACK, leaf, stack_cases  # noqa: E402

MODES = ["default", "no autograd threads", "one CPU", "one CPU, no autograd threads", "GIL switch interval 20 us"]
SWITCH_INTERVAL = sys.getswitchinterval()


def cases() -> dict:
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    lin = Float8Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16)
    kept = Float8Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16,
                        config=Float8Config(keep_fp8_weight=True))
    calls = LayerCalls(lin, x, torch.randn(256, 256, device="cuda", dtype=torch.bfloat16))
    a8, g8 = x.to(torch.float8_e4m3fn), x.to(torch.float8_e5m2)
    one = torch.ones((), device="cuda")
    return {
        "Float8Linear fwd+bwd": lambda: lin(leaf(x)).sum().backward(),
        "nn.Linear fwd+bwd": lambda: torch.nn.functional.linear(leaf(x), lin.weight).sum().backward(),
        "Float8Linear keep_fp8_weight": lambda: kept(leaf(x)).sum().backward(),
        **stack_cases(),
        "the layer's calls inline": calls.inline,
        "the layer's calls in autograd": lambda: calls.in_autograd(xg),
        "_scaled_mm 3 kinds alternating": lambda: (
            torch._scaled_mm(a8, a8.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True),
            torch._scaled_mm(g8.t().contiguous(), a8.t(), one, one, out_dtype=torch.bfloat16),
            torch._scaled_mm(g8, a8.t().contiguous().t(), one, one, out_dtype=torch.bfloat16)),
        "_scaled_mm one kind x3": lambda: [torch._scaled_mm(a8, a8.t(), one, one, out_dtype=torch.bfloat16)
                                           for _ in range(3)],
    }


def pin(cpus: set) -> None:
    """Every thread of this process onto `cpus`: os.sched_setaffinity(0, ...) moves only the calling
    thread, and autograd's device threads, started at the first backward, keep their own masks."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def main():
    timed = cases()
    cpus = sorted(os.sched_getaffinity(0))
    print(f"{len(cpus)} CPUs", flush=True)
    results = {(mode, case): [] for mode in MODES for case in timed}
    for _ in range(5):
        for mode in MODES:
            pin({cpus[0]} if "one CPU" in mode else set(cpus))
            # A thread waiting for the GIL asks its holder to drop it only after the switch interval
            # (5 ms by default): the last mode shows whether backward's hand-overs wait on it.
            sys.setswitchinterval(2e-5 if "switch interval" in mode else SWITCH_INTERVAL)
            with torch.autograd.set_multithreading_enabled("no autograd" not in mode):
                for case, fn in timed.items():
                    results[mode, case].append(host_us(fn))
    pin(set(cpus))
    sys.setswitchinterval(SWITCH_INTERVAL)
    for mode in MODES:
        ratio = (statistics.median(results[mode, "Float8Linear fwd+bwd"])
                 / statistics.median(results[mode, "nn.Linear fwd+bwd"]))
        stacked = (statistics.median(results[mode, f"Float8Linear x{STACK} fwd+bwd"])
                   / statistics.median(results[mode, f"nn.Linear x{STACK} fwd+bwd"]))
        print(f"== {mode}: Float8Linear / nn.Linear = {ratio:.2f} one layer, {stacked:.2f} in stacks of {STACK}",
              flush=True)
        for case in timed:
            v = results[mode, case]
            print(f"   {case:<34} median {statistics.median(v):8.1f} us  (min {min(v):7.1f}, max {max(v):7.1f})",
                  flush=True)


if __name__ == "__main__":
    main()
