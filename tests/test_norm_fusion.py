"""fuse_model_ops's RMSNorm fusion by proof (f8tensor/fusion/norm_proof.py): which norm modules it
proves to compute Hugging Face's Llama-family RMSNorm (or OLMo 2's, or Gemma's) and fuses, which it
leaves alone and why, and that a fused norm computes what the written one computes (its form:
rounded to x's dtype before the weight, or once after it), hands its amax to the float8 layers and falls back to
the written code where it must."""

import copy
import pickle
import types

import numpy as np
import pytest
import torch
from f8utils import DEVICE, count_amax_passes, ignore_records, sqnr
from torch import nn

from f8tensor import Float8Linear, FusionError, fuse_model_ops, fusion_report
from f8tensor.fused_ops.rms_norm import fused_rms_norm
from f8tensor.fusion.norm_proof import NORM_ATTR, FusedNormModule, RMSNormProof

D = 64


class LlamaRMSNorm(nn.Module):  # Hugging Face's, verbatim (transformers 5)
    def __init__(self, hidden_size, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class Reordered(LlamaRMSNorm):  # the same arithmetic, .float() and every product and sum turned round
    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = torch.rsqrt(self.variance_epsilon + h.pow(2).mean(-1, keepdim=True)) * h
        return h.to(dtype) * self.weight


class GemmaForm(LlamaRMSNorm):  # (1 + weight): another formula
    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1 + self.weight) * h.to(dtype)


class CastAfterWeight(LlamaRMSNorm):  # OLMo 2's (Olmo2RMSNorm), nn.RMSNorm's rounding: one, after the weight
    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h).to(dtype)


class FirstDim(LlamaRMSNorm):
    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(0, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class Branch(LlamaRMSNorm):
    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        if h.dim() > 1:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class IgnoresItsEpsilon(LlamaRMSNorm):  # reads the attribute, adds a literal of its value
    def forward(self, x):
        dtype = x.dtype
        eps = self.variance_epsilon  # noqa: F841
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)


class ReadsAGlobal(LlamaRMSNorm):
    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPSILON)
        return self.weight * h.to(dtype)


EPSILON = 1e-6
class CastAfterWeightReordered(LlamaRMSNorm):  # the same, .to(torch.float32) and the products turned round
    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = torch.rsqrt(self.variance_epsilon + h.pow(2).mean(-1, keepdim=True)) * h
        return (h * self.weight).to(dtype)


class CastBetween(LlamaRMSNorm):  # rounded before the weight and then again after it: neither form
    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h.to(dtype)).to(dtype)


class CastToItsOwnDtype(LlamaRMSNorm):  # the second form's cast to fp32 (h's dtype): never rounded to x's dtype
    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h).to(h.dtype)


class CastToTheWeightsDtype(LlamaRMSNorm):
    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h).to(self.weight.dtype)


class CastByKeyword(LlamaRMSNorm):
    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h).to(dtype=dtype)


class WeightTwice(LlamaRMSNorm):
    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h * self.weight).to(dtype)


class GemmaRMSNorm(nn.Module):  # Hugging Face's Gemma 2 norm (transformers 5), verbatim: a helper method, 1 + weight
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class GemmaReordered(GemmaRMSNorm):  # the same, every product and sum turned round
    def _norm(self, x):
        return torch.rsqrt(self.eps + x.pow(2).mean(-1, keepdim=True)) * x

    def forward(self, x):
        return ((self.weight.float() + 1.0) * self._norm(x.float())).type_as(x)


class GemmaNestedRMSNorm(GemmaRMSNorm):  # its helper calls a helper
    def _mean_square(self, x):
        return x.pow(2).mean(-1, keepdim=True)

    def _norm(self, x):
        return x * torch.rsqrt(self._mean_square(x) + self.eps)


class GemmaTwoRMSNorm(GemmaRMSNorm):  # 2 + weight: another formula
    def forward(self, x):
        output = self._norm(x.float())
        output = output * (2.0 + self.weight.float())
        return output.type_as(x)


class EpsilonComputedWith(LlamaRMSNorm):  # e at the old sentinels 0.0625 and 0.1875; e + 0.0117 at 1e-6
    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        e = self.variance_epsilon
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + (e + (e * e + -0.25 * e + 0.01171875)))
        return self.weight * h.to(dtype)


