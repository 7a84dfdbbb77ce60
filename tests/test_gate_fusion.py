"""fuse_model_ops's gate fusion (f8tensor/fusion/gate_proof.py): which forwards it proves to be
down(silu(gate(x)) * up(x)) (or GeGLU's, GELU in its tanh form) and fuses, which it leaves alone and
why, and that a fused module computes what the same model written with f8tensor.swiglu (geglu)
computes, bit for bit."""

import copy
import functools
import gc
import io
import pickle
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from f8utils import DEVICE, SwiGLU, convert_and_fuse, count_amax_passes, sqnr, train_step
from torch import nn
from torch.nn.functional import silu

from f8tensor import (FusionError, Float8Linear, conversion_summary, fuse_model_ops, fusion_report, geglu, geglu_halves,
                      swiglu, swiglu_halves)
from f8tensor.fusion.gate_proof import GATE_ATTR, FusedGateModule, SwiGLUGate
from f8tensor.core.class_swap import QuietSubclasses
from f8tensor.fusion.fused_class import FusedModule

D, FFN = 64, 192


class FeedForward(SwiGLU):  # torchtitan's, at this file's sizes
    def __init__(self):
        super().__init__(D, FFN)


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


class SiLUActivation(nn.Module):  # transformers 5's activation class for "silu"
    def forward(self, input):
        return nn.functional.silu(input)


class LlamaMLP5(LlamaMLP):  # Hugging Face's, with transformers 5's ACT2FN["silu"]
    def __init__(self):
        super().__init__()
        self.act_fn = SiLUActivation()


class UpFirst(FeedForward):
    def forward(self, x):
        return self.w2(torch.mul(self.w3(x), silu(self.w1(x))))


class MulMethod(FeedForward):
    def forward(self, hidden_states):
        h = F.silu(self.w1(hidden_states), inplace=False).mul(self.w3(hidden_states))
        return self.w2(h)


class Chain(FeedForward):
    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class Locals(FeedForward):  # Python 3.13 loads g and u in one instruction (LOAD_FAST_LOAD_FAST)
    def forward(self, x):
        g = F.silu(self.w1(x))
        u = self.w3(x)
        return self.w2(g * u)


class OneLine(FeedForward):  # Python 3.13 stores h and loads self in one instruction (STORE_FAST_LOAD_FAST)
    def forward(self, x):
        h = F.silu(self.w1(x)) * self.w3(x); return self.w2(h)  # noqa: E702


class WrittenWithSwiGLU(FeedForward):  # the same model with the fused op in its code
    def forward(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x)))


FUSED = {FeedForward: ("w1", "w3", "w2", True, None, "x"),
         LlamaMLP: ("gate_proj", "up_proj", "down_proj", True, "act_fn", "x"),
         LlamaMLP5: ("gate_proj", "up_proj", "down_proj", True, "act_fn", "x"),
         UpFirst: ("w1", "w3", "w2", False, None, "x"), MulMethod: ("w1", "w3", "w2", True, None, "hidden_states"),
         Chain: ("w1", "w3", "w2", True, None, "x"), Locals: ("w1", "w3", "w2", True, None, "x"),
         OneLine: ("w1", "w3", "w2", True, None, "x")}


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the fused forward ran swiglu (patched where gate_proof calls it)."""
    import f8tensor.fusion.gate_proof as gate_proof

    calls = []
    monkeypatch.setattr(gate_proof, "swiglu", lambda a, b: calls.append(1) or swiglu(a, b))
    return calls


def make(cls, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return cls().to(DEVICE, dtype)


def assert_bits_of_written(mod, written) -> torch.Tensor:
    """A training step of the fused float8 module `mod` gives the bits of `written` (the same module
    with its gate written as the fused op), converted without the gate fusion; returns the input."""
    written = convert_and_fuse(written, swiglu=False)
    x = torch.randn(2, 16, D, device=DEVICE, dtype=torch.bfloat16)
    for got, want in zip(train_step(mod, x), train_step(written, x)):
        assert torch.equal(got, want)
    return x


def assert_unconverted_close_to_own_math(cls, x):
    """Fused with every linear left unconverted (fp32): close to the module's own math. Returns the
    fused module."""
    plain = make(cls, torch.float32)
    fused = convert_and_fuse(copy.deepcopy(plain), module_filter_fn=lambda mod, fqn: False)
    for got, want in zip(train_step(fused, x.float()), train_step(plain, x.float())):
        torch.testing.assert_close(got, want)
    return fused


@pytest.mark.parametrize("cls", list(FUSED), ids=lambda c: c.__name__)
def test_common_feed_forwards_are_fused_with_the_values_of_the_model_written_with_swiglu(cls, fused_calls):
    """Fused as written (float8 layers): output and every gradient are the bits of the same
    module written with f8tensor.swiglu; unconverted layers (fp32): close to the module's own math."""
    mod = convert_and_fuse(make(cls))
    assert isinstance(mod, FusedGateModule)
    found = mod.__dict__[GATE_ATTR]
    assert (found.gate, found.up, found.down, found.gate_first, found.act, found.arg) == FUSED[cls]
    assert isinstance(getattr(mod, FUSED[cls][2]), Float8Linear)
    written = make(cls)
    written.forward = WrittenWithSwiGLU.forward.__get__(written)
    if cls in (LlamaMLP, LlamaMLP5):
        written.forward = lambda x: written.down_proj(swiglu(written.gate_proj(x), written.up_proj(x)))
    x = assert_bits_of_written(mod, written)
    assert len(fused_calls) == 1
    assert torch.equal(mod(**{FUSED[cls][5]: x}), mod(x)) and len(fused_calls) == 3  # by keyword too

    fused = assert_unconverted_close_to_own_math(cls, x)
    assert isinstance(fused.__dict__[GATE_ATTR], SwiGLUGate) and type(getattr(fused, FUSED[cls][2])) is nn.Linear


