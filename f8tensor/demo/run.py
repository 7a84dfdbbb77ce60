"""Train a small byte-level transformer twice, in bf16 and in float8, and compare the runs.

    python -m f8tensor.demo                      # CPU: about a minute; GPU: a larger model
    python -m f8tensor.demo --steps 50 --plot loss.png
    python -m f8tensor.demo --steps 2000 --data-mb 32 --eval-every 100 --out run.json --plot loss.png
    python -m f8tensor.demo --cuda-graph         # GPU: each training step replayed as one CUDA graph
    python -m f8tensor.demo --recipe rowwise     # a scaling recipe other than tensorwise

The data needs no download: the bytes of the Python standard library's own .py files (the first
--data-mb MB of them, the last 5% held out for a validation loss). Both runs start from the same
initial weights and see the same batches; the only difference is that the second model is
converted (convert_to_float8_training: every linear layer except the output head in float8) and
fused (fuse_model_ops: its RMSNorms and SwiGLU gates as f8tensor's fused ops; --fuse-bf16 fuses
the bf16 run too, to compare float8 alone). Parameters are bf16 and the optimizer is plain AdamW on them (no fp32 master weights), to keep the demo short; the loss is taken in fp32.
"""

import argparse
import copy
import gc
import importlib.metadata
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from f8tensor import Float8Config, conversion_summary, convert_to_float8_training, fuse_model_ops
from f8tensor.cuda_graph import CapturedStep

DATA_BYTES = 4 << 20
VAL_FRACTION = 0.05
VAL_BATCHES = 8
WARMUP_STEPS = 5  # excluded from tokens/s: the first steps pay for allocator and kernel setup
CPU_DEFAULTS = dict(steps=70, dim=128, layers=2, heads=4, seq=128, batch=8, lr=4e-3)
# On a GPU a model where float8's GEMMs outweigh its host time: at dim 1024 an eager step is bound
# by host time and fp8 is slower than bf16 unless the step is a CUDA graph (--cuda-graph);
# docs/benchmarks.md, "The demo on a GPU".
GPU_DEFAULTS = dict(steps=300, dim=2048, layers=8, heads=16, seq=1024, batch=16, lr=6e-4)


