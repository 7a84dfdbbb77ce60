"""Conversion's SwiGLU gate fusion (f8tensor/fuse_gate.py): which forwards it proves to be
down(silu(gate(x)) * up(x)) and fuses, which it leaves alone and why, and that a fused module
computes what the same model written with f8tensor.swiglu computes, bit for bit."""

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from f8utils import DEVICE, count_amax_passes, sqnr
from torch import nn
from torch.nn.functional import silu

from f8tensor import Float8Linear, conversion_summary, convert_to_float8_training, swiglu
from f8tensor.fuse_gate import GATE_ATTR, FusedForward, SwiGLUGate

D, FFN = 64, 192
ALL = dict(module_filter_fn=lambda mod, fqn: True)  # convert these small layers too


class FeedForward(nn.Module):  # torchtitan's
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(D, FFN, bias=False)
        self.w3 = nn.Linear(D, FFN, bias=False)
        self.w2 = nn.Linear(FFN, D, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaMLP(nn.Module):  # Hugging Face's
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D, FFN, bias=True)
        self.up_proj = nn.Linear(D, FFN, bias=True)
        self.down_proj = nn.Linear(FFN, D, bias=True)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class UpFirst(FeedForward):
    def forward(self, x):
        return self.w2(torch.mul(self.w3(x), silu(self.w1(x))))


class MulMethod(FeedForward):
    def forward(self, x):
        h = F.silu(self.w1(x), inplace=True).mul(self.w3(x))
        return self.w2(h)


class WrittenWithSwiGLU(FeedForward):  # the same model with the fused op in its code
    def forward(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x)))


FUSED = {FeedForward: ("w1", "w3", "w2", True), LlamaMLP: ("gate_proj", "up_proj", "down_proj", True),
         UpFirst: ("w1", "w3", "w2", False), MulMethod: ("w1", "w3", "w2", True)}


def make(cls, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return cls().to(DEVICE, dtype)


def step(mod, x):
    x = x.detach().requires_grad_()
    out = mod(x)
    out.float().square().sum().backward()
    grads = [x.grad] + [p.grad for p in mod.parameters()]
    mod.zero_grad(set_to_none=True)
    return [out.detach()] + grads


@pytest.mark.parametrize("cls", list(FUSED), ids=lambda c: c.__name__)
def test_common_feed_forwards_are_fused_with_the_values_of_the_model_written_with_swiglu(cls):
    """Fused as written (float8 layers): output and every gradient are the bits of the same
    module written with f8tensor.swiglu; unconverted layers (fp32): close to the module's own math."""
    mod = convert_to_float8_training(make(cls), **ALL)
    assert mod.__dict__[GATE_ATTR] == SwiGLUGate(*FUSED[cls])
    assert isinstance(getattr(mod, FUSED[cls][2]), Float8Linear)
    written = make(cls)
    written.forward = WrittenWithSwiGLU.forward.__get__(written)
    if cls is LlamaMLP:
        written.forward = lambda x: written.down_proj(swiglu(written.gate_proj(x), written.up_proj(x)))
    written = convert_to_float8_training(written, **ALL)
    x = torch.randn(2, 16, D, device=DEVICE, dtype=torch.bfloat16)
    for got, want in zip(step(mod, x), step(written, x)):
        assert torch.equal(got, want)

    plain = make(cls, torch.float32)
    fused = convert_to_float8_training(copy.deepcopy(plain), module_filter_fn=lambda mod, fqn: False)
    assert isinstance(fused.__dict__[GATE_ATTR], SwiGLUGate) and type(getattr(fused, FUSED[cls][2])) is nn.Linear
    for got, want in zip(step(fused, x.float()), step(plain, x.float())):
        torch.testing.assert_close(got, want)


def test_fused_gate_hands_its_amax_records_to_the_float8_layers(monkeypatch):
    """w2's input amax (forward) and w1's and w3's grad_output amaxes (backward) come from the
    fused kernels: 3 amax passes fewer per step than the model's own gate code."""
    passes = count_amax_passes(monkeypatch)
    x = torch.randn(2, 16, D, device=DEVICE, dtype=torch.bfloat16)
    counts = []
    for fuse in (True, False):
        mod = convert_to_float8_training(make(FeedForward), fuse_swiglu=fuse, **ALL)
        passes.clear()
        step(mod, x)
        counts.append(sum(passes))
    assert counts[1] - counts[0] == 3


@pytest.mark.parametrize("cls", [FeedForward, UpFirst], ids=lambda c: c.__name__)
def test_module_calls_keep_their_order_and_hooks(cls):
    mod = make(cls)
    calls = []
    for name, child in mod.named_children():
        child.register_forward_pre_hook(lambda m, args, name=name: calls.append(name))
    mod.register_forward_hook(lambda m, args, out: calls.append("outer"))
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    mod(x)
    want = list(calls)
    convert_to_float8_training(mod, **ALL)
    assert isinstance(mod.__dict__[GATE_ATTR], SwiGLUGate)
    calls.clear()
    mod(x)
    assert calls == want


class Branch(FeedForward):
    def forward(self, x):
        if self.training:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return x


class Prints(FeedForward):
    def forward(self, x):
        print("a side effect tracing would run and the fused forward would drop")
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Stores(FeedForward):
    def forward(self, x):
        self.last_input = x
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Scaled(FeedForward):
    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x) * 2)