@pytest.mark.parametrize("name, fewer", [("FeedForward", 3), ("Phi3MLP", 2)])  # Phi3MLP is defined below
def test_fused_gate_hands_its_amax_records_to_the_float8_layers(name, fewer, monkeypatch):
    """The down projection's input amax (forward) and the gate and up projections' grad_output
    amaxes (backward) come from the fused kernels: 3 amax passes fewer per step than the model's own
    gate code (w2, w1, w3); 2 in the halves form (down_proj, and gate_up_proj's one gradient tensor
    holding both halves)."""
    passes = count_amax_passes(monkeypatch)
    x = torch.randn(2, 16, D, device=DEVICE, dtype=torch.bfloat16)
    counts = []
    for fuse in (True, False):
        mod = convert_and_fuse(make(globals()[name]), swiglu=fuse)
        passes.clear()
        train_step(mod, x)
        counts.append(sum(passes))
    assert counts[1] - counts[0] == fewer


@pytest.mark.parametrize("cls", [FeedForward, UpFirst], ids=lambda c: c.__name__)
def test_module_calls_keep_their_order_and_hooks(cls, fused_calls):
    mod = make(cls)
    calls = []
    for name, child in mod.named_children():
        child.register_forward_pre_hook(lambda m, args, name=name: calls.append(name))
    mod.register_forward_hook(lambda m, args, out: calls.append("outer"))
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    mod(x)
    want = list(calls)
    convert_and_fuse(mod)
    assert isinstance(mod.__dict__[GATE_ATTR], SwiGLUGate)
    calls.clear()
    mod(x)
    assert calls == want and len(fused_calls) == 1


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
        return self.w2(F.silu(self.w1(x)) * self.w1(x))


class ExtraArgument(FeedForward):
    def forward(self, x, scale=1.0):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Sigmoid(FeedForward):  # silu written out: not examined
    def forward(self, x):
        a = self.w1(x)
        return self.w2(a * torch.sigmoid(a) * self.w3(x))


class HelperMethod(FeedForward):
    def silu(self, h):
        self.calls = getattr(self, "calls", 0) + 1
        return F.silu(h)

    def forward(self, x):
        return self.w2(self.silu(self.w1(x)) * self.w3(x))


class Property(FeedForward):
    @property
    def gate(self):
        return self.w1

    def forward(self, x):
        return self.w2(F.silu(self.gate(x)) * self.w3(x))


class BufferCounter(FeedForward):
    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        self.steps.add_(1)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Seeds(FeedForward):
    def forward(self, x):
        torch.manual_seed(0)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TryExcept(FeedForward):
    def forward(self, x):
        try:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        except RuntimeError:
            return x


class InPlace(FeedForward):
    def forward(self, x):
        return self.w2(F.silu(self.w1(x), inplace=True) * self.w3(x))


class InPlaceAct(LlamaMLP):
    def __init__(self):
        super().__init__()
        self.act_fn = nn.SiLU(inplace=True)


class Super(LlamaMLP):
    def forward(self, x):
        return super().forward(x)


class AliasSelf(FeedForward):
    def forward(self, x):
        s = self
        return s.w2(F.silu(s.w1(x)) * s.w3(x))


class Varargs(FeedForward):
    def forward(self, *xs):
        return self.w2(F.silu(self.w1(xs[0])) * self.w3(xs[0]))


class Meta(type):
    pass


class WithMeta(FeedForward, metaclass=Meta):
    pass


class Registers(FeedForward):
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)


class OwnGetattr(FeedForward):
    def __getattr__(self, name):
        return super().__getattr__(name)


class ShadowedChild(FeedForward):
    w1 = property(lambda self: self._modules["w1"])

    def __init__(self):
        nn.Module.__init__(self)
        self._modules["w1"] = nn.Linear(D, FFN, bias=False)
        self.w3 = nn.Linear(D, FFN, bias=False)
        self.w2 = nn.Linear(FFN, D, bias=False)


class GELUActivation(nn.Module):
    def forward(self, input):
        return nn.functional.gelu(input)


class GeGLU(LlamaMLP):  # three linears and an activation child that is not silu
    def __init__(self):
        super().__init__()
        self.act_fn = GELUActivation()


class HookedAct(LlamaMLP):
    def __init__(self):
        super().__init__()
        self.act_fn.register_forward_hook(lambda *args: None)


