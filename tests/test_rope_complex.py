"""The complex form of fuse_model_ops's RoPE fusion (f8tensor/fusion/rope_complex.py): rotary functions
that multiply adjacent pairs as complex numbers (Meta's Llama 3, torchtitan) are proven side-effect
free once, and rotations per call signature; fused, they run f8tensor.rope(interleaved=True) within
one unit in the last place of the written code, forward and backward; everything else runs as
written, with the reason. torchtitan's own model: tests/test_reference_models.py."""

import inspect
import warnings

import complex_rope_forms
import pytest
import torch
from f8utils import DEVICE
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from f8tensor import fuse_model_ops, fusion_report
from f8tensor.fusion import rope_complex, rope_proof
from f8tensor.fusion.python_versions import FusionWarning
from f8tensor.fusion.rope_proof import ROPE_ATTR, FusedRoPEModule, RotaryFunction, prove_function

from complex_rope_forms import (HEAD, KV, B, DeepSeekAttention, H, PairAttention, S, broadcast_table,
                               deepseek_v2_apply_rotary_emb, one_tensor_class, rotate_and_add, rotate_conjugate,
                               rotate_marked, rotate_one, rotate_pairs, rotate_returned_twice, rotate_scaled)


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


@pytest.fixture
def traced(monkeypatch):
    calls = []
    trace = rope_complex.trace_plan
    monkeypatch.setattr(rope_complex, "trace_plan", lambda fn, args: calls.append(1) or trace(fn, args))
    return calls


class SelectiveCheckpoint(nn.Module):
    """mod under per-op selective activation checkpointing, as torchtitan's selective_ac_option="op":
    matmul outputs saved, the rest recomputed in backward (its dispatch mode sees every op)."""

    def __init__(self, mod):
        super().__init__()
        self.mod = mod

    def forward(self, x, freqs):
        return checkpoint(self.mod, x, freqs, use_reentrant=False,
                          context_fn=lambda: create_selective_checkpoint_contexts([torch.ops.aten.mm.default]))


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


def test_each_signature_is_traced_once(traced, rope_calls):
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


def test_fused_under_selective_activation_checkpointing(rope_calls):
    """The trace runs without the caller's dispatch modes (selective checkpointing's records ops of
    its own, which made the trace look like more than rotations): fused in forward and in the
    recompute, values within one unit in the last place of the written code's, bit for bit those
    of the fused run without checkpointing, and still fused after it."""
    cls = one_tensor_class(rotate_one)
    mod = make(cls)
    fuse_model_ops(mod, rms_norm=False, swiglu=False, strict=True)
    freqs = freqs_cis()[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionWarning)
        got = step(SelectiveCheckpoint(mod), freqs)
    assert len(rope_calls) == 2  # forward and the recompute
    for g, w in zip(got, step(SelectiveCheckpoint(make(cls)), freqs)):
        assert g.dtype == w.dtype and g.shape == w.shape and within_one_ulp(g, w)
    for g, w in zip(got, step(mod, freqs)):
        assert torch.equal(g, w)
    assert len(rope_calls) == 3


@pytest.mark.parametrize("odd_first", [False, True], ids=["even_first", "odd_first"])
def test_fp32_x_at_an_odd_storage_offset_raises_as_written(odd_first, traced, rope_calls):
    """view_as_complex needs an fp32 x at an even storage offset: at an odd one the function runs
    as written (untraced, so no warning) and raises; whichever comes first, the even one fuses."""
    run = prove_function(rotate_one).run
    flat = torch.randn(B * S * H * HEAD + 1, device=DEVICE)
    even, odd = flat[:-1].view(B, S, H, HEAD), flat[1:].view(B, S, H, HEAD)
    freqs = freqs_cis()[:, None]

    def at_odd():
        for fn in (rotate_one, run):
            with pytest.raises(RuntimeError, match="storage_offset divisible by 2"):
                fn(odd, freqs)

    def at_even():
        assert within_one_ulp(run(even, freqs), rotate_one(even, freqs))

    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionWarning)
        for call in (at_odd, at_even) if odd_first else (at_even, at_odd):
            call()
    assert len(rope_calls) == 1 and len(traced) == 1


