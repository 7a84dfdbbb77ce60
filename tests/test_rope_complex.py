"""The complex form of fuse_model_ops's RoPE fusion (f8tensor/fusion/rope_complex.py): rotary functions
that multiply adjacent pairs as complex numbers (Meta's Llama 3, torchtitan) are proven side-effect
free once, and rotations per call signature; fused, they run f8tensor.rope(interleaved=True) within
one unit in the last place of the written code, forward and backward; everything else runs as
written, with the reason. torchtitan's own model: tests/test_reference_models.py."""

import warnings

import complex_rope_forms
import pytest
import torch
from f8utils import DEVICE
from torch import nn

from f8tensor import fuse_model_ops, fusion_report
from f8tensor.fusion import rope_complex, rope_proof
from f8tensor.fusion.python_versions import FusionWarning
from f8tensor.fusion.rope_proof import ROPE_ATTR, FusedRoPEModule, RotaryFunction, prove_function

from complex_rope_forms import (HEAD, KV, B, DeepSeekAttention, H, PairAttention, S, broadcast_table,
                               deepseek_v2_apply_rotary_emb, one_tensor_class, rotate_and_add, rotate_conjugate,
                               rotate_marked, rotate_one, rotate_pairs, rotate_scaled)


def freqs_cis(rows=S, dtype=torch.complex64):
    angles = torch.outer(torch.arange(rows, dtype=torch.float32), torch.rand(HEAD // 2) * 3)
    return torch.polar(torch.ones_like(angles), angles).to(dtype).to(DEVICE)


def make(cls=PairAttention, seed=0):
    torch.manual_seed(seed)
    return cls().to(DEVICE, torch.bfloat16)


def step(mod, freqs):
    mod.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    dtype = next(mod.parameters()).dtype
    x = torch.randn(B, S, H * HEAD, device=DEVICE, dtype=dtype, requires_grad=True)
    out = mod(x, freqs)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=DEVICE)).square().sum().backward()
    return [out, x.grad] + [p.grad for p in mod.parameters() if p.grad is not None]


def within_one_ulp(got, want):
    """|got - want| within one unit in the last place of want's dtype at want's magnitude, plus
    fp32 rounding noise at the tensor's magnitude (2^-21 of its largest element): a complex multiply
    may fuse a product into the sum where rope rounds it, which shows where the two products nearly
    cancel, in fp32 results (in bf16 it is far below one unit)."""
    want32, got32 = want.float(), got.float()
    info = torch.finfo(want.dtype)
    ulp = torch.exp2(torch.floor(torch.log2(want32.abs().clamp_min(info.tiny)))) * info.eps
    return bool(((got32 - want32).abs() <= ulp + want32.abs().max() * 2**-21).all())


@pytest.fixture(autouse=True)
def fuse_small_tensors(monkeypatch):
    monkeypatch.setattr(rope_proof, "MIN_FUSED_NUMEL", 0)


@pytest.fixture
def rope_calls(monkeypatch):
    calls = []
    checked = rope_proof.rope_checked
    monkeypatch.setattr(rope_proof, "rope_checked", lambda *a, **k: calls.append(k) or checked(*a, **k))
    return calls


@pytest.mark.parametrize("fn", [rotate_pairs, rotate_one, deepseek_v2_apply_rotary_emb])
def test_written_forms_are_proven(fn):
    proof = prove_function(fn)
    assert isinstance(proof, RotaryFunction) and isinstance(proof.run, rope_complex.ComplexRun)
    proven = [f for f, *_ in proof.codes]
    assert proven == ([broadcast_table, rotate_pairs] if fn is rotate_pairs else [fn])


@pytest.mark.parametrize("fn, reason", [
    (rotate_conjugate, "in the complex form, rotate_conjugate reads .conj"),
    (rotate_scaled, "in the complex form, rotate_scaled reads the global 'SCALE'"),
    (rotate_marked, "in the complex form, rotate_marked does more than compute on its arguments: STORE_ATTR"),
])
def test_look_alikes_are_not_proven_with_the_reason(fn, reason):
    proof = prove_function(fn)
    assert isinstance(proof, str) and reason in proof


@pytest.mark.parametrize("form", ["pairs", "one", "one_fp32", "deepseek"])
def test_fused_values_within_one_ulp_of_the_written_code(form, rope_calls):
    """Output, input gradient and weight gradients of the fused module within one unit in the last
    place of the written module's; each rotation runs rope's interleaved form. DeepSeek-V2's moves
    the table to q's device (.to(xq_.device)), which the trace shows as nothing where it is there."""
    cls = {"pairs": PairAttention, "deepseek": DeepSeekAttention}.get(form) or one_tensor_class(rotate_one)
    freqs = {"pairs": freqs_cis(S * 2), "deepseek": freqs_cis()[None]}.get(form, freqs_cis()[:, None])
    dtype = torch.float32 if form == "one_fp32" else torch.bfloat16  # fp32: no casts in the trace
    mod, want_mod = make(cls).to(dtype), make(cls).to(dtype)
    report = fuse_model_ops(mod, rms_norm=False, swiglu=False, strict=True)
    assert isinstance(mod, FusedRoPEModule) and [r.fqn for r in report.fused("rope")] == ["<root>"]
    got = step(mod, freqs)
    assert len(rope_calls) == (2 if form in ("pairs", "deepseek") else 1) and all(
        k == {"interleaved": True} for k in rope_calls)
    for g, w in zip(got, step(want_mod, freqs)):
        assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride()
        assert within_one_ulp(g, w)


