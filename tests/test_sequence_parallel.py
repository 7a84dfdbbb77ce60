"""Float8 sequence-parallel all-gather (f8tensor/distributed/sequence_parallel.py), 2 gloo CPU ranks:
a block under torchtitan's tensor-parallel plan, its feed-forward's input gathered in float8 by
Float8PrepareModuleInput or in bf16 by PyTorch's PrepareModuleInput.

The float8 gather casts every rank's shard with the amax of the whole activation, which is the cast
the first column-parallel layer makes of the activation gathered in bf16: the two runs must train
bit for bit alike, while the all-gather moves half the bytes.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from f8utils import SwiGLU, join_process_group
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from f8tensor import convert_to_float8_training, fuse_model_ops

STEPS = 3
DIM, HIDDEN, TOKENS = 64, 192, 16  # w2 reads [tokens, 96] per rank, w1 and w3 [tokens, 64]


class Block(nn.Module):
    """A pre-norm feed-forward block, as torchtitan's TransformerBlock writes its second half."""

    def __init__(self):
        super().__init__()
        self.ffn_norm = nn.RMSNorm(DIM, eps=1e-5)
        self.feed_forward = SwiGLU(DIM, HIDDEN)

    def forward(self, x):
        return x + self.feed_forward(self.ffn_norm(x))


def make_model(fuse: bool, device) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).bfloat16().to(device)
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: True)
    if fuse:
        fuse_model_ops(model)
    return model


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(2, TOKENS, DIM, generator=g).bfloat16()


class GatheredBytes(TorchDispatchMode):
    """Bytes the all-gathers write (output size: every rank's shard) and the collectives run."""

    def __init__(self):
        super().__init__()
        self.gathered, self.ops = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if "all_gather" in name:
            self.gathered += out.numel() * out.element_size()
        if func.namespace in ("_c10d_functional", "c10d"):
            self.ops.append(name)
        return out


