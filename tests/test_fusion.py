"""fuse_model_ops, the explicit call for the model-op fusions: conversion leaves norms, gates and RoPE
alone; the fusion call respects module_filter_fn, reports what it fused and why not, raises in strict
mode when an expected fusion did not happen, and says loudly when it cannot run on this Python."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from f8utils import SwiGLU
from torch import nn

import f8tensor
from f8tensor import (FusionError, FusionWarning, RMSNorm, conversion_summary, convert_to_float8_training,
                      fuse_model_ops, fusion_report)
from f8tensor.fusion import python_versions
from f8tensor.fusion.gate_proof import FusedGateModule
from f8tensor.fusion.rope_proof import FusedRoPEModule


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


ROPE_SCALE = 1.0


def apply_rotary_emb_scaled(x, freqs_cis):
    """Meta's complex form times a module-level number: a global that is not a function, so not
    proven in either form (named like a rotary embedding: reported)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return (torch.view_as_real(xc * freqs_cis).flatten(-2) * ROPE_SCALE).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.wq, self.wk = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin):
        q, k = apply_rotary_pos_emb(self.wq(x), self.wk(x), cos, sin)
        return q + k


class ComplexAttention(Attention):
    def forward(self, x, freqs_cis):
        return apply_rotary_emb_scaled(self.wq(x), freqs_cis)


class Block(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attention, self.feed_forward = Attention(dim), SwiGLU(dim, 128)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


def model():
    return nn.Sequential(Block(), Block())


def kinds(report, fused=True):
    rows = report.fused() if fused else report.not_fused()
    return sorted((r.fqn, r.kind) for r in rows)


def test_conversion_converts_linear_layers_only():
    m = model()
    convert_to_float8_training(m, module_filter_fn=lambda mod, fqn: True)
    assert not list(fusion_report(m).rows)
    assert [type(b.attention_norm) for b in m] == [nn.RMSNorm] * 2
    assert not any(isinstance(mod, (FusedGateModule, FusedRoPEModule)) for mod in m.modules())
    assert conversion_summary(m).splitlines()[0] == "f8tensor: 10 of 10 linear layers in float8"


@pytest.mark.parametrize("keyword", ["fuse_rms_norm", "fuse_swiglu", "fuse_rope"])
def test_the_moved_keywords_name_the_new_call(keyword):
    with pytest.raises(TypeError, match=r"since f8tensor 0.2.0 .* f8tensor.fuse_model_ops\(model, "):
        convert_to_float8_training(model(), **{keyword: False})
    with pytest.raises(TypeError, match="unexpected keyword argument 'fuse_everything'"):
        convert_to_float8_training(model(), fuse_everything=True)


def test_fuses_each_kind_and_reports_it():
    m = model()
    report = fuse_model_ops(m)
    assert kinds(report) == sorted([(f"{i}.{n}", "rms_norm") for i in "01" for n in ("attention_norm", "ffn_norm")]
                                   + [(f"{i}.feed_forward", "swiglu") for i in "01"]
                                   + [(f"{i}.attention", "rope") for i in "01"])
    assert not report.not_fused()
    assert str(report).splitlines()[:2] == [
        "f8tensor fusion: rms_norm 4 of 4, swiglu 2 of 2, rope 2 of 2",
        "  0.attention_norm  rms_norm  RMSNorm fused"]
    assert str(fusion_report(m)) == str(report)


def test_module_filter_fn_reaches_every_fusion():
    """A filter that rejects a block leaves its norms, gate and RoPE alone, and says so."""
    m = model()
    seen = []

    def not_block_1(mod, fqn):
        seen.append(fqn)
        return not fqn.startswith("1.")

    report = fuse_model_ops(m, module_filter_fn=not_block_1, strict=True)  # excluded is not a failure
    assert {"1.attention_norm", "1.ffn_norm", "1.feed_forward", "1.attention"} <= set(seen)
    assert [r.fqn for r in report.fused()] and all(r.fqn.startswith("0.") for r in report.fused())
    excluded = report.not_fused()
    assert sorted(r.fqn for r in excluded) == ["1.attention", "1.attention_norm", "1.feed_forward", "1.ffn_norm"]
    assert all(r.excluded and r.detail.endswith("excluded by module_filter_fn") for r in excluded)
    assert type(m[1].attention_norm) is nn.RMSNorm and not isinstance(m[1].feed_forward, FusedGateModule)
    assert not isinstance(m[1].attention, FusedRoPEModule)
    fuse_model_ops(m)  # later, without the filter: the rest is fused
    assert not fusion_report(m).not_fused()
    with pytest.raises(FusionError, match="swiglu: module_filter_fn excluded every module this switch examined"):
        fuse_model_ops(model(), rms_norm=False, rope=False, strict=True,
                       module_filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))  # a filter for linears


