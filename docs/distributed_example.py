"""FSDP2 over tensor parallelism with both float8 all-gathers (docs/distributed.md), on 4 processes:

    torchrun --nproc-per-node 4 docs/distributed_example.py            # 4 GPUs (NCCL), or CPU ranks (gloo)

A (dp 2, tp 2) mesh: each block tensor-parallel as torchtitan's Llama plan lays it out (sequence
parallel norms, column-parallel q/k/v and w1/w3, row-parallel wo and w2), its feed-forward and
attention inputs gathered in float8 (Float8PrepareModuleInput); then FSDP2 over dp, gathering the
weights in float8 (Float8Config(fsdp_float8_all_gather=True)) with every weight's scale computed in
one all-reduce after each optimizer step (precompute_float8_scales). Prints the losses on rank 0.
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from f8tensor import Float8Config, convert_to_float8_training, fuse_model_ops, precompute_float8_scales
from f8tensor.distributed.sequence_parallel import Float8PrepareModuleInput

DIM, HEADS, FFN, VOCAB, SEQ, BATCH = 128, 4, 384, 256, 32, 2  # small: CI runs it on CPU ranks


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x):
        B, S, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds HEADS / tp of them
        q, k, v = (w(x).view(B, S, -1, DIM // HEADS).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        return self.wo(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(DIM, FFN, bias=False), nn.Linear(DIM, FFN, bias=False)
        self.w2 = nn.Linear(FFN, DIM, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.attention, self.feed_forward = Attention(), FeedForward()

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def main():
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"])
    device_type = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    mesh = init_device_mesh(device_type, (dist.get_world_size() // 2, 2), mesh_dim_names=("dp", "tp"))

    torch.manual_seed(0)
    model = Model().to(device_type, torch.bfloat16)
    # 1. convert (the output layer stays bf16) and fuse, 2. tensor parallelism, 3. FSDP2
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn != "output",
                               config=Float8Config(fsdp_float8_all_gather=True))
    fuse_model_ops(model)
    parallelize_module(model, mesh["tp"], {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    for block in model.layers:
        parallelize_module(block, mesh["tp"], {
            "attention_norm": SequenceParallel(),
            "attention": Float8PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": Float8PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(mesh["dp"].get_local_rank())  # each dp rank its own tokens
    for step in range(5):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g).to(device_type)
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        precompute_float8_scales(model)  # the next step's weight scales: one all-reduce for the model
        if dist.get_rank() == 0:
            print(f"step {step}  loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