class OtherGlobal(FeedForward):  # a global that is not torch
    def forward(self, x):
        return self.w2(copy.copy(F.silu(self.w1(x))) * self.w3(x))


class InPlaceOnInput(FeedForward):  # two operations more, in place on x: the fused forward would skip them
    def forward(self, x):
        _ = F.silu(x, True)
        _ = F.silu(x, True)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MulOutOnInput(FeedForward):
    def forward(self, x):
        _ = torch.mul(x, 3, out=x)
        _ = torch.mul(x, 3, out=x)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class UnusedCalls(FeedForward):  # the fused forward would call w1 once, not three times (its hooks, its state)
    def forward(self, x):
        _ = self.w1(x)
        _ = self.w1(x)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


NOT_FUSED = {
    Branch: "forward has a branch or a loop",
    Prints: "forward reads the global 'print'",
    Stores: "forward uses self other than to read a child module",
    Scaled: "forward is not down(silu(gate(x)) * up(x)) nor its halves form: 6 operations",
    SiluUsedTwice: "forward reads .sum of a tensor",
    SameLinearTwice: ("forward is not down(silu(gate(x)) * up(x)): the product is not silu(linear(x)) * linear(x) nor "
                      "silu(g) * u of the halves g, u of linear(x).chunk(2, dim=-1)"),
    ExtraArgument: "forward does not take exactly one argument",
    HookedAct: "the activation child SiLU has hooks",
    OtherGlobal: "forward reads the global 'copy'",
    HelperMethod: "forward reads self.silu, which is not (only) a child module",
    Property: "forward reads self.gate, which is not (only) a child module",
    BufferCounter: "forward reads self.steps, which is not (only) a child module",
    Seeds: "forward reads torch.manual_seed",
    TryExcept: "forward has a try or with block" if sys.version_info >= (3, 11) else "forward has a branch or a loop",
    InPlace: "silu is in place (it writes into the gate's output)",
    InPlaceAct: "the nn.SiLU child is in place (it writes into the gate's output)",
    Super: "forward uses super() or a closure",
    AliasSelf: "forward uses self other than to read a child module",
    Varargs: "forward does not take exactly one argument",
    WithMeta: "its class has the metaclass Meta",
    Registers: "its class Registers defines __init_subclass__",
    OwnGetattr: "its class OwnGetattr defines __getattr__",
    ShadowedChild: "forward reads self.w1, which is not (only) a child module",
    InPlaceOnInput: "forward computes more than down(silu(gate(x)) * up(x)): 7 operations, not 5",
    MulOutOnInput: "forward computes more than down(silu(gate(x)) * up(x)): 7 operations, not 5",
    UnusedCalls: "forward computes more than down(silu(gate(x)) * up(x)): 7 operations, not 5",
    GeGLU: ("the activation child GELUActivation is a GELU activation, not silu or GELU's tanh form: only SwiGLU "
            "and GeGLU (tanh) gates are fused"),
}


@pytest.mark.parametrize("cls", list(NOT_FUSED), ids=lambda c: c.__name__)
def test_forwards_not_proven_are_left_alone_with_the_reason(cls, capsys):
    mod = make(cls)
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    rng = torch.get_rng_state()
    convert_and_fuse(mod)
    assert type(mod) is cls and mod.__dict__[GATE_ATTR] == NOT_FUSED[cls]
    # nothing of the forward ran at conversion: no output, no state or RNG change
    assert capsys.readouterr().out == "" and not hasattr(mod, "calls") and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in mod.state_dict().items() if "steps" in k)
    assert f"SwiGLU gate not fused: {NOT_FUSED[cls]}" in str(fusion_report(mod))


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
    convert_and_fuse(model)
    assert [GATE_ATTR in m.__dict__ for m in model] == [False, False, False, False, True]
    assert [m for m in model.modules() if isinstance(m, FusedGateModule)] == [model[4]]


def test_summary_converting_twice_opting_out_and_state_dict():
    model = nn.Sequential(make(FeedForward), make(Branch))
    keys = list(model.state_dict())
    convert_and_fuse(model)
    summary, report = conversion_summary(model), str(fusion_report(model))
    lines = [line.split(None, 2) for line in report.splitlines()[1:]]
    assert ["0", "swiglu", "SwiGLU gate fused: w2(silu(w1) * w3)"] in lines
    assert ["1", "swiglu", "SwiGLU gate not fused: forward has a branch or a loop"] in lines
    assert summary.splitlines()[0] == "f8tensor: 6 of 6 linear layers in float8"
    assert list(model.state_dict()) == keys
    fused = type(model[0])
    assert fused.__name__ == "FeedForward" and fused.__mro__[1:5] == (FusedGateModule, FusedModule, QuietSubclasses, FeedForward)
    convert_and_fuse(model)  # a no-op
    assert type(model[0]) is fused and conversion_summary(model) == summary and str(fusion_report(model)) == report

    kept = convert_and_fuse(make(FeedForward), swiglu=False)
    assert type(kept) is FeedForward and GATE_ATTR not in kept.__dict__
    assert "SwiGLU" not in str(fusion_report(kept))