class SiluUsedTwice(FeedForward):
    def forward(self, x):
        s = F.silu(self.w1(x))
        return self.w2(s * self.w3(x)) + s.sum(-1, keepdim=True)


class SameLinearTwice(FeedForward):
    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w1(x)) + 0 * self.w3(x)


class ExtraArgument(FeedForward):
    def forward(self, x, scale=1.0):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Sigmoid(FeedForward):  # silu written out: not examined
    def forward(self, x):
        a = self.w1(x)
        return self.w2(a * torch.sigmoid(a) * self.w3(x))


class HookedAct(LlamaMLP):
    def __init__(self):
        super().__init__()
        self.act_fn.register_forward_hook(lambda *args: None)


class Torchvision(FeedForward):  # a global that is not torch
    def forward(self, x):
        return self.w2(copy.copy(F.silu(self.w1(x))) * self.w3(x))


NOT_FUSED = {
    Branch: "forward has a branch or a loop",
    Prints: "forward reads the global 'print'",
    Stores: "forward has a STORE_ATTR (last_input)",
    Scaled: "forward is not down(silu(gate(x)) * up(x)): 6 operations",
    SiluUsedTwice: "forward is not down(silu(gate(x)) * up(x)): 7 operations",
    SameLinearTwice: "forward is not down(silu(gate(x)) * up(x)): 8 operations",
    ExtraArgument: "forward does not take exactly one positional argument",
    HookedAct: "forward is not down(silu(gate(x)) * up(x)): the product is not silu(linear(x)) * linear(x)",
    Torchvision: "forward reads the global 'copy'",
}


@pytest.mark.parametrize("cls", list(NOT_FUSED), ids=lambda c: c.__name__)
def test_forwards_not_proven_are_left_alone_with_the_reason(cls, capsys):
    mod = make(cls)
    convert_to_float8_training(mod, **ALL)
    assert "forward" not in mod.__dict__ and mod.__dict__[GATE_ATTR] == NOT_FUSED[cls]
    assert capsys.readouterr().out == ""  # nothing of the forward ran at conversion
    assert f"SwiGLU gate not fused: {NOT_FUSED[cls]}" in conversion_summary(mod)


def test_only_modules_that_look_like_a_swiglu_feed_forward_are_examined():
    class Gelu(nn.Module):  # two linears
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(D, FFN), nn.Linear(FFN, D)

        def forward(self, x):
            return self.down(F.gelu(self.up(x)))

    class NoSilu(FeedForward):
        def forward(self, x):
            return self.w2(F.gelu(self.w1(x)) * self.w3(x))

    class WithNorm(FeedForward):  # a fourth child
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(D)

        def forward(self, x):
            x = self.norm(x)
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

    model = nn.Sequential(Gelu(), NoSilu(), WithNorm(), Sigmoid(), FeedForward())
    convert_to_float8_training(model, **ALL)
    assert [GATE_ATTR in m.__dict__ for m in model] == [False, False, False, False, True]
    assert [m for m in model.modules() if "forward" in m.__dict__] == [model[4]]


