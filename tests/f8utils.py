"""Shared test helpers: device choice, SQNR, an independent float8 rounding oracle, joining a
process group in a spawned rank."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
HP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SwiGLU(nn.Module):
    """A feed-forward as torchtitan writes it: fuse_model_ops fuses its gate (f8tensor/fusion/gate_proof.py)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def convert_and_fuse(model: nn.Module, module_filter_fn=lambda mod, fqn: True, **fusion) -> nn.Module:
    """What the README's quick start does: convert_to_float8_training (every linear layer by default
    here, these layers being small), then fuse_model_ops with the given switches."""
    from f8tensor import convert_to_float8_training, fuse_model_ops

    model = convert_to_float8_training(model, module_filter_fn=module_filter_fn)
    fuse_model_ops(model, **fusion)
    return model


def train_step(mod: nn.Module, x: torch.Tensor) -> list:
    """One forward/backward of a squared-sum loss: the output, x's gradient, then every parameter's
    gradient (cleared on the module afterwards)."""
    x = x.detach().requires_grad_()
    out = mod(x)
    out.float().square().sum().backward()
    grads = [x.grad] + [p.grad for p in mod.parameters()]
    mod.zero_grad(set_to_none=True)
    return [out.detach()] + grads


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(|ref| / |ref - out|)."""
    ref, out = ref.double(), out.double()
    return (20 * torch.log10(ref.norm() / (ref - out).norm())).item()


def nearest_float8(y: torch.Tensor, float8_dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 values (finite, within range) to the nearest float8 value, ties to the even code.

    Built from the table of all 256 codes, independent of any cast implementation.
    """
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(float8_dtype).float()
    keep = values.isfinite() & ~((values == 0) & (codes >= 128))  # drop -0 (same value as +0)
    values, codes = values[keep], codes[keep].int()
    values, order = values.sort()
    codes = codes[order]
    y = y.double().flatten()
    hi = torch.searchsorted(values.double(), y).clamp(1, len(values) - 1)
    lo = hi - 1
    d_lo, d_hi = y - values[lo].double(), values[hi].double() - y
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    return torch.where(pick_hi, values[hi], values[lo]).view(y.shape)


def spanning_values(shape, dtype, device=DEVICE, seed=0):
    """Random values over ~40 binades with both signs, so quantization hits max, normals and subnormals."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.empty(shape).uniform_(-30, 10, generator=g))
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return (mag * sign).to(dtype).to(device)


# Two ranks' devices: CPU processes on gloo everywhere, two GPUs on NCCL where a machine has them.
TWO_RANK_DEVICES = pytest.mark.parametrize(
    "device_type",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                          reason="needs two CUDA GPUs (NCCL)"))],
    ids=["gloo-cpu", "nccl-2gpu"])


def join_process_group(rank: int, world: int, store: str, device_type: str = "cpu") -> torch.device:
    """In a spawned rank: join the group through a file store (no TCP port to race for), with the
    GEMMs checked against CUDA's rules as in the pytest process (conftest patches only that one).
    The rank's device: the CPU on gloo, or GPU `rank` on NCCL."""
    import torch.distributed as dist
    from conftest import _cuda_rules_scaled_mm

    torch._scaled_mm = _cuda_rules_scaled_mm
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world)
    return device


def count_amax_passes(monkeypatch) -> list:
    """Patch Float8Linear's quantization to log, per call, whether it ran its own amax pass (True)
    or took a record (False); returns the log."""
    import f8tensor.core.linear as linear_mod

    passes = []
    real = linear_mod.quantize_with_amax
    monkeypatch.setattr(linear_mod, "quantize_with_amax", lambda t, *a, amax=None, **k: passes.append(
        amax is None) or real(t, *a, amax=amax, **k))
    return passes


def ignore_records(monkeypatch):
    """Float8Linear measures every amax itself. (Patched in linear.py's namespace: the cache is
    per thread, and on CUDA backward runs in autograd's device thread.)"""
    import f8tensor.core.linear as linear_mod

    no_records = type("NoRecords", (), {"get": staticmethod(lambda t, key=(): None)})()
    monkeypatch.setattr(linear_mod, "produced_amax", no_records)


def saved_activations(params, forward):
    """((shape, dtype) of each tensor autograd saves while `forward()` runs, the storages of
    `params` left out as alive anyway; forward's result)."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_storages:
            saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return saved, forward()


def cpu_rowwise_gemm() -> bool:
    """Whether this torch's CPU _scaled_mm takes rowwise scales (2.13 does, 2.11 does not)."""
    a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def skip_rowwise_without_cpu_gemm(recipe: str, device_type: str) -> None:
    """Skip a case of the rowwise recipe on CPU where this torch's CPU _scaled_mm takes no rowwise scales."""
    if recipe == "rowwise" and device_type == "cpu" and not cpu_rowwise_gemm():
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm takes tensorwise scales only")


def torchtitan_llama():
    """torchtitan's Llama 3 model code (its PyPI wheel), 2 layers of width 64, bf16 parameters."""
    from torchtitan.models.llama3.model.args import TransformerModelArgs
    from torchtitan.models.llama3.model.model import Transformer

    torch.manual_seed(0)
    model = Transformer(TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                                             multiple_of=16, max_seq_len=32))
    model.init_weights()
    for p in model.parameters():  # parameters only: freqs_cis stays complex
        p.data = p.data.to(torch.bfloat16)
    return model