def load_stdlib_bytes(limit: int = DATA_BYTES) -> torch.Tensor:
    """The standard library's .py files, in sorted order, concatenated up to `limit` bytes."""
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted in place so os.walk visits directories in the same order on every machine;
        # installed packages are not the standard library and differ between environments.
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages"))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            with open(os.path.join(dirpath, name), "rb") as fh:
                chunks.append(fh.read())
            total += len(chunks[-1])
            if total >= limit:
                return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8)
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (w(x).view(B, T, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = (8 * dim // 3 + 15) // 16 * 16  # the usual 8/3 * dim, rounded up for _scaled_mm
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn, self.mlp = Attention(dim, heads), SwiGLU(dim)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only, byte-level (vocab 256), learned positions."""

    def __init__(self, dim: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.tok = nn.Embedding(256, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class Progress:
    """One line per run, redrawn in place on a terminal; on a pipe, a line every ~10% of steps."""

    def __init__(self, name: str, total: int):
        self.name, self.total = name, total
        self.tty = sys.stdout.isatty()

    def update(self, step: int, loss: float, tok_s: float):
        done = step + 1
        if not self.tty and done % max(1, self.total // 10) and done != self.total:
            return
        bar = "#" * (20 * done // self.total)
        count = f"{done:>{len(str(self.total))}}/{self.total}"
        line = f"{self.name:<5} [{bar:<20}] {count}  loss {loss:7.4f}  {tok_s:>9,.0f} tok/s"
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self):
        if self.tty:
            print()


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to 10% of lr."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, val_batches) -> float:
    model.eval()
    losses = [F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()) for x, y in val_batches]
    model.train()
    return torch.stack(losses).mean().item()


def train(name, model, batches, val_batches, args, device) -> dict:
    """Train `model` on `batches` in order; return losses, val loss (and its curve with
    --eval-every), tokens/s and peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.cuda_graph:  # the learning rate a tensor the schedule writes in place: the graph reads it
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(args.lr, device=device), betas=(0.9, 0.95),
                                weight_decay=0.1, capturable=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def step_fn(x, y):
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    run_step = CapturedStep(step_fn) if args.cuda_graph else step_fn
    progress = Progress(name, args.steps)
    losses, val_curve = [], []
    warmup = min(WARMUP_STEPS, args.steps - 1)
    t_start = t_warm = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        for group in opt.param_groups:
            if args.cuda_graph:
                group["lr"].fill_(lr_at(step, args.steps, args.lr))
            else:
                group["lr"] = lr_at(step, args.steps, args.lr)
        losses.append(run_step(x, y).item())
        sync(device)  # the timer must read finished work, not queued kernels
        now = time.perf_counter()
        if step < warmup:
            tok_s = (step + 1) * x.numel() / (now - t_start)
            t_warm = now
        else:
            tok_s = (step + 1 - warmup) * x.numel() / (now - t_warm)
        progress.update(step, losses[-1], tok_s)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            val_curve.append((step + 1, evaluate(model, val_batches)))
            paused = time.perf_counter() - now  # evaluation is not training time
            t_start, t_warm = t_start + paused, t_warm + paused
    progress.close()
    val_loss = evaluate(model, val_batches)
    tail = max(1, args.steps // 10)
    return {
        "losses": losses,
        # The mean over the last 10% of steps: a single batch's loss is noisy.
        "train_loss": sum(losses[-tail:]) / tail,
        "val_loss": val_loss,
        "val_curve": val_curve + [(args.steps, val_loss)],
        "tokens_per_s": tok_s,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def plot(results: dict, path: str):
    try:
        import matplotlib
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); skipping the plot")
        return
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax, diff) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                   gridspec_kw={"height_ratios": (3, 2)})
    for name, color in (("bf16", "C0"), ("fp8", "C1")):
        r = results[name]
        ax.plot(r["losses"], "-" if name == "bf16" else "--", color=color, lw=1,
                label=f"{name} train (last val {r['val_loss']:.3f})")
        if len(r["val_curve"]) > 1:
            steps, vals = zip(*r["val_curve"])
            ax.plot(steps, vals, "o" if name == "bf16" else "x", color=color, label=f"{name} val")
    ax.set(ylabel="loss (nats/byte)", title="f8tensor demo: bf16 vs float8")
    ax.legend()
    # The gap, fp8 minus bf16, as a running mean over ~2% of the run (one batch's loss is noisy).
    gap = torch.tensor(results["fp8"]["losses"]) - torch.tensor(results["bf16"]["losses"])
    window = max(1, len(gap) // 50)
    smooth = gap.unfold(0, window, 1).mean(1) if len(gap) >= window else gap
    diff.plot(range(window - 1, window - 1 + len(smooth)), smooth.tolist(), color="C2", lw=1,
              label=f"train, mean of {window} step(s)")
    if len(results["bf16"]["val_curve"]) > 1:
        steps = [step for step, _ in results["bf16"]["val_curve"]]
        val_gap = [f - b for (_, f), (_, b) in zip(results["fp8"]["val_curve"], results["bf16"]["val_curve"])]
        diff.plot(steps, val_gap, "s", color="C3", label="val")
    diff.axhline(0, color="gray", lw=0.5)
    diff.set(xlabel="step", ylabel="fp8 - bf16")
    diff.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"loss curves written to {path}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m f8tensor.demo", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for flag, kind in (("steps", int), ("dim", int), ("layers", int), ("heads", int),
                       ("seq", int), ("batch", int), ("lr", float)):
        p.add_argument(f"--{flag}", type=kind,
                       help=f"default {CPU_DEFAULTS[flag]} on CPU, {GPU_DEFAULTS[flag]} on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-mb", type=float, default=DATA_BYTES / 2**20,
                   help="MB of standard-library source to read (default 4; all of it if it has less)")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="validation loss every N steps as well as at the end (default: at the end)")
    p.add_argument("--out", metavar="PATH", help="write the results (both loss curves) as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the loss curves (needs matplotlib)")
    p.add_argument("--recipe", default="tensorwise",
                   help="the float8 run's recipe (Float8Config.from_recipe_name): tensorwise, rowwise, ...")
    p.add_argument("--emulate", action="store_true",
                   help="the float8 run's GEMMs in high precision on its float8 values (Float8Config(emulate=True)): "
                        "for GPUs without float8 and recipes the CPU's _scaled_mm lacks")
    p.add_argument("--fuse-bf16", action="store_true",
                   help="fuse the bf16 run's norms and gates too (fuse_model_ops works in bf16), so that the "
                        "comparison is of float8 alone")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each run's training step as a CUDA graph after 3 eager steps and replay it "
                        "(f8tensor.cuda_graph.CapturedStep; CUDA only): no Python per layer")
    args = p.parse_args(argv)
    defaults = GPU_DEFAULTS if torch.device(args.device).type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag in ("dim", "layers", "heads", "seq", "batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.dim % 16 or args.dim % args.heads:
        p.error(f"--dim {args.dim} must be a multiple of 16 and of --heads {args.heads}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch has no CUDA device ({torch.__version__}); use --device cpu")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.eval_every < 0:
        p.error("--eval-every must be 0 (at the end only) or a number of steps")
    if args.data_mb <= 0:
        p.error("--data-mb must be positive")
    try:
        Float8Config.from_recipe_name(args.recipe)
    except ValueError as e:
        p.error(str(e))
    if args.cuda_graph and torch.device(args.device).type != "cuda":
        p.error(f"--cuda-graph captures CUDA graphs: it needs --device cuda (got {args.device})")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        # CapturedStep's stream and graph are the current device's; plain "cuda" is the current device
        torch.cuda.set_device(device)
    reason = float8_reason(args)
    if reason:
        p.error(reason)
    return args


def float8_config(args) -> Float8Config:
    return Float8Config.from_recipe_name(args.recipe).replace(emulate=args.emulate)


def float8_reason(args) -> str | None:
    """Why a float8 layer of the chosen recipe cannot train on the device, or None: one small layer's
    forward and backward, before the bf16 run spends its time."""
    from f8tensor import Float8Linear

    device = torch.device(args.device)
    try:
        layer = Float8Linear(32, 32, bias=False, device=device, dtype=torch.bfloat16, config=float8_config(args))
        layer(torch.ones(16, 32, device=device, dtype=torch.bfloat16)).float().sum().backward()
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        return (f"the float8 run cannot train on {device} with --recipe {args.recipe}: {type(e).__name__}: {e}"
                + ("" if args.emulate else " (--emulate runs its GEMMs in high precision)"))
    return None


def format_memory(n):
    return "n/a (CPU)" if n is None else f"{n / 2**30:.2f} GiB"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)

    data = load_stdlib_bytes(int(args.data_mb * 2**20))
    if len(data) < int(args.data_mb * 2**20):
        print(f"--data-mb {args.data_mb:g}: this Python's standard library has only "
              f"{len(data) / 2**20:.1f} MB of .py source; using all of it")
    split = int(len(data) * (1 - VAL_FRACTION))
    train_data, val_data = data[:split], data[split:]
    if len(val_data) < VAL_BATCHES * args.batch * (args.seq + 1):
        raise SystemExit(f"--batch {args.batch} x --seq {args.seq} is too large for the held-out data of "
                         f"--data-mb {args.data_mb:g} (the last {VAL_FRACTION:.0%}): raise --data-mb or lower them")

    def batch_at(source, starts):
        rows = torch.stack([source[s:s + args.seq + 1] for s in starts.tolist()]).long().to(device)
        return rows[:, :-1], rows[:, 1:]

    # One fixed batch order for both runs, drawn up front from a seeded generator.
    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(len(train_data) - args.seq - 1, (args.steps, args.batch), generator=gen)
    batches = [batch_at(train_data, s) for s in starts]
    # Consecutive, non-overlapping windows from the start of the held-out bytes.
    val_starts = torch.arange(VAL_BATCHES * args.batch).view(VAL_BATCHES, args.batch) * (args.seq + 1)
    val_batches = [batch_at(val_data, s) for s in val_starts]

    torch.manual_seed(args.seed)
    # Kept on the CPU so it does not count towards either run's peak memory.
    base = Transformer(args.dim, args.layers, args.heads, args.seq)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"device {device}, {n_params / 1e6:.2f}M params (dim {args.dim}, {args.layers} layers, "
          f"{args.heads} heads), seq {args.seq}, batch {args.batch}, {args.steps} steps, "
          f"{len(train_data) / 2**20:.1f} MB of stdlib source for training")

    results = {"args": vars(args)}
    model = copy.deepcopy(base).to(device=device, dtype=torch.bfloat16)
    if args.fuse_bf16:
        fuse_model_ops(model, rope=False)
    results["bf16"] = train("bf16", model, batches, val_batches, args, device)
    del model  # free the bf16 run's memory before the fp8 run measures its peak
    gc.collect()  # (a reference cycle made by the first run, torch's lazy imports, could hold it)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    fp8_model = copy.deepcopy(base).to(device=device, dtype=torch.bfloat16)
    # The output head stays in bf16, as is standard: its logits feed the loss directly.
    convert_to_float8_training(fp8_model, config=float8_config(args), module_filter_fn=lambda m, fqn: fqn != "head")
    # Its norms and SwiGLU gates as f8tensor's fused ops (the model has no RoPE).
    fusion = fuse_model_ops(fp8_model, rope=False)
    results["fp8"] = train("fp8", fp8_model, batches, val_batches, args, device)

    print()
    print(conversion_summary(fp8_model))
    print(fusion)
    print()
    print(f"{'run':<6} {'final train loss':>16} {'val loss':>10} {'tokens/s':>12} {'peak memory':>13}")
    for name in ("bf16", "fp8"):
        r = results[name]
        print(f"{name:<6} {r['train_loss']:>16.4f} {r['val_loss']:>10.4f} {r['tokens_per_s']:>12,.0f} "
              f"{format_memory(r['peak_memory_bytes']):>13}")
    print("fp8: float8 linear layers and the fused norms and gates; bf16: " + (
        "the same fused norms and gates (--fuse-bf16)" if args.fuse_bf16 else
        "as written (--fuse-bf16 fuses it too, so that the comparison is of float8 alone)"))
    if device.type == "cpu":
        print("(on CPU tokens/s says nothing of a GPU: the CPU has no float8 GEMMs, and the kernels run in "
              "the PyTorch references; run on a GPU with float8 support for a speed comparison)")
    if args.plot:
        plot(results, args.plot)
    if args.out:
        write_json(results, args.out, n_params, len(data), device)
    return results


def write_json(results: dict, path: str, n_params: int, n_bytes: int, device: torch.device):
    """The results with the environment (versions, device, commit from $F8TENSOR_COMMIT if set)."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    env = {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "params": n_params, "data_bytes": n_bytes, "commit": os.environ.get("F8TENSOR_COMMIT")}
    with open(path, "w") as f:
        json.dump({"environment": env, **results}, f)
    print(f"results written to {path}")