def test_summary_converting_twice_opting_out_and_state_dict():
    model = nn.Sequential(make(FeedForward), make(Branch))
    keys = list(model.state_dict())
    convert_to_float8_training(model, **ALL)
    summary = conversion_summary(model)
    lines = [line.split(None, 1) for line in summary.splitlines()[1:]]
    assert ["0", "SwiGLU gate fused: w2(silu(w1) * w3)"] in lines
    assert ["1", "SwiGLU gate not fused: forward has a branch or a loop"] in lines
    assert summary.splitlines()[0] == "f8tensor: 6 of 6 linear layers in float8"
    assert list(model.state_dict()) == keys
    forward = model[0].forward
    convert_to_float8_training(model, **ALL)  # a no-op
    assert model[0].forward == forward and conversion_summary(model) == summary

    kept = convert_to_float8_training(make(FeedForward), fuse_swiglu=False, **ALL)
    assert "forward" not in kept.__dict__ and GATE_ATTR not in kept.__dict__
    assert "SwiGLU" not in conversion_summary(kept)


def test_a_fused_module_is_freed_with_its_last_reference():
    """No reference cycle (tracing's or the forward's): the memory goes when the model does, not
    at Python's next garbage collection."""
    mod = convert_to_float8_training(make(FeedForward), **ALL)
    mod(torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16))
    gone = weakref.ref(mod)
    gc.disable()
    try:
        del mod
        assert gone() is None
    finally:
        gc.enable()


def test_root_module_is_fused_too():
    mod = convert_to_float8_training(make(FeedForward), **ALL)
    assert isinstance(mod.__dict__[GATE_ATTR], SwiGLUGate)


def test_copies_run_their_own_layers_and_replaced_children_are_followed():
    """The fused forward reads the children by name at each call: a deep copy, a pickled and a
    torch.save'd one run their own (fused) layers, and a layer replaced after conversion is the
    one that runs."""
    mod = convert_to_float8_training(make(FeedForward), **ALL)
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    buffer = io.BytesIO()
    torch.save(mod, buffer)
    buffer.seek(0)
    for twin in (pickle.loads(pickle.dumps(mod)), torch.load(buffer, weights_only=False)):
        assert isinstance(twin.forward, FusedForward) and twin.__dict__[GATE_ATTR] == mod.__dict__[GATE_ATTR]
        assert torch.equal(twin(x), mod(x))
    twin = copy.deepcopy(mod)
    assert torch.equal(twin(x), mod(x))
    with torch.no_grad():
        twin.w2.weight.zero_()
    assert not twin(x).any() and mod(x).any()
    mod.w2 = nn.Identity()
    assert mod(x).shape == (4, FFN)


def test_inputs_swiglu_does_not_take_run_the_modules_own_math():
    """A gate of one column (eager broadcasts it): the fused forward runs silu(a) * b, the module's
    own expression, bit for bit."""
    mod = make(FeedForward, torch.float32)
    mod.w1 = nn.Linear(D, 1, device=DEVICE)
    convert_to_float8_training(mod, module_filter_fn=lambda m, f: False)
    x = torch.randn(4, D, device=DEVICE)
    assert isinstance(mod.__dict__[GATE_ATTR], SwiGLUGate)
    assert torch.equal(mod(x), FeedForward.forward(mod, x))


def test_compiles_in_one_graph():
    mod = convert_to_float8_training(make(FeedForward), **ALL)
    x = torch.randn(2, 16, D, device=DEVICE, dtype=torch.bfloat16)
    compiled = torch.compile(mod, fullgraph=True)
    eager = step(mod, x)
    for got, want in zip(step(compiled, x), eager):  # swiglu's plain ops there: float8 roundings may differ
        assert sqnr(want, got) > 25

