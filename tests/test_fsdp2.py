"""FSDP2 (fully_shard) over Float8Linear layers, 2 ranks: CPU processes on gloo everywhere, and
two GPUs on NCCL where a machine has them.

Both ranks feed the same batches, so FSDP2's averaged gradient equals the single-process one
exactly ((g + g) / 2 == g) and the sharded run must reproduce single-process training bit for bit.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from f8utils import TWO_RANK_DEVICES, SwiGLU, join_process_group, skip_rowwise_without_cpu_gemm
from torch import nn

from f8tensor import Float8Config, Float8Linear, RMSNorm, convert_to_float8_training, fuse_model_ops
from f8tensor.fusion.gate_proof import GATE_ATTR, SwiGLUGate

STEPS = 4


def make_model(keep_weight=False, device="cpu", norm=True, recipe="tensorwise"):
    """Three float8 layers; with norm, an RMSNorm after the first (fuse_model_ops swaps in the fused
    one, whose weight the root's fully_shard shards) and a SwiGLU feed-forward at the end (fusion
    fuses its gate; its layers are sharded by the root's fully_shard too). Compiled cases leave both
    out: under compile they are PyTorch's ops, whose bits differ from the eager kernels', and those
    cases compare with eager."""
    torch.manual_seed(0)
    layers = [nn.Linear(64, 128)] + ([nn.RMSNorm(128)] if norm else [])
    layers += [nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32)] + ([SwiGLU(32, 64)] if norm else [])
    model = nn.Sequential(*layers)
    if norm:
        nn.init.normal_(model[1].weight, 1.0, 0.3)
    config = Float8Config.from_recipe_name(recipe).replace(keep_fp8_weight=keep_weight)
    if recipe == "blockwise" and torch.device(device).type == "cpu":  # CPU's _scaled_mm has no blockwise scaling
        config = config.replace(emulate=True)
    model = convert_to_float8_training(model.bfloat16().to(device), module_filter_fn=lambda mod, fqn: True,
                                       config=config)
    fuse_model_ops(model)
    assert not norm or (type(model[1]) is RMSNorm and isinstance(model[-1].__dict__[GATE_ATTR], SwiGLUGate))
    return model


def train(model, micro_batches=1, device="cpu", steps=STEPS, after_step=None):
    """AdamW steps on fixed batches [2, 16, 64]; the losses. after_step(): called after each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        for _ in range(micro_batches):
            x = torch.randn(2, 16, 64, generator=g).bfloat16().to(device)
            loss = model(x).float().square().mean()
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step()
    return losses


def shard_layers(model, mesh, before=None, **options):
    """fully_shard over every Float8Linear (after before(layer), if given), then over the model,
    as torchtitan shards blocks; returns the model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.modules():
        if isinstance(layer, Float8Linear):
            if before is not None:
                before(layer)
            fully_shard(layer, mesh=mesh, **options)
    return fully_shard(model, mesh=mesh, **options)


def sharded_run(rank, world, store, device_type, keep_weight, compiled, recipe, ac, results):
    """One rank: CPU on gloo, or GPU `rank` on NCCL."""
    device = join_process_group(rank, world, store, device_type)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

        model = make_model(keep_weight, device, norm=not compiled, recipe=recipe)
        reuses = []
        mesh = init_device_mesh(device_type, (world,))
        shard_layers(model, mesh)
        if ac:  # the whole model recomputed to its end (torchtitan's early stop off): the weights gathered again
            forward = model.forward

            def checkpointed(x):
                with set_checkpoint_early_stop(False):
                    return checkpoint(forward, x, use_reentrant=False)

            model.forward = checkpointed
            from f8tensor.core import weight_amax

            real_latest = weight_amax.latest  # log whether each recomputed weight cast finds its record
            def latest(w):
                record = real_latest(w)
                reuses.append(record is not None)
                return record

            weight_amax.latest = latest
        # compiled: "static" compiles with dynamic=False, "dynamic" with torch.compile's default
        # (automatic dynamic shapes: each layer's frame, split off by FSDP2's skipped hooks, is
        # recompiled with symbolic sizes once a second layer shape arrives).
        if compiled:
            model = torch.compile(model, dynamic=False if compiled == "static" else None)
        losses = train(model, 2 if keep_weight else 1, device)
        weights = [p.full_tensor().detach().cpu() for p in model.parameters()]
        results[rank] = (losses, weights, reuses)
    finally:
        dist.destroy_process_group()



@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@TWO_RANK_DEVICES
@pytest.mark.parametrize("keep_weight, compiled, recipe, ac", [
    (False, False, "tensorwise", False), (True, False, "tensorwise", False), (False, "static", "tensorwise", False),
    (False, "dynamic", "tensorwise", False), (False, False, "rowwise", False), (False, "static", "rowwise", False),
    (False, False, "blockwise", False), (False, "static", "blockwise", False), (False, False, "tensorwise", True)],
    ids=["default", "keep_fp8_weight", "compiled", "compiled_dynamic", "rowwise", "rowwise_compiled", "blockwise",
         "blockwise_compiled", "checkpointed"])
def test_fully_shard_matches_single_process_bit_for_bit(keep_weight, compiled, recipe, ac, device_type, tmp_path):
    """keep_fp8_weight under FSDP2, 2 micro-batches per step: correct training. (FSDP2 gives the
    unsharded parameter new storage at each all-gather here, so the copies are not reused: the
    optimizer-hook safety net is tested in test_weight_cache.py.) Compiled over FSDP2: the same
    bits as eager on one process, also with symbolic layer sizes ("compiled_dynamic": Dynamo skips
    FSDP2's hooks, so every layer is a frame of its own, recompiled with symbolic sizes once a
    second shape arrives). That case failed in Dynamo with torch 2.11 (AssertionError in
    `overwrite_tensor_vt_proxy`; on 2 H200s, and on CPU ranks with torch 2.11) while Float8Linear's
    autograd function read sizes of its intermediates (an emptiness test, a shape check).
    "checkpointed": the sharded model recomputed in backward gives the bits of the uncheckpointed
    single process, and every recomputed weight cast reads the first forward's amax
    (core/weight_amax.py), though FSDP2 freed the gathered weights' memory after forward and
    gathered them again."""
    skip_rowwise_without_cpu_gemm(recipe, device_type)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(sharded_run, args=(2, str(tmp_path / "store"), device_type, keep_weight, compiled, recipe, ac,
                                    results), nprocs=2)
        results = dict(results)
    device = torch.device(device_type)  # the reference: one process on the CPU, or on the first GPU
    model = make_model(device=device, norm=not compiled, recipe=recipe)  # the reference casts every time
    want_losses = train(model, 2 if keep_weight else 1, device)
    layers = sum(isinstance(m, Float8Linear) for m in model.modules())
    for rank in (0, 1):
        losses, weights, reuses = results[rank]
        assert losses == want_losses
        assert reuses == [True] * (STEPS * layers if ac else 0)  # one recomputed cast per layer and step
        for got, want in zip(weights, model.parameters()):
            assert torch.equal(got, want.detach().cpu())
