"""Tensor parallelism over Float8Linear layers (ColwiseParallel, RowwiseParallel, also as sequence
parallelism or applied before conversion, and a replicated weight with sharded tokens), 2 ranks:
CPU processes on gloo everywhere, and two GPUs on NCCL where a machine has them.

Each rank scales its own shards (tensorwise per shard) and RowwiseParallel sums bf16 partial
results, so the parallel layer is not bit-identical to one device's: it must be as close to the
bf16 result as the single-device float8 layer is, and train in step with it. A one-rank mesh
must be bit-identical.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from f8utils import TWO_RANK_DEVICES, SwiGLU, join_process_group, sqnr
from torch import nn
from torch.utils.checkpoint import checkpoint

from f8tensor import Float8Linear, RMSNorm, convert_to_float8_training, fuse_model_ops
from f8tensor.fusion.gate_proof import GATE_ATTR, SwiGLUGate

STEPS = 4
NAMES = ["output", "grad x", "grad w1", "grad b1", "grad w2", "grad b2"]


def make_model(fp8=True, device="cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).bfloat16().to(device)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.bias.uniform_(-0.5, 0.5)  # large enough that a bias added once per rank shows
    if fp8:
        convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: True)
    return model


def norm_model(device="cpu"):
    torch.manual_seed(2)
    model = nn.Sequential(nn.RMSNorm(64, eps=1e-5)).bfloat16().to(device)
    nn.init.normal_(model[0].weight, 1.0, 0.3)
    return model


def gated_model(device="cpu", fp8=True):
    torch.manual_seed(3)
    model = SwiGLU(64, 128).bfloat16().to(device)
    if fp8:
        convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: True)
        fuse_model_ops(model)
        assert isinstance(model.__dict__[GATE_ATTR], SwiGLUGate)
    return model


class Checkpointed(nn.Module):
    """module recomputed in backward (non-reentrant activation checkpointing)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return checkpoint(self.module, x, use_reentrant=False)


def make_layer(fp8=True, device="cpu"):
    torch.manual_seed(1)
    layer = nn.Linear(64, 32).bfloat16().to(device)
    return Float8Linear.from_float(layer) if fp8 else layer


def batch(step, device="cpu"):
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 16, 64, generator=g).bfloat16().to(device)