class EpsilonPlusALiteral(LlamaRMSNorm):  # the same as written wherever 1e-18 is lost, but not the proven form
    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + (self.variance_epsilon + 1e-18))
        return self.weight * h.to(dtype)


class GemmaOneFromEpsilon(GemmaRMSNorm):  # a "1" that is 1 at the old sentinels only
    def forward(self, x):
        output = self._norm(x.float())
        e = self.eps
        output = output * ((1.0 + 100 * (e * e + -0.25 * e + 0.01171875)) + self.weight.float())
        return output.type_as(x)


class KeepdimOne(LlamaRMSNorm):  # mean(-1, keepdim=1) raises: keepdim must be a bool
    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=1) + self.variance_epsilon)
        return self.weight * h.to(dtype)


# class: its report line (the form fused)
FUSED = {LlamaRMSNorm: "RMSNorm fused: weight * normalized(x, eps=variance_epsilon).to(x.dtype)",
         Reordered: "RMSNorm fused: weight * normalized(x, eps=variance_epsilon).to(x.dtype)",
         CastAfterWeight: "RMSNorm fused: (weight * normalized(x, eps=variance_epsilon)).to(x.dtype)",
         CastAfterWeightReordered: "RMSNorm fused: (weight * normalized(x, eps=variance_epsilon)).to(x.dtype)",
         GemmaRMSNorm: "RMSNorm fused: (normalized(x, eps=eps) * (1 + weight)).type_as(x)",
         GemmaReordered: "RMSNorm fused: (normalized(x, eps=eps) * (1 + weight)).type_as(x)"}
NOT_IT = ("forward is not weight * h.to(x.dtype), (weight * h).to(x.dtype) or (h * (1.0 + weight.float())).type_as(x), "
          "h = x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) (the epsilon variance_epsilon = 1e-06)")
IN_PYTHON = ("forward computes with the epsilon variance_epsilon in Python (tracing would fold that into one "
             "constant): it must be added to the mean of the squares as it is")
NOT_FUSED = {
    GemmaForm: NOT_IT,
    CastBetween: NOT_IT,
    CastToItsOwnDtype: NOT_IT,
    CastToTheWeightsDtype: NOT_IT,
    GemmaTwoRMSNorm: NOT_IT.replace("variance_epsilon", "eps"),
    GemmaNestedRMSNorm: ("self._norm reads self._mean_square, which is not (only) its weight and epsilon "
                              "(a method the forward calls)"),
    CastByKeyword: NOT_IT,
    WeightTwice: NOT_IT,
    FirstDim: NOT_IT,
    IgnoresItsEpsilon: NOT_IT,
    KeepdimOne: NOT_IT,
    EpsilonComputedWith: IN_PYTHON,
    EpsilonPlusALiteral: IN_PYTHON,
    GemmaOneFromEpsilon: IN_PYTHON.replace("variance_epsilon", "eps"),
    Branch: "forward has a branch or a loop",
    ReadsAGlobal: "forward reads the global 'EPSILON'",
}


def make(cls=LlamaRMSNorm, dtype=torch.bfloat16):
    torch.manual_seed(0)
    mod = cls(D).to(DEVICE, dtype)
    nn.init.normal_(mod.weight, 1.0, 0.3)
    return mod