def test_switches_leave_their_fusion_alone():
    m = model()
    report = fuse_model_ops(m, rms_norm=False, rope=False)
    assert {r.kind for r in report.rows} == {"swiglu"}
    assert type(m[0].attention_norm) is nn.RMSNorm and not isinstance(m[0].attention, FusedRoPEModule)


def test_strict_raises_for_what_it_could_not_fuse():
    class Branchy(SwiGLU):
        def forward(self, x):
            if x.dim() > 2:
                return self.w2(F.silu(self.w1(x)) * self.w3(x))
            return x

    m = model()
    m[1].feed_forward = Branchy(64, 128)
    with pytest.raises(FusionError, match=r"1.feed_forward \(swiglu\): SwiGLU gate not fused: forward has a "
                                          r"branch or a loop") as e:
        fuse_model_ops(m, strict=True)
    assert "swiglu=False" in str(e.value)
    assert isinstance(m[0].feed_forward, FusedGateModule)  # what could be fused was


def test_strict_raises_when_a_switch_finds_nothing_and_names_the_form_it_saw():
    no_norms = nn.Sequential(SwiGLU(64, 128))
    with pytest.raises(FusionError, match=r"rms_norm: the model has no nn.RMSNorm and no norm module"):
        fuse_model_ops(no_norms, rope=False, strict=True)
    fuse_model_ops(no_norms, rms_norm=False, rope=False, strict=True)  # what was asked for was fused

    complex_rope = nn.Sequential(ComplexAttention())
    with pytest.raises(FusionError, match=r"0 \(rope\): RoPE not fused: its forward reads no rotary function "
                                          r"proven \(apply_rotary_emb_scaled: .*in the complex form, "
                                          r"apply_rotary_emb_scaled reads the global 'ROPE_SCALE'"):
        fuse_model_ops(complex_rope, rms_norm=False, swiglu=False, strict=True)


def test_an_unchecked_python_warns_once_reports_and_fails_strict(monkeypatch):
    monkeypatch.setattr(python_versions, "CHECKED_VERSIONS", ((3, 99),))
    m = model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fuse_model_ops(m)
        fuse_model_ops(model())
    ours = [w for w in caught if issubclass(w.category, FusionWarning)]
    assert len(ours) == 1 and "the fusions by proof (SwiGLU gate, RoPE, norms other than nn.RMSNorm) are off" in str(
        ours[0].message)
    assert len(report.fused("rms_norm")) == 4  # the norm swap reads no bytecode
    assert [(r.fqn, r.kind) for r in report.not_fused()] == [("<root>", "swiglu"), ("<root>", "rope")]
    assert "checked on Python 3.99" in report.not_fused()[0].detail
    with pytest.raises(FusionError, match="not attempted"):
        fuse_model_ops(model(), strict=True)
    monkeypatch.undo()
    assert python_versions.unsupported_reason() is None  # this Python is one of the checked versions
    fuse_model_ops(m)
    assert not fusion_report(m).not_fused()


