"""torch.compile: Float8Linear traces into one graph (no breaks) and matches eager bit for bit."""

import pytest
import torch
from f8utils import DEVICE, saved_activations, skip_rowwise_without_cpu_gemm
from torch import nn

from f8tensor import Float8Config, Float8Linear, convert_to_float8_training, forget_fp8_weights, to_float8
from f8tensor.core.weight_cache import kept_fp8_weights


@pytest.mark.parametrize("keep_weight", [False, True], ids=["default", "keep_fp8_weight"])
def test_float8_linear_compiles_fullgraph_and_matches_eager(keep_weight):
    """keep_fp8_weight: eager reuses kept copies, the graph casts per call; same bits either way."""
    torch._dynamo.reset()
    lin = Float8Linear(64, 96, bias=True, device=DEVICE, dtype=torch.bfloat16,
                       config=Float8Config(keep_fp8_weight=keep_weight))
    x = torch.randn(2, 16, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    assert torch._dynamo.explain(lin)(x).graph_break_count == 0
    results = []
    forget_fp8_weights()
    for mod in (torch.compile(lin, fullgraph=True), lin):
        x.grad = lin.weight.grad = lin.bias.grad = None
        out = mod(x)
        out.float().square().sum().backward()
        results.append((out, x.grad, lin.weight.grad, lin.bias.grad))
        if mod is not lin:
            assert kept_fp8_weights() == 0  # the graph casts per call, the cache is left alone
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("keep_weight", [False, True], ids=["default", "keep_fp8_weight"])
def test_compiled_layer_over_changing_token_counts_matches_eager(keep_weight):
    """A new token count recompiles with a dynamic dimension (torch.compile's automatic dynamic
    shapes); counts that are not multiples of 16 pad the weight-gradient GEMM's inner dimension,
    which did not compile while the padding was a masked float8 copy (inductor cannot generate one).
    No tokens at all (an expert that got none): empty output, zero gradients, as eager."""
    torch._dynamo.reset()
    lin = Float8Linear(64, 96, bias=True, device=DEVICE, dtype=torch.bfloat16,
                       config=Float8Config(keep_fp8_weight=keep_weight))
    compiled = torch.compile(lin, fullgraph=True)
    for tokens in (16, 13, 40, 27, 0):
        x = torch.randn(tokens, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        results = []
        for mod in (compiled, lin):
            x.grad = lin.weight.grad = lin.bias.grad = None
            out = mod(x)
            out.float().square().sum().backward()
            results.append((out, x.grad, lin.weight.grad, lin.bias.grad))
        for got, want in zip(*results):
            assert torch.equal(got, want), tokens


@pytest.mark.parametrize("keep_weight", [False, True], ids=["default", "keep_fp8_weight"])
def test_compiled_weight_casts(keep_weight, monkeypatch):
    """Compiled, keep_fp8_weight casts the weight once per step, both layouts in one pass (the
    column-major copy saved for backward); by default row-major in forward, column-major again in
    backward. Counted at the cast op's runtime calls (the graph's own launches)."""
    import f8tensor.kernels as kernels

    torch._dynamo.reset()
    lin = Float8Linear(64, 96, bias=False, device=DEVICE, dtype=torch.bfloat16,
                       config=Float8Config(keep_fp8_weight=keep_weight))
    x = torch.randn(32, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(lin, fullgraph=True)
    compiled(x).sum().backward()  # compiles outside the count
    calls = []
    real = kernels.quantize_with_amax

    def counting(t, float8_dtype, layout="row", *args, **kwargs):
        calls.append((tuple(t.shape), layout))
        return real(t, float8_dtype, layout, *args, **kwargs)

    monkeypatch.setattr(kernels, "quantize_with_amax", counting)
    compiled(x).sum().backward()
    weight_casts = sorted(layout for shape, layout in calls if shape == (96, 64))
    assert weight_casts == (["both"] if keep_weight else ["col", "row"])
    assert len(calls) == (3 if keep_weight else 4)  # with the input's cast and grad_output's
    with torch.no_grad():  # no backward to come: row-major only, nothing saved
        calls.clear()
        compiled(x)
        assert [layout for shape, layout in calls if shape == (96, 64)] == ["row"]


def test_compiled_block_with_converted_mlp():
    """Also guards the compiled amax (kernels/op.py): with a float amax, inductor took the max of
    GELU's fp32 values before their rounding to bf16 and this failed on the H200 (ef06171)."""
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


def test_to_float8_of_an_empty_tensor_compiles_and_matches_eager():
    """Under Dynamo the amax of an empty tensor is passed in (the traced amax does not test for
    emptiness): same data and scale as eager."""
    x = torch.zeros(0, 32, device=DEVICE, dtype=torch.bfloat16)
    fn = torch.compile(lambda t: to_float8(t, layout="both"), fullgraph=True)
    for got, want in zip(fn(x), to_float8(x, layout="both")):
        assert got.shape == want.shape == (0, 32)
        assert torch.equal(got._scale, want._scale)


def test_amax_of_bits_equals_the_reference():
    from f8tensor.kernels import amax_ref
    from f8tensor.kernels.op import amax_of_bits

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(64, 48).to(dtype) * 100
        cases = [x, x.t(), -x.abs(), torch.zeros(0, 3, dtype=dtype), -torch.zeros(2, 2, dtype=dtype)]
        y = x.clone()
        y[1, 2] = float("-inf")
        cases.append(y)
        z = y.clone()
        z[3, 4] = -float("nan")  # sign bit set: still NaN, as x.abs().amax() gives
        cases.append(z)
        for case in cases:
            torch.testing.assert_close(amax_of_bits(case), amax_ref(case), rtol=0, atol=0, equal_nan=True)


def test_swiglu_feed_forward_compiles_fullgraph():
    """Under compile swiglu is the reference in plain ops (inductor fuses it and the amax); the
    result matches eager's fused kernels (which differ from the reference in a last bit at most)."""
    from f8utils import sqnr

    from f8tensor import swiglu

    class FeedForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w3, self.w2 = nn.Linear(64, 128), nn.Linear(64, 128), nn.Linear(128, 64)

        def forward(self, x):
            return self.w2(swiglu(self.w1(x), self.w3(x)))

    torch._dynamo.reset()
    ffn = FeedForward().to(DEVICE, torch.bfloat16)
    convert_to_float8_training(ffn, module_filter_fn=lambda mod, fqn: True)
    x = torch.randn(2, 16, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    assert torch._dynamo.explain(ffn)(x).graph_break_count == 0
    results = []
    for mod in (torch.compile(ffn, fullgraph=True), ffn):
        x.grad = None
        for p in ffn.parameters():
            p.grad = None
        out = mod(x)
        out.float().square().sum().backward()
        results.append([out, x.grad] + [p.grad for p in ffn.parameters()])
    for got, want in zip(*results):
        assert sqnr(want, got) > 40


def test_rope_compiles_fullgraph():
    """Under compile rope is the reference in plain ops (inductor fuses it); values and gradient
    match eager's kernel (one rounding each, so within a last bit)."""
    from f8tensor import rope

    def rotate(x, cos, sin):
        return rope(x.transpose(1, 2), cos, sin).transpose(1, 2) * 2

    torch._dynamo.reset()
    x = torch.randn(2, 24, 4, 16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    angles = torch.rand(24, 16, device=DEVICE) * 6
    cos, sin = angles.cos(), angles.sin()
    assert torch._dynamo.explain(rotate)(x, cos, sin).graph_break_count == 0
    g = torch.randn_like(x)
    results = []
    for fn in (torch.compile(rotate, fullgraph=True), rotate):
        x.grad = None
        out = fn(x, cos, sin)
        out.backward(g)
        results.append((out, x.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-2)


# torch before 2.12 tags only the top-level ops of a checkpointed region for recomputation under
# torch.compile, not those inside an autograd.Function (every Float8Linear's): the partitioner then
# saves their outputs (pytorch/pytorch#177396, fixed in 2.12). A selective-checkpoint policy that
# recomputes every op tags through a dispatch mode instead and works on every supported torch.
PLAIN_CHECKPOINT_RECOMPUTES = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 12)


def _recompute_everything():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(lambda ctx, op, *args, **kwargs: CheckpointPolicy.PREFER_RECOMPUTE)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("policy", [
    pytest.param("plain", marks=pytest.mark.xfail(
        not PLAIN_CHECKPOINT_RECOMPUTES, strict=True,
        reason="torch < 2.12 leaves autograd.Function bodies out of a plain checkpoint's recomputation under "
               "torch.compile (pytorch/pytorch#177396)")),
    "recompute_everything"])
def test_compiled_checkpointed_block_saves_only_its_input(recipe, policy):
    """torch.compile of a checkpointed SwiGLU block of Float8Linears saves what eager checkpointing
    saves, the block's input, and none of the float8 activations the same block saves uncheckpointed
    (with the min-cut partitioner inductor uses; the backend that runs it without codegen)."""
    from torch.utils.checkpoint import checkpoint

    skip_rowwise_without_cpu_gemm(recipe, DEVICE.type)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w3 = nn.Linear(64, 256, bias=False), nn.Linear(64, 256, bias=False)
            self.w2 = nn.Linear(256, 64, bias=False)

        def forward(self, x):
            return x + self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))

    block = Block().to(DEVICE, torch.bfloat16)
    convert_to_float8_training(block, config=Float8Config.from_recipe_name(recipe),
                               module_filter_fn=lambda mod, fqn: True)
    x = torch.randn(128, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    context = {} if policy == "plain" else {"context_fn": _recompute_everything}

    def saved(checkpointed: bool) -> list:
        torch._dynamo.reset()
        fn = torch.compile(lambda x: checkpoint(block, x, use_reentrant=False, **context) if checkpointed else block(x),
                           backend="aot_eager_decomp_partition", fullgraph=True)
        kept, out = saved_activations(block.parameters(), lambda: fn(x))
        out.float().sum().backward()
        return kept

    assert any(dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for _, dtype in saved(False))
    assert saved(True) == [((128, 64), torch.bfloat16)]
