"""Whole-step CUDA graphs: a training step (forward, loss, backward, optimizer step) captured once with
`torch.cuda.graph` and replayed, so that no Python runs per layer. Small models and small batches,
where eager host time exceeds the GPU's work, run at the GPU's speed.

    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(3e-4, device="cuda"), capturable=True)

    def step(x, y):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step = CapturedStep(step)
    for x, y in batches:
        loss = step(x, y)          # one training step per call, as step(x, y) itself

Each call is one training step on its arguments. The first `warmup` calls run `fn` eagerly on a side
stream (CUDA's rule for capture: libraries allocate their workspaces, Triton compiles its kernels,
autograd and the optimizer create their state); the next call captures `fn` into a graph, on copies
of its arguments (the static inputs), and replays it; every later call copies its arguments into the
static inputs and replays. The return value is the graph's own output tensor, overwritten by the next
replay: read it (`.item()`, `.clone()`) before the next call.

What must stay static, because the graph replays the same kernels on the same memory:
- argument shapes, dtypes and devices (a call with others raises ValueError);
- the model's parameters and the optimizer's state: the same tensor objects, updated in place;
  `opt.zero_grad(set_to_none=True)` inside `fn` (gradients are then allocated within the graph);
- anything else `fn` reads that is not an argument: a learning rate changed between steps must be a
  tensor updated in place (`group["lr"].fill_(...)`, with `capturable=True`); a Python float is
  captured as a constant;
- no host synchronization in `fn` (`.item()`, printing a loss, data-dependent shapes): capture fails
  with CUDA's error.

Converted models capture as they run eagerly: f8tensor's per-tensor caches serve no value across the
edge of a capture (an entry made outside it is a tensor the graph would not update), and
`keep_fp8_weight` casts the weight inside the graph during capture rather than reading a float8
copy kept from an earlier step (tests/test_cuda_graph.py: bit for bit equal to eager training).
A replay updates the parameters without running Python: no version counter moves and no optimizer
hook runs, so after each replay CapturedStep drops what those would have dropped, the kept float8
weights (`forget_fp8_weights`) and the precomputed FSDP2 all-gather scales
(`forget_precomputed_scales`): an eager forward after replays casts the weights as they are.
"""

import torch

from .core.weight_cache import forget_fp8_weights
from .distributed.fsdp_float8 import forget_precomputed_scales


class CapturedStep:
    """fn(*tensors) captured as a CUDA graph after `warmup` eager calls; see the module docstring."""

    def __init__(self, fn, warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"CapturedStep needs at least one eager warm-up call before capture; got warmup={warmup}")
        self.fn, self.warmup = fn, warmup
        self.calls = 0
        self.graph = self.static_inputs = self.static_output = None
        self.stream = None

    def __call__(self, *args):
        for a in args:
            if not isinstance(a, torch.Tensor) or a.device.type != "cuda":
                raise TypeError(f"CapturedStep captures a CUDA graph: every argument must be a CUDA tensor; got "
                                f"{type(a).__name__}{'' if not isinstance(a, torch.Tensor) else ' on ' + str(a.device)}")
            if a.device.index != torch.cuda.current_device():
                # its stream and graph are the current device's: the step's kernels would run elsewhere
                raise ValueError(f"CapturedStep: an argument is on {a.device}, the current CUDA device is "
                                 f"cuda:{torch.cuda.current_device()}; call torch.cuda.set_device({a.device.index}) "
                                 "first")
        self.calls += 1
        if self.graph is not None:
            self._check(args)
            for static, a in zip(self.static_inputs, args):
                static.copy_(a)
            self._replay()
            return self.static_output
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        # Warm-up calls and the capture run on a side stream, after the work queued before them.
        self.stream.wait_stream(torch.cuda.current_stream())
        if self.calls <= self.warmup:
            with torch.cuda.stream(self.stream):
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        self.static_inputs = [a.clone() for a in args]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self.static_output = self.fn(*self.static_inputs)
        except Exception as e:
            self.static_inputs = self.static_output = None  # nothing half-captured is replayed or kept
            raise RuntimeError(
                f"CapturedStep: capturing the step failed ({type(e).__name__}: {e}). A captured step may not "
                "synchronize with the host (.item(), .cpu(), printing a tensor, a data-dependent shape), and "
                "its optimizer needs capturable=True (torch.optim's fused or foreach AdamW)") from e
        self.graph = graph
        torch.cuda.current_stream().wait_stream(self.stream)
        self._replay()  # capture records the step without running it
        return self.static_output

    def _replay(self):
        self.graph.replay()
        # the step wrote the parameters behind their version counters and optimizer hooks
        forget_fp8_weights()
        forget_precomputed_scales()

    def _check(self, args):
        if len(args) != len(self.static_inputs):
            raise ValueError(f"CapturedStep: captured with {len(self.static_inputs)} arguments, called with {len(args)}")
        for i, (static, a) in enumerate(zip(self.static_inputs, args)):
            if a.shape != static.shape or a.dtype != static.dtype or a.device != static.device:
                raise ValueError(
                    f"CapturedStep: argument {i} is {a.dtype} {tuple(a.shape)} on {a.device}; the graph was captured "
                    f"with {static.dtype} {tuple(static.shape)} on {static.device}. A captured step replays fixed "
                    "shapes: keep the batch shape constant (pad or drop the last batch), or capture another step")