def full(t):
    """The whole tensor, on the CPU (results leave the spawned ranks through a Manager)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()


def first_step(model, x=None, device="cpu"):
    """Output and gradients (input, then every parameter) of one forward/backward."""
    x = (batch(0) if x is None else x).to(device).detach().requires_grad_()
    out = model(x)
    out.float().square().mean().backward()
    grads = [full(p.grad) for p in model.parameters()]
    model.zero_grad()
    return [full(out.detach()), full(x.grad)] + grads


def train(model, device="cpu"):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(1, STEPS + 1):
        loss = model(batch(step, device)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def parallel_run(rank, world, store, device_type, results):
    """One rank: CPU on gloo, or GPU `rank` on NCCL."""
    device = join_process_group(rank, world, store, device_type)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                       parallelize_module)

        mesh = init_device_mesh(device_type, (world,))
        model = make_model(device=device)
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        model(batch(0, device)).float().square().mean().backward()
        bias_grad_placement = model[2].bias.grad.placements  # replicated, as nn.Linear's
        model.zero_grad()
        step = first_step(model, device=device)
        compiled = first_step(torch.compile(model, fullgraph=True), device=device)  # one graph with DTensor
        # checkpointed: the GEMMs after the saves on the local shards (core/saves_first.py), eager's bits
        checkpointed = first_step(Checkpointed(model), device=device)
        losses = train(model, device)
        # Local values: the ranks' replicated biases must agree (a sharded weight's full_tensor()
        # would gather the same value on both ranks).
        row_bias = model[2].bias.to_local().detach().cpu()

        # Sequence parallelism: tokens sharded outside the pair (all-gather in, reduce-scatter out).
        sp = make_model(device=device)
        parallelize_module(sp, mesh, {"0": ColwiseParallel(input_layouts=Shard(1)),
                                      "2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)})
        sequence_parallel = first_step(sp, distribute_tensor(batch(0, device), mesh, [Shard(1)]), device)

        # A fused RMSNorm (as fuse_model_ops swaps it in) under SequenceParallel: its input and
        # weight are DTensors, so PyTorch's rms_norm runs, which DTensor implements.
        norm = norm_model(device)
        fuse_model_ops(norm)
        norm = norm[0]
        assert type(norm) is RMSNorm
        parallelize_module(norm, mesh, SequenceParallel())
        x = distribute_tensor(batch(0, device), mesh, [Shard(1)]).requires_grad_()
        out = norm(x)
        out.float().square().mean().backward()
        norm_sp = [full(out.detach()), full(x.grad), full(norm.weight.grad)]

        # A SwiGLU feed-forward whose gate fuse_model_ops fused, under the Llama plan: the gate runs on
        # the local shards of w1's and w3's outputs (ffn dim sharded), w2 reduces over the ranks.
        ffn = gated_model(device)
        parallelize_module(ffn, mesh, {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()})
        gate_tp = first_step(ffn, device=device)

        # q/k/v read one input: cast once, as on one device (each layer views it through to_local).
        import f8tensor.core.linear as linear_module

        qkv = convert_to_float8_training(nn.ModuleList(nn.Linear(64, 64).bfloat16().to(device) for _ in range(3)),
                                         module_filter_fn=lambda mod, fqn: True)
        for layer in qkv:
            parallelize_module(layer, mesh, ColwiseParallel())
        casts, real = [], linear_module.quantize_with_amax

        def counting(t, *args, **kwargs):
            casts.append(tuple(t.shape))
            return real(t, *args, **kwargs)

        linear_module.quantize_with_amax = counting
        try:
            x = batch(0, device).requires_grad_()
            sum(layer(x).float().sum() for layer in qkv).backward()
        finally:
            linear_module.quantize_with_amax = real
        input_casts = casts.count((64, 64))  # x as 2-D; the local weights are [32, 64]

        # Converted after parallelizing: the styles' hooks move to the Float8Linear layers.
        late = make_model(fp8=False, device=device)
        parallelize_module(late, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        convert_to_float8_training(late, module_filter_fn=lambda mod, fqn: True)
        converted_late = first_step(late, device=device)

        # A replicated weight with the tokens sharded: its gradient sums over the ranks.
        layer = make_layer(device=device)
        for name in ("weight", "bias"):
            value = getattr(layer, name).detach()
            setattr(layer, name, nn.Parameter(distribute_tensor(value, mesh, [Replicate()])))
        replicated = first_step(layer, distribute_tensor(batch(0, device), mesh, [Shard(0)]), device)
        # One sequence over two ranks: the second rank's shard has no tokens. Compiled, that rank
        # takes the plain path (nothing to multiply): eager's results, bit for bit.
        one = distribute_tensor(batch(0, device)[:1], mesh, [Shard(0)])
        empty_shard = (first_step(layer, one, device),
                       first_step(torch.compile(layer, fullgraph=True), one, device))

        # What the layer cannot run gets an error naming the problem.
        errors = []
        lin = Float8Linear(64, 32, bias=False, dtype=torch.bfloat16, device=device)
        lin.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(1)]))
        narrow = Float8Linear(64, 48, bias=False, dtype=torch.bfloat16, device=device)  # 24 features per rank
        narrow.weight = nn.Parameter(distribute_tensor(narrow.weight.detach(), mesh, [Shard(0)]))
        x = torch.randn(8, 64, dtype=torch.bfloat16, device=device)
        cases = [(lin, x),  # a plain input with a DTensor weight
                 (lin, distribute_tensor(x, mesh, [Shard(0)])),
                 (narrow, distribute_tensor(x, mesh, [Replicate()]))]
        for mod, x in cases:
            try:
                mod(x)
                errors.append(None)
            except (TypeError, ValueError, NotImplementedError) as e:
                errors.append(str(e))
        results[rank] = dict(step=step, compiled=compiled, checkpointed=checkpointed, losses=losses, row_bias=row_bias,
                             weights=[full(p).detach() for p in model.parameters()],
                             bias_grad_placement=str(bias_grad_placement),
                             replicated=replicated, sequence_parallel=sequence_parallel,
                             converted_late=converted_late, input_casts=input_casts, errors=errors,
                             empty_shard=empty_shard, norm_sp=norm_sp, gate_tp=gate_tp)
    finally:
        dist.destroy_process_group()


def fsdp_tp_run(rank, world, store, results):
    """One of 4 CPU ranks on a (dp 2, tp 2) mesh: FSDP2 over tensor-parallel Float8Linear layers,
    and the same model tensor-parallel only (on this rank's tp sub-mesh), fed the same batches."""
    join_process_group(rank, world, store)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
        both = make_model()
        parallelize_module(both, mesh["tp"], plan)
        for layer in (both[0], both[2]):
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(both, mesh=mesh["dp"])
        tp_only = make_model()
        parallelize_module(tp_only, mesh["tp"], plan)
        results[rank] = dict(
            placements=[(p.device_mesh.mesh_dim_names, str(p.placements)) for p in both.parameters()],
            losses=(train(both), train(tp_only)),
            weights=([full(p).detach() for p in both.parameters()],
                     [full(p).detach() for p in tp_only.parameters()]))
    finally:
        dist.destroy_process_group()


def one_rank_run(rank, store, device, results):
    """A one-rank mesh on `device`: the shards are the whole tensors, so every result must equal
    the plain layer's bit for bit (on CUDA this runs the Triton kernels through the DTensor path)."""
    join_process_group(0, 1, store, device)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        model = make_model().to(device)
        parallelize_module(model, init_device_mesh(device, (1,)),
                           {"0": ColwiseParallel(), "2": RowwiseParallel()})
        results["parallel"] = [t.cpu() for t in first_step(model, device=device)]
        results["plain"] = [t.cpu() for t in first_step(make_model().to(device), device=device)]
        # A checkpoint's recomputation casts each weight with its first forward's amax: the layer
        # reads the weight through a new to_local() view per call, the entry lives on the shard.
        import f8tensor.core.weight_amax as weight_amax

        found, latest = [], weight_amax.latest

        def probe(w):
            amax = latest(w)
            found.append(amax is not None)
            return amax

        weight_amax.latest = probe
        x = torch.randn(8, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
        checkpoint(model, x, use_reentrant=False).float().sum().backward()
        weight_amax.latest = latest
        results["recomputation_found_amax"] = found
    finally:
        dist.destroy_process_group()



def assert_as_close_to_bf16(got, fp8, bf16, names):
    """As close to bf16 as one device's float8 layer (22-38 dB here; measured within 0.5 dB; a
    bias added once per rank drops the output to about 3 dB, an unsummed weight gradient of a
    replicated layer to about 4 dB)."""
    for name, g, f, b in zip(names, got, fp8, bf16):
        assert sqnr(b, g) > sqnr(b, f) - 1, name
        assert sqnr(f, g) > 20, name


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@TWO_RANK_DEVICES
def test_tensor_parallel_matches_one_device(device_type, tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(parallel_run, args=(2, str(tmp_path / "store"), device_type, results), nprocs=2)
        results = dict(results)
    device = torch.device(device_type)  # the single-device references: CPU, or the first GPU
    want_bf16 = first_step(make_model(fp8=False, device=device), device=device)
    single = make_model(device=device)
    want_fp8 = first_step(single, device=device)
    want_losses = train(single, device)
    layer_bf16 = first_step(make_layer(fp8=False, device=device), device=device)
    layer_fp8 = first_step(make_layer(device=device), device=device)
    norm = norm_model(device)[0]  # PyTorch's nn.RMSNorm: what the sequence-parallel one must run
    x = batch(0, device).requires_grad_()
    out = norm(x)
    out.float().square().mean().backward()
    want_norm = [out.detach().cpu(), x.grad.cpu(), norm.weight.grad.cpu()]
    want_gate = [first_step(gated_model(device, fp8), device=device) for fp8 in (True, False)]
    for rank in (0, 1):
        r = results[rank]
        assert_as_close_to_bf16(r["step"], want_fp8, want_bf16, NAMES)
        assert_as_close_to_bf16(r["sequence_parallel"], want_fp8, want_bf16, NAMES)
        for got, want in zip(r["converted_late"], r["step"]):  # the same layers, converted later
            assert torch.equal(got, want)
        assert_as_close_to_bf16(r["replicated"], layer_fp8, layer_bf16,
                                ["output", "grad x", "grad w", "grad b"])
        for got, want in zip(r["compiled"], r["step"]):  # compiled: eager's results, bit for bit
            assert torch.equal(got, want)
        assert len(r["checkpointed"]) == len(r["step"])
        for got, want in zip(r["checkpointed"], r["step"]):
            assert torch.equal(got, want)
        for got, want in zip(*r["empty_shard"]):
            assert torch.equal(got, want)
        # Rows are normalized alike on either rank: output and input gradient bit for bit; the
        # weight gradient is summed over the ranks' tokens (another order).
        assert torch.equal(r["norm_sp"][0], want_norm[0]) and torch.equal(r["norm_sp"][1], want_norm[1])
        torch.testing.assert_close(r["norm_sp"][2], want_norm[2], rtol=2**-7, atol=1e-6)
        assert_as_close_to_bf16(r["gate_tp"], *want_gate, ["output", "grad x", "grad w1", "grad w3", "grad w2"])
        assert r["bias_grad_placement"] == "(Replicate(),)"
        assert r["input_casts"] == 1
        for got, want in zip(r["losses"], want_losses):
            assert abs(got - want) < 0.02 * want
        for got, want in zip(r["weights"], single.parameters()):
            assert sqnr(want.detach().cpu(), got) > 20
        plain, placed, narrow = r["errors"]
        assert "is a Tensor" in plain and "pass a DTensor" in plain
        assert "weight S(1) and input S(0)" in placed
        assert "shard is [24, 64]" in narrow and "multiples of 16" in narrow
    assert torch.equal(results[0]["row_bias"], results[1]["row_bias"])  # the ranks agree


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_one_rank_mesh_is_bit_exact(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(one_rank_run, args=(str(tmp_path / "store"), device, results), nprocs=1)
        results = dict(results)
    for got, want in zip(results["parallel"], results["plain"]):
        assert torch.equal(got, want)
    assert results["recomputation_found_amax"] == [True, True]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_over_tensor_parallel_matches_tensor_parallel_bit_for_bit(tmp_path):
    """FSDP2 + TP on a 2-D mesh: FSDP2 all-gathers each weight's dp shards back into the tp-sharded
    DTensor the layer runs on, and with the same batch on both dp ranks its averaged gradient is
    the tp-only one ((g + g) / 2 == g): training must match tensor parallelism alone bit for bit."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(fsdp_tp_run, args=(4, str(tmp_path / "store"), results), nprocs=4)
        results = dict(results)
    for rank in range(4):
        (losses, tp_losses), (weights, tp_weights) = results[rank]["losses"], results[rank]["weights"]
        assert losses == tp_losses
        assert len(weights) == 4
        # FSDP2 shards dim 0 over dp on top of the styles' tp placements (w1 and b1 column-wise,
        # w2 row-wise, b2 replicated on tp)
        assert results[rank]["placements"] == [
            (("dp", "tp"), "(_StridedShard(dim=0, sf=2), Shard(dim=0))"),
            (("dp", "tp"), "(_StridedShard(dim=0, sf=2), Shard(dim=0))"),
            (("dp", "tp"), "(Shard(dim=0), Shard(dim=1))"),
            (("dp", "tp"), "(Shard(dim=0), Replicate())")]
        for got, want in zip(weights, tp_weights):
            assert torch.equal(got, want)


def test_shards_of_any_size_are_taken_under_the_blockwise_recipe():
    """A rank's weight shard whose sides are not multiples of 16: refused where the GEMMs need them,
    taken under the blockwise recipe, whose GEMMs are zero-padded."""
    import types

    from f8tensor import Float8Config
    from f8tensor.distributed.tensor_parallel import _check_local_sizes

    shard = torch.empty(24, 64)
    weight = types.SimpleNamespace(shape=(48, 64), placements=("Shard(dim=0)",))
    _check_local_sizes(shard, weight, Float8Config.from_recipe_name("blockwise"))
    with pytest.raises(ValueError, match="use the blockwise recipe"):
        _check_local_sizes(shard, weight, Float8Config())
