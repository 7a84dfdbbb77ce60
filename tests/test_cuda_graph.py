"""Whole-step CUDA graphs over converted models (f8tensor/cuda_graph.py): a captured and replayed
training step gives eager training's results bit for bit (GPU); argument checks everywhere."""

import pytest
import torch
import torch.nn.functional as F
from f8utils import SwiGLU
from torch import nn

from f8tensor import Float8Config, convert_to_float8_training, fuse_model_ops
from f8tensor.cuda_graph import CapturedStep

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
STEPS = 8  # 3 eager warm-up steps, the capture (which replays once), then 4 replays: 5 graph steps


def demo_model(config=None):
    from f8tensor.demo.run import Transformer

    torch.manual_seed(0)
    model = Transformer(dim=256, layers=2, heads=4, seq=128).to("cuda", torch.bfloat16)
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn != "head", config=config)
    fuse_model_ops(model, rope=False)
    return model


def benchmark_model():
    """benchmarks/train.py's model (RoPE, GQA, fused norm / gate / RoPE), small."""
    import os
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import train

    torch.manual_seed(0)
    a = SimpleNamespace(dim=256, ffn=768, heads=4, kv_heads=2, layers=2, vocab=512, seq=128, seed=0, rope="rotate_half")
    with torch.device("cuda"):
        model = train.Transformer(a).bfloat16()
    model.ac = "none"
    convert_to_float8_training(model, module_filter_fn=train.not_output)
    fuse_model_ops(model)
    return model


def batches(vocab):
    g = torch.Generator(device="cuda").manual_seed(1)
    tokens = [torch.randint(0, vocab, (4, 129), device="cuda", generator=g) for _ in range(STEPS)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def training(model, vocab, graphed: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)

    def step(x, y):
        logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    run = CapturedStep(step) if graphed else step
    losses = []
    for i, (x, y) in enumerate(batches(vocab)):
        opt.param_groups[0]["lr"].fill_(1e-3 * (i + 1) / STEPS)  # a schedule: written in place
        losses.append(run(x, y).clone())
    torch.cuda.synchronize()
    return torch.stack(losses).cpu(), [p.detach().cpu() for p in model.parameters()]


@GPU
@pytest.mark.parametrize("name", ["demo", "demo_keep_fp8_weight", "benchmark"])
def test_captured_training_steps_equal_eager_bit_for_bit(name):
    build = {"demo": lambda: (demo_model(), 256),
             "demo_keep_fp8_weight": lambda: (demo_model(Float8Config(keep_fp8_weight=True)), 256),
             "benchmark": lambda: (benchmark_model(), 512)}[name]
    model, vocab = build()
    want_losses, want_weights = training(model, vocab, graphed=False)
    model, vocab = build()
    losses, weights = training(model, vocab, graphed=True)
    assert torch.equal(losses, want_losses), (losses, want_losses)
    for got, want in zip(weights, want_weights):
        assert torch.equal(got, want)


@GPU
def test_make_graphed_callables_on_converted_blocks():
    """torch.cuda.make_graphed_callables on converted, fused blocks: forward and backward of the graphed
    blocks give the eager blocks' output and gradients bit for bit, for new inputs at every call.
    Gradients are cleared (set to None) between calls, as training does: the graphed backward hands
    autograd the graph's static gradient buffers, which .grad takes over and the next replay
    overwrites, so gradients accumulated over calls are not its use (PyTorch's, for any module)."""
    def blocks():
        torch.manual_seed(0)
        model = nn.Sequential(nn.RMSNorm(256), SwiGLU(256, 512), nn.RMSNorm(256), SwiGLU(256, 512))
        model = model.to("cuda", torch.bfloat16)
        convert_to_float8_training(model, module_filter_fn=lambda m, fqn: True)
        fuse_model_ops(model)
        return model

    eager, graphed_model = blocks(), blocks()
    sample = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(graphed_model, (sample,))
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, generator=g)
        results = []
        for model, params in ((eager, eager), (graphed, graphed_model)):
            params.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            out = model(xi)
            out.float().square().sum().backward()
            results.append([out.detach().clone(), xi.grad.clone()] + [p.grad.clone() for p in params.parameters()])
        assert len(results[1]) == 2 + 8
        for got, want in zip(*results):
            assert torch.equal(got, want)


def test_captured_step_refuses_what_it_cannot_capture():
    step = CapturedStep(lambda x: x)
    with pytest.raises(TypeError, match="must be a CUDA tensor"):
        step(torch.ones(2))
    with pytest.raises(ValueError, match="at least one eager warm-up"):
        CapturedStep(lambda x: x, warmup=0)


@GPU
def test_a_captured_step_refuses_other_shapes():
    step = CapturedStep(lambda x: x * 2, warmup=1)
    x = torch.ones(4, device="cuda")
    step(x), step(x)
    assert torch.equal(step(x + 1), torch.full((4,), 4.0, device="cuda"))
    with pytest.raises(ValueError, match="keep the batch shape constant"):
        step(torch.ones(5, device="cuda"))


def test_a_replay_drops_the_float8_state_its_step_made_stale():
    """A replay writes the parameters without running Python: no version counter moves, no optimizer
    hook runs. After each replay CapturedStep drops the kept float8 weights and the precomputed
    all-gather scales, so an eager forward after replays casts the weights as they are. (On CPU: a
    stub graph whose replay writes the weights through .data, which moves no version counter either,
    and a step without arguments.)"""
    from f8tensor import Float8Linear, precompute_float8_scales

    torch.manual_seed(0)
    kept = Float8Linear(64, 64, bias=False, dtype=torch.bfloat16, config=Float8Config(keep_fp8_weight=True))
    cast = Float8Linear(64, 64, bias=False, dtype=torch.bfloat16)  # casts at every forward
    gathered = convert_to_float8_training(nn.Sequential(nn.Linear(64, 64)).bfloat16(),
                                          module_filter_fn=lambda m, fqn: True,
                                          config=Float8Config(fsdp_float8_all_gather=True))
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    kept(x)  # the float8 weight kept
    assert precompute_float8_scales(gathered) == 1
    record = gathered[0].weight._precomputed

    class Graph:
        def replay(self):
            kept.weight.data.mul_(4)
            gathered[0].weight._tensor.data.mul_(4)

    step = CapturedStep(lambda: None)
    step.graph, step.static_inputs = Graph(), []  # as after the capture
    step()
    cast.weight.data.copy_(kept.weight)
    assert torch.equal(kept(x), cast(x))
    assert record.amax_for(gathered[0].weight._tensor) is None
