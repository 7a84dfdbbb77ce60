"""Checks that let people trust a run (issue 21): a converted and fused block (float8 linears, the
fused norm, SwiGLU gate and complex RoPE) trains the same bits twice from the same seed, eager
and compiled, and a full training step (forward, loss, backward, fused AdamW) asks the host to wait
for the GPU nowhere (torch.cuda.set_sync_debug_mode("error"))."""

import pytest
import torch
from complex_rope_forms import KV, H, HEAD, PairAttention
from f8utils import DEVICE, SwiGLU, convert_and_fuse
from torch import nn

from f8tensor import fusion_report
from f8tensor.fusion import rope_proof

ON_GPU = DEVICE.type == "cuda"
DIM = H * HEAD


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.attention = PairAttention(DIM)
        self.proj = nn.Linear((H + KV) * HEAD, DIM, bias=False)
        self.feed_forward = SwiGLU(DIM, 128)

    def forward(self, x, freqs_cis):
        x = x + self.proj(self.attention(self.attention_norm(x), freqs_cis))
        return x + self.feed_forward(self.ffn_norm(x))


@pytest.fixture(autouse=True)
def fuse_small_tensors(monkeypatch):
    monkeypatch.setattr(rope_proof, "MIN_FUSED_NUMEL", 0)


def make(compiled=False):
    torch.manual_seed(0)
    block = Block().to(DEVICE, torch.bfloat16)
    convert_and_fuse(block)
    report = fusion_report(block)
    assert {r.kind for r in report.fused()} == {"rms_norm", "swiglu", "rope"}
    if compiled:
        block.compile()
    return block, torch.optim.AdamW(block.parameters(), lr=1e-2, fused=ON_GPU)


def inputs(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, 32, DIM, generator=g).to(DEVICE, torch.bfloat16)
    angles = torch.outer(torch.arange(32.0), torch.rand(HEAD // 2, generator=g) * 3)
    return x, torch.polar(torch.ones_like(angles), angles).to(DEVICE)


def train(block, opt, steps=3):
    losses = []
    for i in range(steps):
        loss = block(*inputs(i)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in block.parameters()]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    not ON_GPU, reason="compiled blocks on the GPU only (CPU compile time)"))], ids=["eager", "compiled"])
def test_same_seed_same_bits(compiled):
    first = train(*make(compiled))
    second = train(*make(compiled))
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    assert not torch.equal(first[1][0], make()[0].attention_norm.weight)  # the steps changed the weights


@pytest.mark.skipif(not ON_GPU, reason="host synchronization is a CUDA notion")
def test_a_full_training_step_makes_no_host_sync():
    block, opt = make()
    train(block, opt, steps=1)  # first calls: kernels compile, plans and proofs are made, optimizer state created
    x, freqs = inputs(5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        block(x, freqs).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