def test_a_fused_module_is_freed_with_its_last_reference():
    """No reference cycle (tracing's or the forward's): the memory goes when the model does, not
    at Python's next garbage collection."""
    mod = convert_and_fuse(make(FeedForward))
    mod(torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16))
    gone = weakref.ref(mod)
    gc.disable()
    try:
        del mod
        assert gone() is None
    finally:
        gc.enable()


def test_root_module_is_fused_too():
    mod = convert_and_fuse(make(FeedForward))
    assert isinstance(mod.__dict__[GATE_ATTR], SwiGLUGate)


def test_copies_run_their_own_layers_and_replaced_children_are_followed(fused_calls):
    """The fused class goes with every copy: a deep copy, a pickled and a torch.save'd one run their
    own layers, fused, and a layer replaced after conversion is the one that runs."""
    mod = convert_and_fuse(make(FeedForward))
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    buffer = io.BytesIO()
    torch.save(mod, buffer)
    buffer.seek(0)
    twins = [pickle.loads(pickle.dumps(mod)), torch.load(buffer, weights_only=False), copy.deepcopy(mod)]
    for twin in twins:
        assert type(twin) is type(mod) and twin.__dict__[GATE_ATTR] == mod.__dict__[GATE_ATTR]
        assert torch.equal(twin(x), mod(x))
    assert len(fused_calls) == 2 * len(twins)
    twin = twins[-1]
    with torch.no_grad():
        twin.w2.weight.zero_()
    assert not twin(x).any() and mod(x).any()
    shallow = copy.copy(mod)  # shares mod's children, as any shallow copy of a module
    assert type(shallow) is type(mod) and torch.equal(shallow(x), mod(x))
    mod.w2 = nn.Identity()
    assert mod(x).shape == (4, FFN)


def test_the_class_forward_runs_where_the_fused_one_would_differ(fused_calls):
    """After conversion, an nn.SiLU child given hooks (forward or backward), replaced, or with a
    forward of its own, a class forward or global name rebound, other arguments than the one
    input: the module's own forward runs (its values bit for bit, its hooks, its errors). Global
    module hooks do not change the path (so activation checkpointing recomputes what it saved,
    with or without a hooking mode such as FlopCounterMode); they miss the fused nn.SiLU call."""
    from torch.nn.modules.module import register_module_forward_hook

    mod = convert_and_fuse(make(LlamaMLP))
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    seen = []
    handle = register_module_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    try:
        mod(x)
    finally:
        handle.remove()
    assert len(fused_calls) == 1 and "SiLU" not in seen and "Float8Linear" in seen
    own = lambda: LlamaMLP.forward(mod, x)  # noqa: E731
    handle = mod.act_fn.register_forward_hook(lambda *args: seen.append("act_fn hook"))
    seen.clear()
    out = mod(x)  # the fused module's own call: the hooked child runs as written
    assert "act_fn hook" in seen and len(fused_calls) == 1
    assert torch.equal(out, own())
    handle.remove()
    handle = mod.act_fn.register_full_backward_hook(lambda *args: seen.append("act_fn backward hook"))
    assert torch.equal(mod(x), own()) and len(fused_calls) == 1
    handle.remove()
    mod.act_fn.forward = lambda t: F.gelu(t)
    assert torch.equal(mod(x), own()) and len(fused_calls) == 1
    del mod.act_fn.forward
    mod(x)
    assert len(fused_calls) == 2  # a plain nn.SiLU again: fused
    mod.act_fn = nn.GELU()
    assert torch.equal(mod(x), own()) and len(fused_calls) == 2
    with pytest.raises(TypeError, match="positional argument"):
        mod(x, x)
    with pytest.raises(TypeError, match="unexpected keyword argument 'y'"):
        mod(y=x)

    mod = convert_and_fuse(make(UpFirst))  # reads the global name silu
    fused_calls.clear()
    module_globals = UpFirst.forward.__globals__
    module_globals["silu"] = F.gelu
    try:
        assert torch.equal(mod(x), UpFirst.forward(mod, x)) and not fused_calls
    finally:
        module_globals["silu"] = F.silu
    mod(x)
    assert len(fused_calls) == 1


def test_the_fused_path_does_not_depend_on_global_hooks_under_checkpointing(fused_calls):
    """Forward under a mode that hooks every module, recomputation outside it: the fused path both
    times (the same tensors saved), with the gradients of a run without checkpointing."""
    from torch.utils.checkpoint import checkpoint
    from torch.utils.flop_counter import FlopCounterMode

    mod = convert_and_fuse(make(LlamaMLP))
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    mod(x).float().sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in mod.parameters()]
    x.grad = None
    mod.zero_grad()
    with FlopCounterMode(display=False):
        out = checkpoint(mod, x, use_reentrant=False)
    out.float().sum().backward()  # recomputed outside the mode: the same tensors saved
    assert len(fused_calls) == 3  # the plain run, the checkpointed forward and its recomputation
    for got, w in zip([x.grad] + [p.grad for p in mod.parameters()], want, strict=True):
        assert torch.equal(got, w)