def sp_run(rank, world, store, device_type, results):
    """One rank: CPU on gloo, or (one rank) the GPU on NCCL."""
    device = join_process_group(rank, world, store, device_type)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                       SequenceParallel, parallelize_module)

        from f8tensor.distributed.sequence_parallel import Float8PrepareModuleInput

        mesh = init_device_mesh(device_type, (world,))

        def parallel(float8_gather: bool, fuse: bool = False, use_local_output: bool = False):
            model = make_model(fuse, device)
            prepare = Float8PrepareModuleInput if float8_gather else PrepareModuleInput
            for block in model:
                parallelize_module(block, mesh, {
                    "ffn_norm": SequenceParallel(),
                    "feed_forward": prepare(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                            use_local_output=use_local_output),
                    "feed_forward.w1": ColwiseParallel(),
                    "feed_forward.w3": ColwiseParallel(),
                    "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                })
            return model

        def local(x):  # this rank's tokens (the sequence split as SequenceParallel splits it)
            return x.chunk(world, dim=1)[rank].to(device)

        def train(model, compiled=False):
            fn = torch.compile(model, fullgraph=True) if compiled else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            losses = []
            for step in range(STEPS):
                loss = fn(local(batch(step))).float().square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.detach().cpu())
            return losses, [p.full_tensor().detach().cpu() for p in model.parameters()]

        out = {}
        for name, kwargs in {"bf16": dict(float8_gather=False), "float8": dict(float8_gather=True),
                             "float8_fused": dict(float8_gather=True, fuse=True),
                             "bf16_fused": dict(float8_gather=False, fuse=True),
                             "float8_local": dict(float8_gather=True, use_local_output=True),
                             "bf16_local": dict(float8_gather=False, use_local_output=True)}.items():
            out[name] = train(parallel(**kwargs))
        out["float8_compiled"] = train(parallel(True), compiled=True)
        out["bf16_compiled"] = train(parallel(False), compiled=True)

        # One forward + backward: the bytes every all-gather writes, and the collectives.
        for name, float8_gather in (("bf16_gathers", False), ("float8_gathers", True)):
            model = parallel(float8_gather)
            with GatheredBytes() as forward:
                loss = model(local(batch(0))).float().sum()
            with GatheredBytes() as backward:
                loss.backward()
            out[name] = dict(forward=forward.gathered, backward=backward.gathered, ops=forward.ops + backward.ops)

        # w1 and w3 read one gathered input: their backward reads one float8 column-major copy.
        model = parallel(True)
        saved = []

        def pack(t):
            if t.dtype == torch.float8_e4m3fn and tuple(t.shape) == (2 * TOKENS, DIM):
                saved.append((t.untyped_storage().data_ptr(), t.stride()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model[0](local(batch(0)))
        out["saved_inputs"] = saved

        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world, device_type", [
    (2, "cpu"), pytest.param(1, "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
    ids=["gloo-cpu-2", "nccl-gpu-1"])
def test_float8_sequence_parallel_gather_trains_as_the_bf16_gather_with_half_the_bytes(world, device_type, tmp_path):
    """Two gloo CPU ranks; on a one-GPU machine, world size 1 on NCCL (the kernels and the NCCL
    path, no bytes to compare: one rank gathers nothing)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(sp_run, args=(world, str(tmp_path / "store"), device_type, results), nprocs=world)
        results = dict(results)
    for rank in range(world):
        r = results[rank]
        # eager, and compiled (fullgraph); with fuse_model_ops's gate; and with the module
        # given local tensors (use_local_output: each layer's gradient all-reduced on its own)
        for got, want in (("float8", "bf16"), ("float8_compiled", "bf16_compiled"), ("float8_fused", "bf16_fused"),
                          ("float8_local", "bf16_local")):
            (losses, weights), (want_losses, want_weights) = r[got], r[want]
            assert all(torch.equal(a, b) for a, b in zip(losses, want_losses)), (got, losses, want_losses)
            assert all(torch.equal(a, b) for a, b in zip(weights, want_weights)), got
        assert len(r["saved_inputs"]) == 2 and r["saved_inputs"][0] == r["saved_inputs"][1]
        assert r["saved_inputs"][0][1] == (1, 2 * TOKENS)  # column-major
        if world == 1:
            continue
        # Forward: two blocks, each gathering its [2, 16, 64] activation, bf16 2 bytes an element,
        # float8 1. Backward: the gradient of w2's reduce-scattered output gathered, in bf16 in both.
        bf16, float8 = r["bf16_gathers"], r["float8_gathers"]
        assert bf16["forward"] == 2 * (2 * TOKENS * DIM * 2)
        assert float8["forward"] == 2 * (2 * TOKENS * DIM * 1)
        assert float8["backward"] == bf16["backward"] == 2 * (2 * TOKENS * DIM * 2)
        # The float8 gather adds one all-reduce (the amax) per block; the other collectives are
        # those of the bf16 gather, the gradients reduce-scattered alike.
        assert float8["ops"].count("allreduce_.default") == 2 and "allreduce_.default" not in bf16["ops"]
        assert [op for op in float8["ops"] if op != "allreduce_.default"] == bf16["ops"]


def test_a_float8_input_gives_the_layers_own_cast_bit_for_bit():
    """Float8Linear reading an input already cast (as the gather hands it over) gives what it gives
    when it casts the input itself: output and gradients, bit for bit."""
    from f8tensor import Float8Linear, to_float8

    torch.manual_seed(0)
    layer = Float8Linear(DIM, 32, dtype=torch.bfloat16)
    x = torch.randn(2, TOKENS, DIM, dtype=torch.bfloat16)
    results = []
    for pre_cast in (False, True):
        xi = x.clone().requires_grad_()
        inp = to_float8(xi.detach()).requires_grad_() if pre_cast else xi
        out = layer(inp)
        out.float().square().sum().backward()
        results.append([out.detach(), inp.grad, layer.weight.grad.clone(), layer.bias.grad.clone()])
        layer.zero_grad()
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


def errors_run(rank, world, store, results):
    join_process_group(rank, world, store)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from f8tensor.distributed.sequence_parallel import float8_all_gather

        mesh = init_device_mesh("cpu", (world,))
        x = torch.randn(2, TOKENS, DIM, dtype=torch.bfloat16)
        cases = [x, distribute_tensor(x, mesh, [Shard(2)]), distribute_tensor(x.long(), mesh, [Shard(1)])]
        errors = []
        for case in cases:
            try:
                float8_all_gather(case)
                errors.append(None)
            except (TypeError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
        results[rank] = errors + [config_error(mesh, given) for given in (False, True)]
    finally:
        dist.destroy_process_group()


def config_error(mesh, given: bool):
    """A feed-forward converted with tensorwise_pow2, its input gathered by a Float8PrepareModuleInput
    with the default config, or (given) the layers' config: parallelize_module's error, or None."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from f8tensor import Float8Config
    from f8tensor.distributed.sequence_parallel import Float8PrepareModuleInput

    config = Float8Config.from_recipe_name("tensorwise_pow2")
    model = convert_to_float8_training(SwiGLU(DIM, HIDDEN).bfloat16(), module_filter_fn=lambda mod, fqn: True,
                                       config=config)
    prepare = Float8PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                       **(dict(config=config) if given else {}))
    try:
        parallelize_module(model, mesh, {"": prepare, "w1": ColwiseParallel(), "w3": ColwiseParallel(),
                                         "w2": RowwiseParallel(output_layouts=Shard(1))})
    except TypeError as e:
        return str(e)
    return None


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_float8_all_gather_names_what_it_cannot_gather(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(errors_run, args=(1, str(tmp_path / "store"), results), nprocs=1)
        plain, features, integers, other_config, same_config = dict(results)[0]
    assert plain.startswith("TypeError") and "gathers a DTensor" in plain
    assert features.startswith("ValueError") and "sharded along its features" in features
    assert integers.startswith("TypeError") and "high-precision floating-point" in integers
    # Float8PrepareModuleInput with a config that is not the layers' (the layers check only the
    # float8 format of their input, not its scale rounding): refused where the style is applied
    assert "power_of_2_scale=False" in other_config and "power_of_2_scale=True" in other_config
    assert "config=" in other_config and same_config is None


def test_the_usage_example_imports_what_it_uses():
    """The module docstring's imports run."""
    import f8tensor.distributed.sequence_parallel as module

    imports = [line.strip() for line in module.__doc__.splitlines() if line.strip().startswith("from ")]
    assert imports
    for line in imports:
        exec(line, {})