def fused(mod, **switches):
    fuse_model_ops(mod, swiglu=False, rope=False, **switches)
    return mod


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times a fused norm ran f8tensor's fused_rms_norm (patched where norm_proof calls it):
    a fused module that fell back to its written code would give the written values too."""
    import f8tensor.fusion.norm_proof as norm_proof

    calls = []
    monkeypatch.setattr(norm_proof, "fused_rms_norm", lambda *a, **k: calls.append(1) or fused_rms_norm(*a, **k))
    return calls


def grads(mod, x, g):
    x = x.detach().requires_grad_()
    y = mod(x)
    return [y, *torch.autograd.grad(y, (x, mod.weight), g)]


def assert_input_gradient_close(dx, want, x, weight, g, eps):
    """|dx - want| <= one unit in the last place of want + 2^-20 of the magnitude of the input
    gradient's terms, rstd * (|g w| + |x_hat| mean(|g w x_hat|)), w the weight the norm scales by
    (1 + weight in Gemma's form): the bound of fused_ops/rms_norm.py and tests/test_rms_norm.py
    (where the two terms cancel, fp32 rounding of them decides)."""
    rstd = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    x_hat, gw = x.double() * rstd, g.double() * weight.double()
    terms = rstd * (gw.abs() + x_hat.abs() * (gw * x_hat).abs().mean(-1, keepdim=True))
    ulp = torch.nextafter(want.abs(), torch.full_like(want, float("inf"))).double() - want.double().abs()
    assert ((dx.double() - want.double()).abs() <= ulp + 2**-20 * terms).all()


def scale(mod):
    """The weight the norm multiplies by, in the form proven."""
    return 1.0 + mod.weight.float() if mod.__dict__[NORM_ATTR].one_plus_weight else mod.weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cls", list(FUSED), ids=lambda c: c.__name__)
def test_written_forms_are_fused_with_the_written_values(cls, dtype, monkeypatch):
    """The fused norm runs, in the form proven, and gives on CPU (the reference path) the written
    code's output and weight gradient bit for bit, its input gradient within one unit in the last
    place plus 2^-20 of the terms (the same terms, summed in another order than autograd's chain
    rule: assert_input_gradient_close). On the GPU the kernels sum rstd's squares in another order
    too (their bound: tests/test_rms_norm.py)."""
    import f8tensor.fusion.norm_proof as norm_proof

    forms = []
    monkeypatch.setattr(norm_proof, "fused_rms_norm", lambda *a, **k: forms.append(k["cast_before_weight"])
                        or fused_rms_norm(*a, **k))
    mod, written = fused(make(cls, dtype)), make(cls, dtype)
    assert isinstance(mod, FusedNormModule) and isinstance(mod.__dict__[NORM_ATTR], RMSNormProof)
    assert mod.__dict__[NORM_ATTR].cast_before_weight == FUSED[cls].startswith("RMSNorm fused: weight *")
    assert str(fusion_report(mod)).splitlines()[1].endswith(FUSED[cls])
    x = torch.randn(4, 32, D, device=DEVICE, dtype=dtype) * 3
    g = torch.randn_like(x)
    (y, dx, dw), (y_want, dx_want, dw_want) = grads(mod, x, g), grads(written, x, g)
    assert forms == [mod.__dict__[NORM_ATTR].cast_before_weight]  # the fused norm ran once, in the form proven
    assert mod.__dict__[NORM_ATTR].one_plus_weight == ("(1 + weight)" in FUSED[cls])
    if DEVICE.type == "cpu":
        assert torch.equal(y, y_want) and torch.equal(dw, dw_want)
        eps = getattr(mod, mod.__dict__[NORM_ATTR].eps)
        assert_input_gradient_close(dx, dx_want, x, scale(mod), g, eps)
    else:
        for got, want in ((y, y_want), (dx, dx_want), (dw, dw_want)):
            assert sqnr(want, got) > 40


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the reference path's bound (the kernels': tests/test_rms_norm.py)")
def test_the_input_gradient_where_its_terms_cancel(fused_calls):
    """Gemma's form in bf16 where the input gradient's two terms nearly cancel: two units in the last
    place from autograd's value here, within the bound's 2^-20 of the terms."""
    torch.manual_seed(0)
    mod = GemmaRMSNorm(32).bfloat16()
    nn.init.normal_(mod.weight, 0.4, 0.5)
    written = copy.deepcopy(mod)
    x = (torch.randn(3, 5, 32) * 2).bfloat16()
    g = torch.randn_like(x)
    (_, dx, _), (_, dx_want, _) = grads(fused(mod), x, g), grads(written, x, g)
    assert isinstance(mod, FusedNormModule) and len(fused_calls) == 1 and not torch.equal(dx, dx_want)
    assert_input_gradient_close(dx, dx_want, x, scale(mod), g, mod.eps)


@pytest.mark.parametrize("cls", list(NOT_FUSED), ids=lambda c: c.__name__)
def test_look_alikes_are_left_alone_with_the_reason(cls):
    mod = fused(nn.Sequential(make(cls)))
    assert type(mod[0]) is cls and mod[0].__dict__[NORM_ATTR] == NOT_FUSED[cls]
    assert f"RMSNorm not fused: {NOT_FUSED[cls]}" in str(fusion_report(mod))
    with pytest.raises(FusionError, match="RMSNorm not fused"):
        fuse_model_ops(nn.Sequential(make(cls)), swiglu=False, rope=False, strict=True)


def test_only_modules_that_look_like_a_norm_are_examined():
    class TwoWeights(LlamaRMSNorm):
        def __init__(self, d):
            super().__init__(d)
            self.bias = nn.Parameter(torch.zeros(d))

    model = nn.Sequential(nn.Linear(D, D), TwoWeights(D), nn.LayerNorm(D))
    assert not fusion_report(fused(model)).rows


def test_the_fused_norm_hands_its_amax_to_the_float8_layers(monkeypatch):
    """q/k/v-like layers after a fused norm skip their amax pass, and give the same bits."""
    passes = count_amax_passes(monkeypatch)
    model = nn.Sequential(make(), Float8Linear(D, D, bias=False, device=DEVICE, dtype=torch.bfloat16))
    fused(model)
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x)
    assert passes == [False, True]  # the input's amax from the norm's record; the weight's own pass
    ignore_records(monkeypatch)
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_the_written_code_runs_where_the_fused_kernels_would_differ(monkeypatch):
    """A weight of another dtype (the written code promotes: fp32 out), extra arguments, autocast,
    fx tracing: the class's own forward, with its own results; the input by its name: fused."""
    import f8tensor.fusion.norm_proof as norm_proof

    calls = []
    monkeypatch.setattr(norm_proof, "fused_rms_norm", lambda *a, **k: calls.append(1) or fused_rms_norm(*a, **k))
    mod = fused(make())
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    mod.weight.data = mod.weight.data.float()
    assert mod(x).dtype == torch.float32 and torch.equal(mod(x), LlamaRMSNorm.forward(mod, x))
    mod.weight.data = mod.weight.data.bfloat16()
    assert not calls
    assert torch.equal(mod(hidden_states=x), mod(x)) and len(calls) == 2
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert torch.equal(mod(x), LlamaRMSNorm.forward(mod, x)) and len(calls) == 2
    with pytest.raises(TypeError):
        mod(x, x)  # as the written forward raises
    traced = torch.fx.symbolic_trace(nn.Sequential(mod))
    assert any(n.target is torch.rsqrt for n in traced.graph.nodes)


def test_copies_pickles_state_dict_and_a_second_call(fused_calls):
    mod = fused(nn.Sequential(make()))
    keys = list(mod.state_dict())
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    want = mod(x)
    for twin in (copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):
        assert type(twin[0]) is type(mod[0]) and isinstance(twin[0].__dict__[NORM_ATTR], RMSNormProof)
        assert torch.equal(twin(x), want) and list(twin.state_dict()) == keys
    assert len(fused_calls) == 3  # the original and both copies ran the fused norm
    report = str(fusion_report(mod))
    fused(mod)  # a no-op
    assert str(fusion_report(mod)) == report


def test_the_epsilon_is_read_at_each_call(fused_calls):
    mod, written = fused(make()), make()
    mod.variance_epsilon = written.variance_epsilon = 0.5
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16) * 1e-2
    assert sqnr(written(x), mod(x)) > 40 and len(fused_calls) == 1