def test_a_fused_model_loaded_on_an_unchecked_python_says_so(monkeypatch):
    import pickle

    m = model()
    fuse_model_ops(m)
    data = pickle.dumps(m)
    monkeypatch.setattr(python_versions, "CHECKED_VERSIONS", ((3, 99),))
    with pytest.warns(FusionWarning, match="the fusions by proof"):
        loaded = pickle.loads(data)
    assert type(loaded[0].feed_forward) is SwiGLU and not isinstance(loaded[0].attention, FusedRoPEModule)
    rows = {(r.fqn, r.kind): r.detail for r in fusion_report(loaded).not_fused()}
    assert rows[("0.feed_forward", "swiglu")].startswith("SwiGLU gate not fused: not attempted: the gate, RoPE and norm proofs")
    assert ("1.attention", "rope") in rows


def test_before_or_after_conversion_alike():
    x, cos, sin = torch.randn(2, 8, 64), torch.randn(8, 64), torch.randn(8, 64)
    outs = []
    for fuse_first in (True, False):
        torch.manual_seed(0)
        m = model().bfloat16()
        steps = [lambda: fuse_model_ops(m), lambda: convert_to_float8_training(m, module_filter_fn=lambda *a: True)]
        for step in steps if fuse_first else steps[::-1]:
            step()
        assert not fusion_report(m).not_fused() and type(m[0].ffn_norm) is RMSNorm
        h = x.bfloat16()
        for block in m:
            h = block(h, cos.bfloat16(), sin.bfloat16())
        outs.append(h)
    assert torch.equal(*outs)


def test_public_names():
    assert {"fuse_model_ops", "fusion_report", "FusionReport", "FusionError", "FusionWarning",
            "reset_state"} <= set(f8tensor.__all__)
    assert f8tensor.__version__ == "0.2.0"


def test_a_copy_whose_proof_fails_keeps_a_class_made_after_fusion(monkeypatch):
    """A subclass of the fused class made after fusion (FSDP2 makes one) survives a copy whose
    re-proof fails: the copy keeps that class (its methods) and runs its forward as written."""
    import copy

    class Marker:
        pass

    model = nn.Sequential(SwiGLU(64, 128))
    fuse_model_ops(model, rms_norm=False, rope=False)
    fused = type(model[0])
    model[0].__class__ = type("FSDPFFN", (Marker, fused), {})
    monkeypatch.setattr(python_versions, "unsupported_reason", lambda: "Python 9.9 is not checked")
    monkeypatch.setattr(python_versions, "warn_once", lambda reason: None)
    twin = [copy.copy(model[0])]  # proven again where it is made, as a pickle is
    assert isinstance(twin[0], Marker) and isinstance(twin[0], fused)
    assert "not attempted: Python 9.9" in str(fusion_report(twin[0]))
    x = torch.randn(2, 64)
    assert torch.equal(twin[0](x), SwiGLU.forward(twin[0], x))


def test_a_deepcopy_keeps_the_proof_without_tracing(monkeypatch):
    """A deepcopy in the process holds the proof by reference and runs fused, independent of the
    original; nothing is proven again (a proof's fx trace patches nn.Module's call process-wide)."""
    import copy

    model = nn.Sequential(SwiGLU(64, 128))
    fuse_model_ops(model, rms_norm=False, rope=False)
    monkeypatch.setattr(torch.fx.Tracer, "trace", lambda *a, **k: pytest.fail("a deepcopy traced"))
    twin = copy.deepcopy(model)
    assert type(twin[0]) is type(model[0]) and twin[0].w1 is not model[0].w1
    assert "SwiGLU gate fused" in str(fusion_report(twin))
    x = torch.randn(2, 64)
    assert torch.equal(twin[0](x), model[0](x))
    with torch.no_grad():
        twin[0].w2.weight.zero_()
    assert torch.equal(twin[0](x), torch.zeros(2, 64)) and not torch.equal(model[0](x), torch.zeros(2, 64))
