"""FSDP2's float8 all-gather (Float8Config(fsdp_float8_all_gather=True), f8tensor/distributed/
fsdp_float8.py), 2 ranks: CPU processes on gloo everywhere, two GPUs on NCCL where a machine has them.

Each rank casts its weight shard with the weight's global scale, so the gathered float8 weight has
the bits one process would cast: with the same batches on both ranks, sharded training with the
float8 all-gather must reproduce single-process float8 training bit for bit, with or without
precomputed scales, resharding after forward or not. (Float8 dims are multiples of 16, so two
ranks always split dim 0 evenly: the padding of uneven shards is exercised on three ranks below.)"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from f8utils import TWO_RANK_DEVICES, SwiGLU, join_process_group
from test_fsdp2 import shard_layers
from test_fsdp2 import train as fsdp2_train
from torch import nn

from f8tensor import Float8Config, Float8Linear, Float8Tensor, convert_to_float8_training, fuse_model_ops
from f8tensor import precompute_float8_scales
from f8tensor.distributed.fsdp_float8 import Float8AllGatherWeight

STEPS = 3


def make_model(all_gather: bool, device="cpu", fused=True):
    """Six float8 layers (three, and a SwiGLU feed-forward's three), an RMSNorm, fused. Without
    fused (compiled cases), three float8 layers and no norm or gate: under compile those are
    PyTorch's ops, whose bits differ from the eager kernels' the reference runs."""
    torch.manual_seed(0)
    layers = [nn.Linear(64, 128)] + ([nn.RMSNorm(128)] if fused else [])
    layers += [nn.GELU(), nn.Linear(128, 48), nn.GELU(), nn.Linear(48, 32)] + ([SwiGLU(32, 64)] if fused else [])
    model = nn.Sequential(*layers)
    model = convert_to_float8_training(model.bfloat16().to(device), module_filter_fn=lambda mod, fqn: True,
                                       config=Float8Config(fsdp_float8_all_gather=all_gather))
    fuse_model_ops(model)
    return model


def train(model, device, precompute=False, layers=6, steps=STEPS):
    """test_fsdp2's training loop; with precompute, every weight's scale precomputed after each step."""
    def precomputed():
        assert precompute_float8_scales(model) == layers

    return fsdp2_train(model, 1, device, steps=steps, after_step=precomputed if precompute else None)


def sharded_run(rank, world, store, device_type, precompute, reshard, compiled, ac, results):
    device = join_process_group(rank, world, store, device_type)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.utils.checkpoint import checkpoint

        model = make_model(True, device, fused=not compiled)
        mesh = init_device_mesh(device_type, (world,))
        if compiled == "blocks":  # torchtitan's order: each block compiled (fullgraph), then sharded
            # (three layer shapes, each with and without an input needing grad: one code object)
            torch._dynamo.config.recompile_limit = 16
        compile_first = (lambda layer: layer.compile(fullgraph=True, dynamic=False)) if compiled == "blocks" else None
        shard_layers(model, mesh, compile_first, reshard_after_forward=reshard)
        gathered = []
        if compiled != "blocks":  # (a hook appending to a list would recompile a compiled layer)
            for layer in model.modules():
                if isinstance(layer, Float8Linear):
                    layer.register_forward_pre_hook(lambda mod, args: gathered.append(type(mod.weight)))
        local = model[0].weight.to_local()
        assert isinstance(local, Float8AllGatherWeight) and local.shape == (128 // world, 64)
        if ac:  # the whole model recomputed in backward: the weights gathered again
            forward = model.forward
            model.forward = lambda x: checkpoint(forward, x, use_reentrant=False)
        run = torch.compile(model, dynamic=False) if compiled is True else model
        losses = train(run, device, precompute, layers=3 if compiled else 6)
        state = model.state_dict()
        assert type(state["0.weight"].to_local()) is torch.Tensor  # checkpoints hold plain bf16 shards
        model.load_state_dict(state)
        weights = [p.full_tensor().detach().cpu() for p in model.parameters()]
        weights = [w._tensor if isinstance(w, Float8AllGatherWeight) else w for w in weights]
        results[rank] = (losses, weights, set(gathered))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@TWO_RANK_DEVICES
@pytest.mark.parametrize("precompute, reshard, compiled, ac", [
    (False, True, False, False), (True, True, False, False), (True, False, False, False), (True, True, False, True),
    (True, True, True, False), (True, True, "blocks", False)],
    ids=["amax_per_gather", "precomputed", "precomputed_no_reshard", "checkpointed", "compiled", "blocks_compiled"])
def test_float8_all_gather_matches_single_process_bit_for_bit(precompute, reshard, compiled, ac, device_type,
                                                              tmp_path):
    """Also with the model checkpointed (recomputation gathers the weights again) and compiled
    (torch.compile over the sharded model, FSDP2's hooks outside the graphs; and each layer compiled
    with fullgraph before sharding, FSDP2's hooks inside them: the same bits as eager)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(sharded_run, args=(2, str(tmp_path / "store"), device_type, precompute, reshard, compiled, ac,
                                    results), nprocs=2)
        results = dict(results)
    device = torch.device(device_type)
    model = make_model(False, device, fused=not compiled)  # one process, the switch off: each forward casts
    want_losses = train(model, device)
    for rank in (0, 1):
        losses, weights, gathered = results[rank]
        assert gathered == ({Float8Tensor} if compiled != "blocks" else set())  # layers read float8 weights
        assert losses == want_losses
        for got, want in zip(weights, model.parameters()):
            assert torch.equal(got, want.detach().cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
@pytest.mark.parametrize("precompute", [False, True], ids=["amax_per_gather", "precomputed"])
def test_one_gpu_nccl_float8_all_gather_matches_one_process_bit_for_bit(precompute, tmp_path):
    """World size 1 on NCCL (what a one-GPU machine can run): FSDP2's hooks, the all-reduce of the
    amax and the all-gather of float8 bytes go through NCCL and the Triton kernels; the results must
    be the plain model's, bit for bit."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(sharded_run, args=(1, str(tmp_path / "store"), "cuda", precompute, True, False, False, results),
                 nprocs=1)
        losses, weights, gathered = dict(results)[0]
    model = make_model(False, torch.device("cuda"))
    assert gathered == {Float8Tensor}
    assert losses == train(model, "cuda")
    for got, want in zip(weights, model.parameters()):
        assert torch.equal(got, want.detach().cpu())


def all_reduce_count_run(rank, world, store, results):
    join_process_group(rank, world, store, "cpu")
    try:
        from torch.distributed.device_mesh import init_device_mesh

        model = make_model(True)
        mesh = init_device_mesh("cpu", (world,))
        shard_layers(model, mesh)
        calls, real = [], dist.all_reduce

        def counted(*args, **kwargs):
            calls.append(args[0].numel())
            return real(*args, **kwargs)

        dist.all_reduce = counted
        try:
            per_step = []
            train(model, "cpu", precompute=True, steps=1)  # the first step gathers before any precompute
            for _ in range(2):
                calls.clear()
                train(model, "cpu", precompute=True, steps=1)  # forward, backward, AdamW step, precompute
                per_step.append(list(calls))
        finally:
            dist.all_reduce = real
        results[rank] = per_step
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_precomputed_scales_take_one_all_reduce_per_step(tmp_path):
    """With precompute_float8_scales after each step, a whole training step all-reduces once: the six
    weights' amaxes together (FSDP2 reduce-scatters the gradients; no gather all-reduces its own)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(all_reduce_count_run, args=(2, str(tmp_path / "store"), results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        assert results[rank] == [[6], [6]]


def test_outside_fsdp2_the_weight_is_its_high_precision_values():
    """One process with the switch on trains as with it off (the subclass unwraps in every op), and
    the optimizer's step keeps the subclass; a precomputed amax is dropped when the weight is written."""
    on, off = make_model(True), make_model(False)
    assert isinstance(on[0].weight, Float8AllGatherWeight) and type(off[0].weight) is nn.Parameter
    assert train(on, "cpu") == train(off, "cpu")
    for a, b in zip(on.parameters(), off.parameters()):
        assert torch.equal(a._tensor if isinstance(a, Float8AllGatherWeight) else a, b)
    assert isinstance(on[0].weight, Float8AllGatherWeight)
    state = on.state_dict()
    assert type(state["0.weight"]) is torch.Tensor and torch.equal(state["0.weight"], off.state_dict()["0.weight"])
    on.load_state_dict(off.state_dict())
    assert isinstance(on[0].weight, Float8AllGatherWeight)


def test_the_switch_wraps_the_weight_however_the_layer_is_made():
    """Float8Config(fsdp_float8_all_gather=True) handed to Float8Linear(...) or from_float makes the
    weight gather in float8 as conversion does (both ignored the switch silently): a
    Float8AllGatherWeight holding the layer's values, state dicts of plain tensors, the state-dict
    hooks registered once, a hook of the original layer still running, the same outputs."""
    config = Float8Config(fsdp_float8_all_gather=True)
    made = Float8Linear(64, 32, config=config)
    assert isinstance(made.weight, Float8AllGatherWeight) and made.weight.requires_grad
    assert type(made.state_dict()["weight"]) is torch.Tensor and len(made._state_dict_hooks) == 1
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    converted = convert_to_float8_training(nn.Sequential(copy.deepcopy(lin)), config=config,
                                           module_filter_fn=lambda module, fqn: True)[0]
    seen = []
    lin._register_state_dict_hook(lambda module, state, prefix, metadata: seen.append(prefix))
    new = Float8Linear.from_float(lin, config)
    assert isinstance(new.weight, Float8AllGatherWeight) and torch.equal(new.weight._tensor, lin.weight)
    assert new.bias is lin.bias and new.config == config
    state = new.state_dict()
    assert type(state["weight"]) is torch.Tensor and torch.equal(state["weight"], lin.weight) and seen == [""]
    assert len(new._state_dict_hooks) == 2  # the original layer's and the switch's, once
    x = torch.randn(4, 64)
    assert torch.equal(new(x), converted(x))


def test_a_precomputed_amax_holds_until_its_weight_is_written():
    """Events of the weight itself end it, on every rank alike: its optimizer's step, its layer's
    load, an in-place write (its version counter), forget_precomputed_scales. Reads, views and
    copies of the weight (FSDP2 pads shards by copying) share it and leave it, and so does
    state_dict()."""
    from f8tensor.distributed.fsdp_float8 import forget_precomputed_scales

    model = make_model(True)
    weight = model[0].weight
    record = weight._precomputed

    def valid():
        return record.amax_for(weight._tensor) is not None

    assert not valid() and precompute_float8_scales(model) == 6 and valid()
    assert weight.detach()._precomputed is record and torch.empty_like(weight)._precomputed is record
    snapshot = torch.empty_like(weight._tensor)
    snapshot.copy_(weight)  # reads, and a write through a copy, leave it valid
    torch.empty_like(weight).copy_(weight)
    model.state_dict()
    assert valid()
    with torch.no_grad():
        assert weight.mul_(1) is weight  # in-place ops return their argument, as for tensors
    assert not valid()  # written (if with the same values)
    precompute_float8_scales(model)
    with torch.no_grad():
        model.state_dict()["0.weight"].add_(0)  # as dcp.load writes into what state_dict() handed out
    assert not valid()
    precompute_float8_scales(model)
    model.load_state_dict(model.state_dict())
    assert not valid()
    precompute_float8_scales(model)
    forget_precomputed_scales()
    assert not valid()
    precompute_float8_scales(model)
    train(model, "cpu", steps=1)
    assert not valid()  # the optimizer step
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.register_step_post_hook(lambda *_: precompute_float8_scales(model))  # as torchtitan hooks torchao's
    opt.step()
    assert valid()


def test_other_models_steps_and_loads_leave_a_precomputed_amax():
    """An optimizer that does not hold the weight (a probe, an eval copy's: perhaps on one rank
    only) and a load into another model leave the amax: had they dropped it on the ranks that
    run them, those ranks would all-reduce before the gather and the others not."""
    model, other = make_model(True), make_model(True)
    record = model[0].weight._precomputed
    precompute_float8_scales(model)
    probe = torch.zeros(3, requires_grad=True)
    probe.grad = torch.ones(3)
    torch.optim.SGD([probe], lr=0.1).step()
    for p in other.parameters():
        p.grad = torch.ones_like(p)
    torch.optim.SGD(other.parameters(), lr=0.1).step()
    other.load_state_dict(model.state_dict())
    assert record.amax_for(model[0].weight._tensor) is not None


def test_a_weight_sharded_along_another_dim_is_refused(tmp_path):
    """shard_placement_fn other than FSDP2's default dim 0: refused with the reason at the first gather."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(dim1_run, args=(2, str(tmp_path / "store"), results), nprocs=2)
        assert all("shards along dim 0" in r for r in dict(results).values())


def dim1_run(rank, world, store, results):
    join_process_group(rank, world, store, "cpu")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        model = make_model(True, fused=False)
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)), shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
        try:
            model(torch.randn(2, 16, 64).bfloat16())
            results[rank] = "no error"
        except ValueError as e:
            results[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_keep_fp8_weight_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="fsdp_float8_all_gather and keep_fp8_weight exclude each other"):
        Float8Config(fsdp_float8_all_gather=True, keep_fp8_weight=True)


def gathered_bytes_run(rank, world, store, device_type, all_gather, results):
    """Bytes FSDP2's all-gathers write in one forward (the collective's output, all ranks' shards)."""
    device = join_process_group(rank, world, store, device_type)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        model = make_model(all_gather, device)
        mesh = init_device_mesh(device_type, (world,))
        shard_layers(model, mesh)
        # FSDP2's collective: all_gather_into_tensor (torch 2.11), all_gather_single (2.13)
        moved, names = [], [n for n in ("all_gather_into_tensor", "all_gather_single") if hasattr(dist, n)]
        real = {name: getattr(dist, name) for name in names}

        def counted(name):
            def call(output, input, *args, **kwargs):
                moved.append(output.numel() * output.element_size())
                return real[name](output, input, *args, **kwargs)
            return call

        for name in names:
            setattr(dist, name, counted(name))
        try:
            model(torch.randn(2, 16, 64).bfloat16().to(device))
        finally:
            for name in names:
                setattr(dist, name, real[name])
        assert moved, "no all-gather was counted"
        results[rank] = sum(moved)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@TWO_RANK_DEVICES
def test_float8_all_gather_moves_one_byte_per_weight_element(device_type, tmp_path):
    """The same forward gathers one byte less per float8 layer weight element than bf16 gathering
    (biases, the norm's weight stay bf16)."""
    moved = {}
    for all_gather in (False, True):
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(gathered_bytes_run, args=(2, str(tmp_path / f"store{all_gather}"), device_type, all_gather,
                                               results), nprocs=2)
            moved[all_gather] = dict(results)[0]
    weights = sum(m.weight.numel() for m in make_model(False).modules() if isinstance(m, Float8Linear))
    assert moved[False] - moved[True] == weights


def fsdp_tp_run(rank, world, store, results):
    """One of 4 CPU ranks on a (dp 2, tp 2) mesh: FSDP2 with the float8 all-gather over tensor-parallel
    float8 layers, and the same model tensor-parallel only, fed the same batches."""
    join_process_group(rank, world, store)
    try:
        from test_tensor_parallel import full
        from test_tensor_parallel import train as tp_train
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        def model(all_gather):
            torch.manual_seed(0)
            m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).bfloat16()
            return convert_to_float8_training(m, module_filter_fn=lambda mod, fqn: True,
                                              config=Float8Config(fsdp_float8_all_gather=all_gather))

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
        both = model(True)
        parallelize_module(both, mesh["tp"], plan)
        for layer in (both[0], both[2]):
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(both, mesh=mesh["dp"])
        assert isinstance(both[0].weight.to_local(), Float8AllGatherWeight)
        tp_only = model(False)
        parallelize_module(tp_only, mesh["tp"], plan)
        losses = tp_train(both)
        assert precompute_float8_scales(both) == 2  # then one more step with the precomputed amaxes
        losses += tp_train(both)[:1]
        want = tp_train(tp_only)
        want += tp_train(tp_only)[:1]
        weights = [full(p).detach() for p in both.parameters()]
        weights = [w._tensor if isinstance(w, Float8AllGatherWeight) else w for w in weights]
        results[rank] = (losses, want, weights, [full(p).detach() for p in tp_only.parameters()])
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_over_tensor_parallel_with_float8_all_gather_matches_tensor_parallel(tmp_path):
    """On a (dp, tp) mesh FSDP2 gathers each tp shard in float8 with the scale of that shard, the
    scale tensor parallelism alone gives it: training matches tensor parallelism bit for bit, also
    with precomputed scales (all-reduced over dp only)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(fsdp_tp_run, args=(4, str(tmp_path / "store"), results), nprocs=4)
        results = dict(results)
    for rank in range(4):
        losses, want, weights, want_weights = results[rank]
        assert losses == want
        for got, w in zip(weights, want_weights):
            assert torch.equal(got, w)


def hsdp_run(rank, world, store, results):
    """One of 4 CPU ranks, HSDP on a (replicate 2, shard 2) mesh with the float8 all-gather and
    precomputed scales."""
    join_process_group(rank, world, store, "cpu")
    try:
        from torch.distributed.device_mesh import init_device_mesh

        model = make_model(True)
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        shard_layers(model, mesh)
        with torch.no_grad():  # rows of very different size on the two shard ranks: one global amax needed
            model[0].weight.to_local()[:].mul_(4 if mesh.get_local_rank("shard") == 0 else 1)
        losses = train(model, "cpu", precompute=True)
        weights = [p.full_tensor().detach() for p in model.parameters()]
        results[rank] = (losses, [w._tensor if isinstance(w, Float8AllGatherWeight) else w for w in weights])
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_hsdp_precomputed_scales_reduce_over_the_shard_group(tmp_path):
    """Under HSDP the precomputed amax is all-reduced over the shard dim (the mesh's second), not the
    replicate dim: training matches one process bit for bit (the same batch on all 4 ranks)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(hsdp_run, args=(4, str(tmp_path / "store"), results), nprocs=4)
        results = dict(results)
    model = make_model(False)
    with torch.no_grad():
        model[0].weight[:64].mul_(4)  # the shard rank 0's rows, as above
    want = train(model, "cpu")
    for rank in range(4):
        losses, weights = results[rank]
        assert losses == want
        for got, w in zip(weights, model.parameters()):
            assert torch.equal(got, w.detach())


def three_rank_run(rank, world, store, results):
    """One of 3 CPU ranks: 128 rows split 43/43/42 (FSDP2 pads the last shard, and swaps in a new
    padded local tensor at lazy init on that rank only); scales precomputed before the first forward,
    the weights written in place after it (seen on the swapped-in tensor too), then training. The
    collectives go through a group that times out in seconds."""
    join_process_group(rank, world, store, "cpu")
    try:
        from datetime import timedelta

        from torch.distributed.device_mesh import DeviceMesh

        mesh = DeviceMesh.from_group(dist.new_group(timeout=timedelta(seconds=20)), "cpu")
        runs = []
        for all_gather in (True, False):
            model = make_model(all_gather)
            shard_layers(model, mesh)
            if all_gather:
                assert precompute_float8_scales(model) == 6
            model(torch.randn(2, 16, 64).bfloat16())
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(2)
            runs.append((train(model, "cpu", precompute=all_gather),
                         [p.full_tensor().detach() for p in model.parameters()]))
        (losses, weights), (want_losses, want_weights) = runs
        results[rank] = losses == want_losses and all(
            torch.equal(w._tensor if isinstance(w, Float8AllGatherWeight) else w, v)
            for w, v in zip(weights, want_weights))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_uneven_shards_over_three_ranks_match_gathering_in_bf16(tmp_path):
    """Padded shards, and a precomputed amax that must survive FSDP2's lazy-init swap on the padded
    rank (else that rank alone all-reduces, and the ranks hang), and be dropped there by a later
    write as on the other ranks (else that rank alone does not): the float8 all-gather trains as
    FSDP2 gathering bf16 does, bit for bit (three ranks average gradients inexactly, so the
    reference is FSDP2 itself, not one process)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(three_rank_run, args=(3, str(tmp_path / "store"), results), nprocs=3)
        assert dict(results) == {0: True, 1: True, 2: True}


def checkpoint_run(rank, world, store, path, reload, results):
    """Save a float8-all-gather model with torch.distributed.checkpoint, load it into a fresh one
    (reload: then load_state_dict of what dcp.load wrote; else dcp.load's writes in place only)."""
    join_process_group(rank, world, store, "cpu")
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh

        def sharded(seed_offset):
            model = make_model(True)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(seed_offset)
            mesh = init_device_mesh("cpu", (world,))
            return shard_layers(model, mesh)

        saved = sharded(0.0)
        train(saved, "cpu", precompute=True, steps=1)
        state = saved.state_dict()
        assert all(type(v.to_local()) is torch.Tensor for v in state.values())
        dcp.save(state, checkpoint_id=path)
        loaded = sharded(1.0)  # other values
        assert precompute_float8_scales(loaded) == 6
        target = loaded.state_dict()
        dcp.load(target, checkpoint_id=path)
        if reload:
            loaded.load_state_dict(target)
        x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
        same = all(torch.equal(_local_values(a), _local_values(b))
                   for a, b in zip(saved.parameters(), loaded.parameters()))
        results[rank] = same and torch.equal(saved(x), loaded(x))  # the writes dropped the precomputed amaxes
    finally:
        dist.destroy_process_group()


def _local_values(p):
    local = p.to_local()
    return local._tensor if isinstance(local, Float8AllGatherWeight) else local


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("reload", [True, False], ids=["load_state_dict", "dcp_load_in_place"])
def test_distributed_checkpoint_round_trip(reload, tmp_path):
    """torch.distributed.checkpoint saves the plain bf16 shards and loads them into float8-all-gather
    weights; the loaded model computes what the saved one does (its precomputed amaxes, taken
    before the load, are not used after it), also where dcp.load only writes in place into the
    tensors state_dict() handed out (no load_state_dict after it: the weights' version counters
    see the writes)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(checkpoint_run, args=(2, str(tmp_path / "store"), str(tmp_path / "ckpt"), reload, results),
                 nprocs=2)
        assert dict(results) == {0: True, 1: True}


def rank_local_run(rank, world, store, results):
    """Rank 0 alone steps a probe optimizer and loads an eval copy of the model; then both ranks run
    the sharded model, whose collectives go through a group that times out in seconds."""
    join_process_group(rank, world, store, "cpu")
    try:
        from datetime import timedelta

        from torch.distributed.device_mesh import DeviceMesh

        mesh = DeviceMesh.from_group(dist.new_group(timeout=timedelta(seconds=20)), "cpu")
        model = shard_layers(make_model(True), mesh)
        x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
        want = model(x).detach()
        assert precompute_float8_scales(model) == 6
        if rank == 0:
            probe = torch.zeros(3, requires_grad=True)
            probe.grad = torch.ones(3)
            torch.optim.SGD([probe], lr=0.1).step()
            make_model(True).load_state_dict(make_model(True).state_dict())
        try:
            results[rank] = torch.equal(model(x), want)
        except RuntimeError as e:  # gloo's timeout: the ranks ran different collectives
            results[rank] = str(e)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_step_or_load_on_one_rank_only_keeps_the_collectives_matched(tmp_path):
    """Precomputed amaxes are dropped per weight: rank 0's probe optimizer and eval copy leave the
    sharded model's, so both ranks gather without an all-reduce (were rank 0's dropped, it alone
    would all-reduce first, and the ranks would hang)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_local_run, args=(2, str(tmp_path / "store"), results), nprocs=2)
        assert dict(results) == {0: True, 1: True}