def test_a_patched_class_forward_or_a_positional_only_input_is_respected(fused_calls):
    class Patched(FeedForward):
        pass

    class PositionalOnly(FeedForward):
        def forward(self, x, /):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    mod = convert_and_fuse(make(Patched))
    Patched.forward = lambda self, t: self.w2(F.gelu(self.w1(t)) * self.w3(t))
    assert torch.equal(mod(x), Patched.forward(mod, x)) and not fused_calls
    positional = convert_and_fuse(make(PositionalOnly))
    assert isinstance(positional, FusedGateModule)
    positional(x)
    assert len(fused_calls) == 1
    with pytest.raises(TypeError, match="positional-only"):
        positional(x=x)


def test_a_torchscript_submodule_does_not_stop_conversion():
    class Act(nn.Module):
        def forward(self, x):
            return F.silu(x)

    model = nn.Sequential(nn.Linear(D, D), torch.jit.script(Act()), make(FeedForward, torch.float32))
    convert_and_fuse(model, module_filter_fn=lambda m, f: False)
    assert isinstance(model[2], FusedGateModule)


def test_inputs_swiglu_does_not_take_run_the_modules_own_math(fused_calls):
    """A gate of one column (eager broadcasts it): the fused forward runs silu(a) * b, the module's
    own expression, bit for bit."""
    mod = make(FeedForward, torch.float32)
    mod.w1 = nn.Linear(D, 1, device=DEVICE)
    convert_and_fuse(mod, module_filter_fn=lambda m, f: False)
    x = torch.randn(4, D, device=DEVICE)
    assert isinstance(mod.__dict__[GATE_ATTR], SwiGLUGate)
    assert torch.equal(mod(x), FeedForward.forward(mod, x)) and not fused_calls


@pytest.mark.parametrize("name", ["FeedForward", "Phi3MLP"])  # Phi3MLP (the halves form) is defined below
def test_compiles_in_one_graph(name):
    mod = convert_and_fuse(make(globals()[name]))
    assert isinstance(mod, FusedGateModule)
    x = torch.randn(2, 16, D, device=DEVICE, dtype=torch.bfloat16)
    compiled = torch.compile(mod, fullgraph=True)
    eager = train_step(mod, x)
    for got, want in zip(train_step(compiled, x), eager):  # the gate's plain ops there: float8 roundings may differ
        assert sqnr(want, got) > 25



def test_the_fused_forward_keeps_the_class_forwards_signature():
    import inspect

    mod = convert_and_fuse(make(MulMethod))
    assert isinstance(mod, FusedGateModule)
    assert str(inspect.signature(mod.forward)) == "(hidden_states)" and type(mod).forward.__wrapped__ is MulMethod.forward


def test_an_instance_level_forward_is_left_alone():
    mod = make(FeedForward)
    mod.forward = lambda x: x  # as accelerate's hooks do
    convert_and_fuse(mod)
    assert type(mod) is FeedForward and mod.__dict__[GATE_ATTR] == "the module has an instance-level forward"


def test_mixed_dtypes_run_the_modules_own_math(fused_calls):
    class HalfOut(nn.Linear):
        def forward(self, x):
            return super().forward(x).half()

    mod = make(FeedForward, torch.float32)
    mod.w1 = HalfOut(D, FFN, device=DEVICE)
    convert_and_fuse(mod, module_filter_fn=lambda m, f: False)
    x = torch.randn(4, D, device=DEVICE)
    assert isinstance(mod, FusedGateModule)
    assert torch.equal(mod(x), FeedForward.forward(mod, x)) and not fused_calls


def test_a_second_conversion_keeps_an_nn_silu_module_fused(fused_calls):
    mod = convert_and_fuse(make(LlamaMLP))
    summary = str(fusion_report(mod))
    convert_and_fuse(mod)
    assert isinstance(mod.__dict__[GATE_ATTR], SwiGLUGate) and str(fusion_report(mod)) == summary
    mod(torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16))
    assert len(fused_calls) == 1


def test_fx_symbolic_trace_of_a_parent_traces_the_modules_own_forward():
    model = nn.Sequential(make(FeedForward, torch.float32))
    convert_and_fuse(model, module_filter_fn=lambda m, f: False)
    assert isinstance(model[0], FusedGateModule)
    traced = torch.fx.symbolic_trace(model)
    assert any(n.target is F.silu for n in traced.graph.nodes)
    x = torch.randn(4, D, device=DEVICE)
    torch.testing.assert_close(traced(x), model(x))


def test_an_activation_class_proven_to_be_silu_stays_checked_at_each_call(fused_calls):
    """transformers 5's SiLUActivation is proven from its code; a forward patched into its class
    after conversion makes the module run its own forward."""
    mod = convert_and_fuse(make(LlamaMLP5))
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    mod(x)
    assert len(fused_calls) == 1
    original = SiLUActivation.forward
    SiLUActivation.forward = lambda self, t: F.gelu(t)
    try:
        assert torch.equal(mod(x), LlamaMLP.forward(mod, x)) and len(fused_calls) == 1
    finally:
        SiLUActivation.forward = original
    mod(x)
    assert len(fused_calls) == 2


