"""torch.compile: Float8Linear traces into one graph (no breaks) and matches eager bit for bit."""

import torch
from f8utils import DEVICE
from torch import nn

from f8tensor import Float8Linear, convert_to_float8_training, to_float8


def test_float8_linear_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    lin = Float8Linear(64, 96, bias=True, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(2, 16, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    assert torch._dynamo.explain(lin)(x).graph_break_count == 0
    results = []
    for mod in (torch.compile(lin, fullgraph=True), lin):
        x.grad = lin.weight.grad = lin.bias.grad = None
        out = mod(x)
        out.float().square().sum().backward()
        results.append((out, x.grad, lin.weight.grad, lin.bias.grad))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_compiled_block_with_converted_mlp():
    torch._dynamo.reset()
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(DEVICE, torch.bfloat16)
    convert_to_float8_training(mlp, module_filter_fn=lambda mod, fqn: True)
    x = torch.randn(32, 64, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(torch.compile(mlp, fullgraph=True)(x), mlp(x))


def test_repr_of_a_traced_float8_tensor_does_not_read_the_scale():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        text = repr(to_float8(torch.randn(16, 16)))
    assert "scale=<traced>" in text