def assign_run(rank, world, store, results):
    """A meta-initialised float8-all-gather model, sharded, loaded from rank 0's full state dict
    (set_model_state_dict, which loads with assign=True); and the same model built with its values."""
    join_process_group(rank, world, store, "cpu")
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        full = make_model(False, fused=False).state_dict()
        model = shard_layers(make_model(True, "meta", fused=False), mesh)
        set_model_state_dict(model, full if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        gathered = []
        for layer in model.modules():
            if isinstance(layer, Float8Linear):
                layer.register_forward_pre_hook(lambda mod, args: gathered.append(type(mod.weight)))
        x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
        want = shard_layers(make_model(True, fused=False), mesh)(x)
        weights = {type(m.weight.to_local()) for m in model.modules() if isinstance(m, Float8Linear)}
        same = torch.equal(model(x), want)
        results[rank] = (weights, precompute_float8_scales(model), set(gathered), same)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_loading_with_assign_keeps_the_float8_all_gather(tmp_path):
    """load_state_dict(assign=True) replaces the weights by the state dict's tensors: they are
    wrapped as they come, so the layers still gather in float8 (not bf16), their scales can be
    precomputed, and the model computes what one built with those values does."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(assign_run, args=(2, str(tmp_path / "store"), results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        assert results[rank] == ({Float8AllGatherWeight}, 3, {Float8Tensor}, True)