def test_a_fused_module_keeps_its_activation_proof_across_reset_state(fused_calls):
    """The proof of an activation class travels with the fused module: after reset_state it is not
    proven again at call time (which torch.compile could not trace), and the module stays fused."""
    from f8tensor import reset_state

    mod = convert_and_fuse(make(LlamaMLP5))
    reset_state()
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(mod, backend="eager", fullgraph=True)(x)  # the first call after the reset
    fused_calls.clear()
    assert sqnr(mod(x), compiled) > 25 and len(fused_calls) == 1


# --- GeGLU (GELU's tanh form, Gemma's gate) ------------------------------------------------------

class GELUTanh(nn.Module):  # transformers 5's activation class for "gelu_pytorch_tanh", as it is written
    def __init__(self, use_gelu_tanh_python: bool = False):
        super().__init__()
        self.act = functools.partial(nn.functional.gelu, approximate="tanh")

    def forward(self, input):
        return self.act(input)


class GemmaMLP(LlamaMLP):  # Gemma's feed-forward (LlamaMLP's forward) with transformers 5's GELUTanh
    def __init__(self):
        super().__init__()
        self.act_fn = GELUTanh()


class TorchGeGLU(LlamaMLP):
    def __init__(self):
        super().__init__()
        self.act_fn = nn.GELU(approximate="tanh")


class ExactGELU(LlamaMLP):
    def __init__(self):
        super().__init__()
        self.act_fn = nn.GELU()


@pytest.fixture
def geglu_calls(monkeypatch):
    import f8tensor.fusion.gate_proof as gate_proof

    calls = []
    monkeypatch.setattr(gate_proof, "geglu", lambda a, b: calls.append(1) or geglu(a, b))
    return calls


@pytest.mark.parametrize("cls", [GemmaMLP, TorchGeGLU], ids=lambda c: c.__name__)
def test_geglu_feed_forwards_are_fused_with_the_values_of_the_model_written_with_geglu(cls, geglu_calls):
    """A GELU-tanh activation child (transformers' GELUTanh, nn.GELU(approximate="tanh")): the gate
    runs as f8tensor.geglu, the bits of the same module written with it."""
    mod = convert_and_fuse(make(cls))
    found = mod.__dict__[GATE_ATTR]
    assert isinstance(mod, FusedGateModule) and found.activation == "gelu_tanh" and found.act == "act_fn"
    assert str(found) == "GeGLU gate fused: down_proj(gelu_tanh(gate_proj) * up_proj)"
    written = make(cls)
    written.forward = lambda x: written.down_proj(geglu(written.gate_proj(x), written.up_proj(x)))
    x = assert_bits_of_written(mod, written)
    assert len(geglu_calls) == 1
    assert_unconverted_close_to_own_math(cls, x)


def test_a_geglu_activation_changed_after_fusion_runs_the_written_code(geglu_calls):
    """The activation's partial rebound to another function, or to exact GELU, or an nn.GELU made
    exact: the class's own forward, with the new activation."""
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    mod = convert_and_fuse(make(GemmaMLP))
    mod(x)
    assert len(geglu_calls) == 1
    mod.act_fn.act = functools.partial(nn.functional.gelu, approximate="none")
    own = GemmaMLP.forward(mod, x)
    assert torch.equal(mod(x), own) and len(geglu_calls) == 1
    mod.act_fn.act = functools.partial(nn.functional.gelu, approximate="tanh")  # proven again by value
    mod(x)
    assert len(geglu_calls) == 2
    torch_mod = convert_and_fuse(make(TorchGeGLU))
    torch_mod.act_fn.approximate = "none"
    assert torch.equal(torch_mod(x), TorchGeGLU.forward(torch_mod, x)) and len(geglu_calls) == 2


def test_exact_gelu_is_not_fused_with_the_reason():
    mod = convert_and_fuse(nn.Sequential(make(ExactGELU)))
    assert type(mod[0]) is ExactGELU
    assert mod[0].__dict__[GATE_ATTR] == (
        "the activation child GELU is exact (approximate='none'), not silu or GELU's tanh form: only SwiGLU and "
        "GeGLU (tanh) gates are fused")


@pytest.mark.parametrize("first, then", [(TorchGeGLU, nn.SiLU), (GemmaMLP, nn.SiLU), (LlamaMLP, lambda: nn.GELU(
    approximate="tanh")), (LlamaMLP5, lambda: nn.GELU(approximate="tanh")), (LlamaMLP5, GELUTanh)],
    ids=["gelu-silu", "gelutanh-silu", "silu-gelu", "siluactivation-gelu", "siluactivation-gelutanh"])
def test_an_activation_child_swapped_for_the_other_kind_runs_the_written_code(first, then, geglu_calls, fused_calls):
    """A gate proven with one activation whose child is replaced by one of the other kind after
    fusion: neither fused gate runs; the class's own forward does, with the new child."""
    x = torch.randn(4, D, device=DEVICE, dtype=torch.float32)
    mod = convert_and_fuse(make(first, torch.float32), module_filter_fn=lambda mod, fqn: False)
    assert isinstance(mod, FusedGateModule)
    mod.act_fn = then()
    want = mod.down_proj(mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x))
    assert torch.equal(mod(x), want) and not geglu_calls and not fused_calls


