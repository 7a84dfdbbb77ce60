"""FSDP2 (fully_shard) over Float8Linear layers, 2 CPU ranks on gloo.

Both ranks feed the same batches, so FSDP2's averaged gradient equals the single-process one
exactly ((g + g) / 2 == g) and the sharded run must reproduce single-process training bit for bit.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from f8tensor import Float8Linear, convert_to_float8_training

STEPS = 4


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))
    return convert_to_float8_training(model.bfloat16(), module_filter_fn=lambda mod, fqn: True)


def train(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        loss = model(torch.randn(2, 16, 64, generator=g).bfloat16()).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def sharded_run(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = make_model()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, Float8Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        losses = train(model)
        weights = [p.full_tensor().detach() for p in model.parameters()]
        results[rank] = (losses, weights)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fully_shard_matches_single_process_bit_for_bit():
    results = mp.Manager().dict()
    mp.spawn(sharded_run, args=(2, free_port(), results), nprocs=2)
    model = make_model()
    want_losses = train(model)
    for rank in (0, 1):
        losses, weights = results[rank]
        assert losses == want_losses
        for got, want in zip(weights, model.parameters()):
            assert torch.equal(got, want.detach())