def test_each_signature_is_traced_once(monkeypatch, rope_calls):
    traced = []
    trace = rope_complex.trace_plan
    monkeypatch.setattr(rope_complex, "trace_plan", lambda fn, args: traced.append(1) or trace(fn, args))
    mod = make()
    fuse_model_ops(mod, rms_norm=False, swiglu=False)
    for _ in range(3):
        step(mod, freqs_cis(S))
    step(mod, freqs_cis(S + 4))  # another table shape: another signature
    assert len(traced) == 2 and len(rope_calls) == 8


def test_a_trace_that_is_not_rotations_warns_once_and_runs_as_written(rope_calls):
    cls = one_tensor_class(rotate_and_add)
    mod = make(cls)
    report = fuse_model_ops(mod, rms_norm=False, swiglu=False, strict=True)  # the walk holds
    assert report.fused("rope")
    freqs = freqs_cis()[:, None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = step(mod, freqs)
        step(mod, freqs)
    ours = [w for w in caught if issubclass(w.category, FusionWarning)]
    assert len(ours) == 1 and "rotate_and_add runs as written" in str(ours[0].message)
    assert "returns something other than complex rotations of its arguments" in str(ours[0].message)
    assert not rope_calls
    for g, w in zip(got, step(make(cls), freqs)):
        assert torch.equal(g, w)


def test_what_rope_would_change_runs_the_written_code(monkeypatch, rope_calls):
    """Tables that require grad (their gradient is the written code's), x smaller than
    MIN_FUSED_NUMEL, and calls that are not all tensors run as written."""
    cls = one_tensor_class(rotate_one)
    mod = make(cls)
    fuse_model_ops(mod, rms_norm=False, swiglu=False)
    freqs = freqs_cis()[:, None].requires_grad_()
    got = step(mod, freqs)
    want_freqs = freqs.detach().clone().requires_grad_()
    for g, w in zip(got + [freqs.grad], step(make(cls), want_freqs) + [want_freqs.grad]):
        assert torch.equal(g, w)
    monkeypatch.setattr(rope_proof, "MIN_FUSED_NUMEL", B * S * H * HEAD + 1)
    step(mod, freqs_cis()[:, None])
    assert not rope_calls
    monkeypatch.setattr(rope_proof, "MIN_FUSED_NUMEL", 0)
    step(mod, freqs_cis()[:, None])
    assert len(rope_calls) == 1


def test_rebinding_the_helper_after_fusion_runs_the_written_code(monkeypatch, rope_calls):
    mod, freqs = make(), freqs_cis()
    fuse_model_ops(mod, rms_norm=False, swiglu=False)
    step(mod, freqs)
    assert len(rope_calls) == 2

    original = broadcast_table

    def doubled(freqs, x):
        return original(freqs, x) * 2

    monkeypatch.setattr(complex_rope_forms, "broadcast_table", doubled)
    got = step(mod, freqs)
    assert len(rope_calls) == 2  # the helper read changed: the function runs as written
    want = step(make(), freqs)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert str(mod.__dict__[ROPE_ATTR]) == "RoPE fused: rotate_pairs run as f8tensor.rope"
    assert [r.fqn for r in fusion_report(mod).fused("rope")] == ["<root>"]


def test_signature_cases_a_trace_would_get_wrong(rope_calls):
    """The same tensor passed twice (make_fx traces it as one input) is a signature of its own;
    lazily conjugated tables run as written; a table that would broadcast over the pairs runs as
    written; a list comes back as a list."""
    from complex_rope_forms import rotate_to_list

    run = prove_function(rotate_pairs).run
    torch.manual_seed(3)
    q = torch.randn(B, S, H, HEAD, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(B, S, H, HEAD, device=DEVICE, dtype=torch.bfloat16)
    freqs = freqs_cis()
    run(q, q, freqs)  # first: one tensor twice
    for got, want in zip(run(q, k, freqs), rotate_pairs(q, k, freqs)):
        assert within_one_ulp(got, want)
    calls = len(rope_calls)
    for got, want in zip(run(q, k, freqs.conj()), rotate_pairs(q, k, freqs.conj())):
        assert torch.equal(got, want)  # as written
    assert len(rope_calls) == calls
    one = prove_function(rotate_one).run
    x = torch.randn(B, S, H, HEAD, device=DEVICE, dtype=torch.bfloat16)
    narrow = freqs_cis()[:, :1, None].expand(S, 1, 1).contiguous()  # [S, 1, 1]: broadcasts over the pairs
    assert torch.equal(one(x, narrow), rotate_one(x, narrow)) and len(rope_calls) == calls
    listed = prove_function(rotate_to_list).run(q, k, freqs_cis()[:, None])
    assert type(listed) is list and len(listed) == 2