def test_a_partial_shadowed_by_a_class_attribute_or_an_impostor_string_runs_the_written_code(geglu_calls):
    """The partial the proof read, shadowed after fusion by a class attribute (a property): the
    written code. A str subclass equal to everything as GELU's approximate: never proven tanh."""
    class Shadowed(GELUTanh):
        pass

    class Gemma(LlamaMLP):
        def __init__(self):
            super().__init__()
            self.act_fn = Shadowed()

    x = torch.randn(4, D, device=DEVICE, dtype=torch.float32)
    mod = convert_and_fuse(make(Gemma, torch.float32), module_filter_fn=lambda mod, fqn: False)
    mod(x)
    assert len(geglu_calls) == 1
    Shadowed.act = property(lambda self: nn.functional.silu)
    assert torch.equal(mod(x), mod.down_proj(F.silu(mod.gate_proj(x)) * mod.up_proj(x))) and len(geglu_calls) == 1

    class AnyString(str):
        def __eq__(self, other):
            return True

        __hash__ = str.__hash__

    impostor = make(GemmaMLP, torch.float32)
    impostor.act_fn.act = functools.partial(nn.functional.gelu, approximate=AnyString("none"))
    exact = make(TorchGeGLU, torch.float32)
    exact.act_fn.approximate = AnyString("none")
    for m in (impostor, exact):
        m = convert_and_fuse(nn.Sequential(m), module_filter_fn=lambda mod, fqn: False)
        assert not isinstance(m[0], FusedGateModule), m[0].__dict__.get(GATE_ATTR)


class Phi3MLP(nn.Module):  # transformers 5's Phi-3 (and GLM) feed-forward: one gate_up projection, chunked
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Linear(D, 2 * FFN, bias=False)
        self.down_proj = nn.Linear(FFN, D, bias=False)
        self.activation_fn = nn.SiLU()

    def forward(self, hidden_states):
        up_states = self.gate_up_proj(hidden_states)
        gate, up_states = up_states.chunk(2, dim=-1)
        up_states = up_states * self.activation_fn(gate)
        return self.down_proj(up_states)


class Phi3MLP5(Phi3MLP):  # with transformers 5's ACT2FN["silu"]
    def __init__(self):
        super().__init__()
        self.activation_fn = SiLUActivation()


class HalvesUpFirst(Phi3MLP):  # the up half first, F.silu, one line
    def forward(self, x):
        up, gate = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class HalvesTorchChunk(Phi3MLP):
    def forward(self, x):
        gate, up = torch.chunk(self.gate_up_proj(x), 2, dim=-1)
        return self.down_proj(self.activation_fn(gate).mul(up))


class HalvesGeGLU(Phi3MLP):
    def __init__(self):
        super().__init__()
        self.activation_fn = nn.GELU(approximate="tanh")


HALVES = {Phi3MLP: (0, "activation_fn", "hidden_states", "silu"), Phi3MLP5: (0, "activation_fn", "hidden_states", "silu"),
          HalvesUpFirst: (1, None, "x", "silu"), HalvesTorchChunk: (0, "activation_fn", "x", "silu"),
          HalvesGeGLU: (0, "activation_fn", "hidden_states", "gelu_tanh")}


@pytest.fixture
def halves_calls(monkeypatch):
    """How many times the fused forward ran swiglu_halves or geglu_halves (patched where gate_proof calls them)."""
    import f8tensor.fusion.gate_proof as gate_proof

    calls = []
    for name, op in (("swiglu_halves", swiglu_halves), ("geglu_halves", geglu_halves)):
        monkeypatch.setattr(gate_proof, name, functools.partial(lambda op, y, half: calls.append(half) or op(y, half), op))
    return calls


@pytest.mark.parametrize("cls", list(HALVES), ids=lambda c: c.__name__)
def test_chunked_gate_up_projections_are_fused_with_the_values_of_the_model_written_with_the_halves_op(
        cls, halves_calls):
    """One gate_up projection chunked in two (Phi-3's, GLM's): the gate runs as f8tensor.swiglu_halves
    (geglu_halves) on the projection's output, the bits of the same module written with it."""
    mod = convert_and_fuse(make(cls))
    assert isinstance(mod, FusedGateModule)
    found = mod.__dict__[GATE_ATTR]
    half, act, arg, activation = HALVES[cls]
    assert (found.gate, found.up, found.down, found.gate_half, found.act, found.arg, found.activation) == (
        "gate_up_proj", None, "down_proj", half, act, arg, activation)
    name = "GeGLU" if activation == "gelu_tanh" else "SwiGLU"
    assert str(found) == (f"{name} gate fused: down_proj({activation}(gate_up_proj half {half} of 2) * "
                          f"gate_up_proj half {1 - half} of 2)")
    op = geglu_halves if activation == "gelu_tanh" else swiglu_halves
    written = make(cls)
    written.forward = lambda x: written.down_proj(op(written.gate_up_proj(x), half))
    x = assert_bits_of_written(mod, written)
    assert halves_calls == [half]
    assert torch.equal(mod(**{arg: x}), mod(x)) and halves_calls == [half] * 3  # by keyword too
    assert_unconverted_close_to_own_math(cls, x)