def test_a_helper_method_rebound_or_shadowed_runs_the_written_code(monkeypatch):
    """The proof holds for the helper method it walked: rebinding it on the class, or shadowing it
    on the instance, runs the class's own forward (with the new helper), not the fused norm."""
    import f8tensor.fusion.norm_proof as norm_proof

    calls = []
    monkeypatch.setattr(norm_proof, "fused_rms_norm", lambda *a, **k: calls.append(1) or fused_rms_norm(*a, **k))

    class LocalGemmaRMSNorm(GemmaRMSNorm):
        pass

    mod = fused(make(LocalGemmaRMSNorm))
    assert isinstance(mod, FusedNormModule) and mod.__dict__[NORM_ATTR].helpers[0][0] == "_norm"
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    mod(x)
    assert len(calls) == 1
    LocalGemmaRMSNorm._norm = lambda self, h: h * 2  # another normalization
    assert torch.equal(mod(x), ((x.float() * 2) * (1.0 + mod.weight.float())).type_as(x)) and len(calls) == 1
    del LocalGemmaRMSNorm._norm  # GemmaRMSNorm's again: proven
    mod(x)
    assert len(calls) == 2
    mod._norm = lambda h: h * 3  # an instance attribute shadows the method
    assert torch.equal(mod(x), ((x.float() * 3) * (1.0 + mod.weight.float())).type_as(x)) and len(calls) == 2