def test_a_product_laid_out_as_the_table_runs_as_written(rope_calls):
    """rotate_one multiplies with the table first: the written result takes the layout of a table
    laid out otherwise than x, which rope does not give, so it runs as written; with the table in
    x's order it fuses."""
    run = prove_function(rotate_one).run
    x = torch.randn(B, S, H, HEAD, device=DEVICE, dtype=torch.bfloat16)
    permuted = freqs_cis(H * B * S).view(H, B, S, HEAD // 2).permute(1, 2, 0, 3)  # heads outermost
    got, want = run(x, permuted), rotate_one(x, permuted)
    assert got.stride() == want.stride() != x.stride() and torch.equal(got, want) and not rope_calls
    table = permuted.contiguous()
    got, want = run(x, table), rotate_one(x, table)
    assert got.stride() == want.stride() and within_one_ulp(got, want) and len(rope_calls) == 1


def test_small_calls_are_not_traced_and_the_plans_kept_are_bounded(monkeypatch, traced, rope_calls):
    """No argument of MIN_FUSED_NUMEL elements: run as written, untraced. The last MAX_PLANS
    signatures' plans are kept, the least recently called dropped first."""
    run = prove_function(rotate_one).run
    freqs = freqs_cis()[:, None]
    x = {b: torch.randn(b, S, H, HEAD, device=DEVICE, dtype=torch.bfloat16) for b in (1, 2, 3)}
    monkeypatch.setattr(rope_proof, "MIN_FUSED_NUMEL", x[3].numel() + 1)
    assert torch.equal(run(x[3], freqs), rotate_one(x[3], freqs)) and not traced and not run.plans
    monkeypatch.setattr(rope_proof, "MIN_FUSED_NUMEL", 0)
    monkeypatch.setattr(rope_complex, "MAX_PLANS", 2)
    counts = []
    for b in (1, 2, 1, 3, 1, 2):  # 3 drops 2 (1 was called since), so 1 stays and 2 is traced again
        assert within_one_ulp(run(x[b], freqs), rotate_one(x[b], freqs))
        counts.append(len(traced))
    assert counts == [1, 2, 2, 3, 3, 4] and len(run.plans) == 2 and len(rope_calls) == 6


def test_arguments_bind_as_the_written_code_binds_them(monkeypatch, rope_calls):
    """All arguments by position: taken in order without Signature.bind; by keyword: bound; a call
    the written code refuses raises as written."""
    binds = []
    bind = inspect.Signature.bind
    monkeypatch.setattr(inspect.Signature, "bind", lambda self, *a, **k: binds.append(1) or bind(self, *a, **k))
    run = prove_function(rotate_one).run
    x = torch.randn(B, S, H, HEAD, device=DEVICE, dtype=torch.bfloat16)
    freqs = freqs_cis()[:, None]
    want = rotate_one(x, freqs)
    assert within_one_ulp(run(x, freqs), want) and not binds
    assert within_one_ulp(run(x, freqs=freqs), want) and len(binds) == 1
    with pytest.raises(TypeError, match="positional arguments"):
        run(x, freqs, freqs)
    assert len(rope_calls) == 2


def test_a_rotation_returned_twice_is_one_tensor_twice(rope_calls):
    run = prove_function(rotate_returned_twice).run
    x = torch.randn(B, S, H, HEAD, device=DEVICE, dtype=torch.bfloat16)
    freqs = freqs_cis()[:, None]
    got, want = run(x, freqs), rotate_returned_twice(x, freqs)
    assert want[0] is want[1] and got[0] is got[1] and len(rope_calls) == 1
    assert within_one_ulp(got[0], want[0])