class ChunkedInThree(Phi3MLP):
    def forward(self, x):
        gate, up, _ = self.gate_up_proj(x).chunk(3, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class ChunkedAlongRows(Phi3MLP):  # chunk's default dim is 0
    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2)
        return self.down_proj(F.silu(gate) * up)


class HalvesOfTwoCalls(Phi3MLP):  # the halves of two calls of the projection
    def forward(self, x):
        gate, _ = self.gate_up_proj(x).chunk(2, dim=-1)
        _, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class HalvesExactGELU(Phi3MLP):
    def __init__(self):
        super().__init__()
        self.activation_fn = nn.GELU()


HALVES_NOT_FUSED = {
    ChunkedInThree: "forward is not down(silu(gate(x)) * up(x)) nor its halves form: 8 operations",
    ChunkedAlongRows: ("forward is not down(silu(gate(x)) * up(x)): the product is not silu(linear(x)) * linear(x) "
                       "nor silu(g) * u of the halves g, u of linear(x).chunk(2, dim=-1)"),
    HalvesOfTwoCalls: "forward is not down(silu(gate(x)) * up(x)) nor its halves form: 11 operations",
    HalvesExactGELU: ("the activation child GELU is exact (approximate='none'), not silu or GELU's tanh form: only "
                      "SwiGLU and GeGLU (tanh) gates are fused"),
}


@pytest.mark.parametrize("cls", list(HALVES_NOT_FUSED), ids=lambda c: c.__name__)
def test_chunked_forwards_not_proven_are_left_alone_with_the_reason(cls):
    model = nn.Sequential(make(cls))
    report = fusion_report(convert_and_fuse(model))
    assert type(model[0]) is cls and model[0].__dict__[GATE_ATTR] == HALVES_NOT_FUSED[cls]
    assert [(r.kind, r.fused) for r in report.rows] == [("swiglu", False)]
    with pytest.raises(FusionError, match="gate not fused"):
        fuse_model_ops(nn.Sequential(make(cls)), strict=True)


def test_an_odd_gate_up_width_runs_the_modules_own_math(halves_calls):
    """A gate_up output whose last dim is odd has no two halves: the written code runs (and raises as
    written)."""
    mod = convert_and_fuse(make(Phi3MLP), module_filter_fn=lambda mod, fqn: False)
    plain = make(Phi3MLP)
    for m in (mod, plain):
        m.gate_up_proj = nn.Linear(D, 2 * FFN + 1, bias=False).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 3, D, device=DEVICE, dtype=torch.bfloat16)
    for m in (mod, plain):
        with pytest.raises(RuntimeError, match="size of tensor"):
            m(x)
    assert halves_calls == []


def test_a_forward_edited_in_place_runs_as_edited(fused_calls):
    """IPython's autoreload edits a class's forward in place (its __code__): the function object stays,
    its code changes, and the fused gate no longer runs."""
    class Edited(LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def zeroed(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0)

    model = nn.Sequential(make(Edited))
    fuse_model_ops(model, rms_norm=False, rope=False)
    x = torch.randn(2, 3, D, device=DEVICE, dtype=torch.bfloat16)
    model(x)
    assert len(fused_calls) == 1
    Edited.forward.__code__ = zeroed.__code__
    assert torch.equal(model(x), model[0].down_proj(torch.zeros(2, 3, FFN, device=DEVICE, dtype=torch.bfloat16)))
    assert len(fused_calls) == 1


class CallsTimesZero(SiLUActivation):  # its call is not its forward
    def _call_impl(self, *args, **kwargs):
        return super()._call_impl(*args, **kwargs) * 0


class OwnCall(LlamaMLP):
    def __init__(self):
        super().__init__()
        self.act_fn = CallsTimesZero()


def test_an_activation_class_with_a_call_of_its_own_is_not_fused_away():
    model = nn.Sequential(make(OwnCall))
    fuse_model_ops(model, rms_norm=False, rope=False)
    assert "its class CallsTimesZero defines _call_impl" in model[0].__dict__[GATE_ATTR]


@pytest.mark.parametrize("cls", [LlamaMLP, LlamaMLP5], ids=["nn.SiLU", "SiLUActivation"])
def test_silu_patched_after_fusion_runs_as_written(cls, fused_calls, monkeypatch):
    """F.silu replaced after fusion (nn.SiLU and transformers' SiLUActivation call it at each call):
    the written forward runs, with the replacement."""
    model = nn.Sequential(make(cls))
    fuse_model_ops(model, rms_norm=False, rope=False)
    x = torch.randn(2, 3, D, device=DEVICE, dtype=torch.bfloat16)
    model(x)
    assert len(fused_calls) == 1
    monkeypatch.setattr(F, "silu", lambda t, inplace=False: torch.zeros_like(t))
    assert torch.equal(model(x), model[0].down_proj(torch.zeros(2, 3, FFN, device=DEVICE, dtype=torch.bfloat16)))
    assert len(fused_calls) == 1