def test_on_an_unchecked_python_each_candidate_says_it_was_not_attempted(monkeypatch):
    from f8tensor import FusionWarning
    from f8tensor.fusion import python_versions

    monkeypatch.setattr(python_versions, "CHECKED_VERSIONS", ((3, 99),))
    with pytest.warns(FusionWarning, match="the fusions by proof"):
        mod = fused(nn.Sequential(make(), nn.RMSNorm(D)))
    assert type(mod[0]) is LlamaRMSNorm and mod[0].__dict__[NORM_ATTR].startswith("not attempted: the gate, RoPE and norm proofs")
    assert type(mod[1]).__name__ == "RMSNorm" and mod[1].__module__ == "f8tensor.fused_ops.rms_norm"  # swapped


class Float(float):  # a subclass of float keeping its arithmetic: an epsilon like float's
    pass


class AddsTwice(float):  # eps + tensor is its own
    def __add__(self, other):
        return other + 2 * float(self)


@pytest.mark.parametrize("eps", [0, 1e-5, Float(1e-5), np.float32(1e-5), np.float64(1e-6), np.float16(1e-3)],
                         ids=lambda e: f"{type(e).__name__}({e})")
def test_epsilons_of_other_number_types_are_fused_with_the_written_values(eps, fused_calls):
    """An int (eps=0 from a JSON config), a float subclass keeping float's arithmetic or a NumPy
    float: the written code adds it to an fp32 tensor as it adds float(eps), so it is fused."""
    for cls in (LlamaRMSNorm, Reordered):  # eps + tensor and tensor + eps
        mod, written = make(cls), make(cls)
        mod.variance_epsilon = written.variance_epsilon = eps
        fused(mod)
        assert isinstance(mod.__dict__[NORM_ATTR], RMSNormProof), mod.__dict__[NORM_ATTR]
        x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16) * 1e-2
        y, want = mod(x), written(x)
        assert torch.equal(y, want) if DEVICE.type == "cpu" else sqnr(want, y) > 40
    assert len(fused_calls) == 2  # the fused norm ran, in both forms


@pytest.mark.parametrize("eps", [True, AddsTwice(1e-5), np.int64(0), 2**60], ids=lambda e: type(e).__name__)
def test_epsilons_the_written_code_may_add_otherwise_are_refused(eps):
    """A bool, a float subclass with an addition of its own, a NumPy int (PyTorch takes large ones
    otherwise), an int a float does not hold exactly: left alone, with the reason."""
    mod = make(Reordered)
    mod.variance_epsilon = eps
    mod = fused(nn.Sequential(mod))
    assert mod[0].__dict__[NORM_ATTR] == (
        f"the epsilon variance_epsilon = {eps!r} is a {type(eps).__name__}, not a float, an int of magnitude "
        "at most 2**53 or a NumPy float: set it to float(variance_epsilon) to fuse")


def test_a_weight_or_epsilon_set_since_to_what_was_not_proven_runs_the_written_code():
    """weight = None: the written code's TypeError (the fused norm would normalize without a weight);
    an epsilon whose addition is its own: the written code's values."""
    mod = fused(make())
    mod.weight = None
    with pytest.raises(TypeError, match="NoneType"):
        mod(torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16))
    mod, written = fused(make(Reordered)), make(Reordered)
    mod.variance_epsilon = written.variance_epsilon = AddsTwice(0.5)
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16) * 1e-2
    assert torch.equal(mod(x), written(x))


def test_a_forward_edited_in_place_runs_as_edited():
    """IPython's autoreload edits a class's forward in place (its __code__): the function object stays,
    its code changes, and the fused norm no longer runs."""
    class Edited(LlamaRMSNorm):  # LlamaRMSNorm's forward as a function of its own (edited below, not the class's)
        forward = types.FunctionType(LlamaRMSNorm.forward.__code__, LlamaRMSNorm.forward.__globals__)

    def doubled(self, hidden_states):
        return 2 * hidden_states

    mod = fused(make(Edited))
    x = torch.randn(4, D, device=DEVICE, dtype=torch.bfloat16)
    assert not torch.equal(mod(x), 2 * x)
    Edited.forward.__code__ = doubled.__code__
    assert torch.equal(mod(x), 2 * x)
