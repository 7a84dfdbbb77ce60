"""fuse_model_ops's RoPE fusion (f8tensor/fusion/rope_proof.py): which global functions it proves to compute
nothing but rotations x * cos + rotate_half(x) * sin of their arguments, which modules calling them
it fuses, which it leaves alone and why, and that a fused module computes what the same module
written with f8tensor.rope computes, bit for bit."""

import copy
import functools
import inspect
import pickle

import pytest
import torch
from f8utils import DEVICE, convert_and_fuse, train_step
from torch import nn

from f8tensor import FusionWarning, fuse_model_ops, fusion_report, rope
from f8tensor.fusion.rope_proof import ROPE_ATTR, FusedRoPEModule, RoPECalls, prove_function

B, H, S, HEAD = 2, 4, 16, 32


def fused(mod: nn.Module, **switches) -> nn.Module:
    """fuse_model_ops alone (no float8 layers: the rotation alone); the module."""
    fuse_model_ops(mod, **switches)
    return mod


# --- the written forms -------------------------------------------------------------------------

def rotate_half(x):  # Hugging Face's, verbatim
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # Hugging Face's (transformers 5.24), verbatim
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def apply_rope(x, cos, sin):  # benchmarks/train.py's
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def reordered(x, cos, sin):  # operands swapped, torch.chunk, torch.neg, torch.mul/torch.add
    x1, x2 = torch.chunk(x, 2, -1)
    return torch.add(torch.mul(sin, torch.cat([torch.neg(x2), x1], -1)), cos * x)


def olmo2_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # OLMo 2's (transformers 5.24), verbatim
    q_type, k_type = q.dtype, k.dtype
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed.to(q_type), k_embed.to(k_type)


def cast_back(x, cos, sin):  # one tensor, the dtype read where it is cast
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def phi3_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # Phi-3's (transformers 5.24), verbatim
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]

    q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed


def partial_one(x, cos, sin):  # one tensor, the width read from sin, torch.cat's dim by position
    r = sin.shape[-1]
    return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), -1)


def rotate_pairs(x):  # GLM's rotate_half (transformers 5.24), verbatim
    """Rotates half the hidden dims of the input."""
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def glm_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # GLM's (transformers 5.24), verbatim
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    # Interleave them instead of usual shape
    cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
    sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)

    # Keep half or full tensor for later concatenation
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]

    # Apply rotary embeddings on the first half or full tensor
    q_embed = (q_rot * cos) + (rotate_pairs(q_rot) * sin)
    k_embed = (k_rot * cos) + (rotate_pairs(k_rot) * sin)

    # Concatenate back to full shape
    q_embed = torch.cat([q_embed, q_pass], dim=-1)
    k_embed = torch.cat([k_embed, k_pass], dim=-1)
    return q_embed, k_embed


def pairs_whole(x, cos, sin):  # the pairs' form on a whole head, tables as given
    return x * cos + rotate_pairs(x) * sin


def cohere_rotate_half(x):  # Cohere's (transformers 5.24), verbatim
    # Split and rotate. Note that this function is different from e.g. Llama.
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    rot_x = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return rot_x


def cohere_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # Cohere's (transformers 5.24), verbatim
    dtype = q.dtype
    q = q.float()
    k = k.float()
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (cohere_rotate_half(q) * sin)
    k_embed = (k * cos) + (cohere_rotate_half(k) * sin)
    return q_embed.to(dtype=dtype), k_embed.to(dtype=dtype)


def ernie_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # Ernie 4.5's (transformers 5.24), verbatim
    # glm rope style (with full dim) and full precision
    original_dtype = q.dtype

    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    # Interleave them instead of usual shape
    cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
    sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)

    q_embed = (q.float() * cos) + (rotate_pairs(q).float() * sin)
    k_embed = (k.float() * cos) + (rotate_pairs(k).float() * sin)

    return q_embed.to(original_dtype), k_embed.to(original_dtype)


def gpt_oss_apply_rotary_emb(x, cos, sin):  # GPT-OSS's _apply_rotary_emb (transformers 5.24), verbatim
    first_half, second_half = torch.chunk(x, 2, dim=-1)
    first_ = first_half * cos - second_half * sin
    second_ = second_half * cos + first_half * sin
    return torch.cat((first_, second_), dim=-1)


def gpt_oss_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # GPT-OSS's (transformers 5.24), verbatim
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = gpt_oss_apply_rotary_emb(q, cos, sin)
    k_embed = gpt_oss_apply_rotary_emb(k, cos, sin)
    return q_embed, k_embed


def modernbert_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # ModernBERT's and ESM's (transformers 5.24)
    original_dtype = q.dtype
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q.float() * cos) + (rotate_half(q.float()) * sin)
    k_embed = (k.float() * cos) + (rotate_half(k.float()) * sin)
    return q_embed.to(original_dtype), k_embed.to(original_dtype)


def cast_to_the_other(q, k, cos, sin):  # each cast to the other's dtype: rope where they are one
    return (q * cos + rotate_half(q) * sin).to(k.dtype), (k * cos + rotate_half(k) * sin).to(q.dtype)


def dtype_read_twice(q, k, cos, sin):
    dtype = q.dtype
    return (q * cos + rotate_half(q) * sin).to(dtype), (k * cos + rotate_half(k) * sin).to(dtype)


PROVEN = {apply_rotary_pos_emb: 2, apply_rope: 1, reordered: 1, olmo2_apply_rotary_pos_emb: 2, cast_back: 1,
          phi3_apply_rotary_pos_emb: 2, partial_one: 1, glm_apply_rotary_pos_emb: 2, pairs_whole: 1,
          cohere_apply_rotary_pos_emb: 2, ernie_apply_rotary_pos_emb: 2, cast_to_the_other: 2, dtype_read_twice: 2,
          gpt_oss_apply_rotary_pos_emb: 2, modernbert_apply_rotary_pos_emb: 2}


# --- look-alikes, each not a rotation (or not provably one) ---------------------------------------

def swapped_halves(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x1, -x2], dim=-1) * sin


def minus(x, cos, sin):
    return x * cos - rotate_half(x) * sin


def scaled(x, cos, sin):
    return (x * cos + rotate_half(x) * sin) * 2


def thirds(x, cos, sin):
    return x * cos + torch.cat((-x[..., x.shape[-1] // 3:], x[..., : x.shape[-1] // 3]), dim=-1) * sin


def fixed_width(x, cos, sin):
    return x * cos + torch.cat((-x[..., 16:], x[..., :16]), dim=-1) * sin


def branching(x, cos, sin):
    if x.dim() == 4:
        cos = cos[None]
    return x * cos + rotate_half(x) * sin


SCALE = 1.0


def reads_a_global(x, cos, sin):
    return x * cos * SCALE + rotate_half(x) * sin


def in_place(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x.mul_(cos) + torch.cat([-x2, x1], dim=-1) * sin


def keeps_an_intermediate(x, cos, sin):
    r = rotate_half(x)
    return x * cos + r * sin, r


def x_as_table(x, cos, sin):
    return x * cos + rotate_half(x) * x


def cast_to_a_named_dtype(x, cos, sin):
    return (x * cos + rotate_half(x) * sin).to(torch.bfloat16)


def partial_front_again(x, cos, sin):  # the rotation with the front of x, not its rest
    r = cos.shape[-1]
    return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., :r]], dim=-1)


def partial_width_of_x(x, cos, sin):  # the width read off x, not the tables
    r = x.shape[-1] // 2
    return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)


def partial_width_returned(x, cos, sin):
    r = cos.shape[-1]
    return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1), r


def pairs_signs_swapped(x, cos, sin):
    return x * cos + torch.stack((x[..., 1::2], -x[..., 0::2]), dim=-1).flatten(-2) * sin


def pairs_table_thrice(x, cos, sin):  # a table repeated three times per entry: not a table of this proof
    cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(3, dim=-1)
    return x * cos + rotate_pairs(x) * sin


def half_tables_swapped(x, cos, sin):  # the second half's products by the wrong tables
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * sin + x1 * cos), dim=-1)


def upcast_one_term(x, cos, sin):  # x in fp32 in one product, not in the other
    return (x.float() * cos + rotate_half(x) * sin).to(x.dtype)


def partial_upcast(q, k, cos, sin):  # Phi-3's partial form of q.float(), k.float(): _rotate_partial keeps x's dtype
    return phi3_apply_rotary_pos_emb(q.float(), k.float(), cos, sin)


def partial_ernie_upcast(x, cos, sin):  # the fp32 terms of Ernie 4.5 inside the partial form
    r = cos.shape[-1]
    xr = x[..., :r]
    return torch.cat([xr.float() * cos + rotate_half(xr).float() * sin, x[..., r:]], dim=-1)


def cast_to_a_computed_dtype(x, cos, sin):
    return (x * cos + rotate_half(x) * sin).to((x * 2).dtype)


NOT_PROVEN = {
    swapped_halves: "returns something other than rotations", minus: "returns something other than rotations",
    scaled: "returns something other than rotations", thirds: "returns something other than rotations",
    fixed_width: "returns something other than rotations", branching: "has a branch",
    reads_a_global: "reads the global 'SCALE'", in_place: "reads .mul_",
    keeps_an_intermediate: "uses a rotation's intermediate values elsewhere",
    x_as_table: "rotates something other than an argument by tables",
    cast_to_a_named_dtype: "reads .bfloat16", upcast_one_term: "returns something other than rotations",
    half_tables_swapped: "returns something other than rotations",
    cast_to_a_computed_dtype: "casts a rotation to the dtype of something other than an argument",
    partial_front_again: "returns something other than rotations",
    partial_width_of_x: "concatenates a rotation with something other than the rest of its argument",
    partial_width_returned: "returns something other than rotations",
    partial_upcast: "rotates part of its argument in fp32",
    partial_ernie_upcast: "rotates part of its argument in fp32",
    pairs_signs_swapped: "returns something other than rotations",
    pairs_table_thrice: "rotates something other than an argument by tables"}


@pytest.mark.parametrize("fn", list(PROVEN), ids=lambda f: f.__name__)
def test_written_forms_are_proven(fn):
    proof = prove_function(fn)
    assert not isinstance(proof, str), proof
    assert proof.fn is fn and proof.rotations == PROVEN[fn]


@pytest.mark.parametrize("fn", list(NOT_PROVEN), ids=lambda f: f.__name__)
def test_look_alikes_are_not_proven_with_the_reason(fn):
    proof = prove_function(fn)
    assert isinstance(proof, str) and NOT_PROVEN[fn] in proof, proof


# --- modules that call them ---------------------------------------------------------------------

class Attention(nn.Module):
    """Calls the rotation by its global name among other code, branches included."""

    def __init__(self):
        super().__init__()
        self.wq, self.wk = nn.Linear(H * HEAD, H * HEAD, bias=False), nn.Linear(H * HEAD, H * HEAD, bias=False)

    def forward(self, x, cos, sin, scale=1.0):
        q = self.wq(x).view(B, S, H, HEAD).transpose(1, 2)
        k = self.wk(x).view(B, S, H, HEAD).transpose(1, 2)
        if cos.dim() == 3:  # Hugging Face's per-sequence tables [B, S, D]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return (q * scale) @ k.transpose(-1, -2)


class WrittenWithRope(Attention):  # the same model with the fused op in its code
    def forward(self, x, cos, sin, scale=1.0):
        q = self.wq(x).view(B, S, H, HEAD).transpose(1, 2)
        k = self.wk(x).view(B, S, H, HEAD).transpose(1, 2)
        if cos.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return (rope(q, cos, sin) * scale) @ rope(k, cos, sin).transpose(-1, -2)


def tables(per_sequence=False, dtype=torch.bfloat16):
    angles = torch.outer(torch.arange(S, dtype=torch.float32), 1.0 / 500000 ** (torch.arange(0, HEAD, 2) / HEAD))
    angles = torch.cat([angles, angles], dim=-1).to(DEVICE)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return (cos.expand(B, S, HEAD), sin.expand(B, S, HEAD)) if per_sequence else (cos, sin)


def make(cls=Attention, seed=0):
    torch.manual_seed(seed)
    return cls().to(DEVICE, torch.bfloat16)


def inputs(seed=1):
    torch.manual_seed(seed)
    return torch.randn(B, S, H * HEAD, device=DEVICE, dtype=torch.bfloat16)


@pytest.fixture(autouse=True)
def fuse_small_tensors(monkeypatch):
    """This file's tensors are far below MIN_FUSED_NUMEL: fuse them anyway (test_small_tensors_...
    sets its own threshold)."""
    import f8tensor.fusion.rope_proof as rope_proof

    monkeypatch.setattr(rope_proof, "MIN_FUSED_NUMEL", 0)


@pytest.fixture
def rope_calls(monkeypatch):
    """How many times a fused rotation ran rope (patched where rope_proof calls it)."""
    import f8tensor.fusion.rope_proof as rope_proof

    calls = []
    checked = rope_proof.rope_checked
    monkeypatch.setattr(rope_proof, "rope_checked", lambda *args: calls.append(1) or checked(*args))
    return calls


def step(mod, x, cos, sin):
    x = x.clone().requires_grad_()
    out = mod(x, cos, sin)
    out.float().square().sum().backward()
    return [out, x.grad] + [p.grad for p in mod.parameters()]


@pytest.mark.parametrize("per_sequence", [False, True], ids=["tables", "per_sequence"])
def test_fused_module_has_the_values_of_the_model_written_with_rope(per_sequence, rope_calls):
    """Output and every gradient are the bits of the same module written with f8tensor.rope; close
    to the module's own (unfused) math."""
    mod = fused(make())
    assert isinstance(mod, FusedRoPEModule) and type(mod).__name__ == "Attention"
    calls = mod.__dict__[ROPE_ATTR]
    assert isinstance(calls, RoPECalls) and calls.names == ("apply_rope", "apply_rotary_pos_emb")
    cos, sin = tables(per_sequence)
    got = step(mod, inputs(), cos, sin)
    assert len(rope_calls) == 2
    for g, w in zip(got, step(make(WrittenWithRope), inputs(), cos, sin)):
        assert torch.equal(g, w)
    for g, w in zip(got, step(make(), inputs(), cos, sin)):  # eager rounds each of its five ops
        torch.testing.assert_close(g.float(), w.float(), rtol=0.02, atol=0.02 * w.abs().max().item())


def test_the_module_keeps_its_signature_defaults_and_keywords(rope_calls):
    mod = fused(make())
    assert inspect.signature(mod.forward) == inspect.signature(make().forward)
    cos, sin = tables()
    x = inputs()
    assert torch.equal(mod(x, cos=cos, sin=sin, scale=2.0), 2 * mod(x, cos, sin))
    assert len(rope_calls) == 4
    with pytest.raises(TypeError, match="unexpected keyword argument 'bad'"):
        mod(x, cos, sin, bad=1)


def test_what_rope_would_change_runs_the_written_ops(rope_calls):
    """Tables of another dtype (eager promotes: fp32 result), tables that require grad, tables that
    broadcast x to a larger shape: the function's own ops, bit for bit."""
    mod, own = fused(make()), make()
    x = inputs()
    cos, sin = tables(dtype=torch.float32)
    assert mod(x, cos, sin).dtype == torch.float32 and torch.equal(mod(x, cos, sin), own(x, cos, sin))
    cos, sin = (t.requires_grad_() for t in tables())
    assert torch.equal(mod(x, cos, sin), own(x, cos, sin))
    cos, sin = (t.expand(3, 1, S, HEAD) for t in tables())  # broadcasts q [B, H, S, D] to [3, ...]: B = 2 errors
    with pytest.raises(RuntimeError):
        own(x, cos, sin)
    with pytest.raises(RuntimeError):
        mod(x, cos, sin)
    assert not rope_calls


class CastsBack(nn.Module):  # OLMo 2's attention, the rotation alone
    def forward(self, q, k, cos, sin):
        return olmo2_apply_rotary_pos_emb(q, k, cos, sin)


@pytest.mark.parametrize("x_dtype, table_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                   (torch.float16, torch.float32), (torch.float32, torch.float32),
                                                   (torch.float32, torch.bfloat16)], ids=str)
def test_a_rotation_cast_back_to_x_dtype_runs_rope(x_dtype, table_dtype, rope_calls):
    """rotation.to(x.dtype) (OLMo 2's form, fp32 tables for bf16 q and k): rope, for tables that
    promote x's dtype too, since the written code then rounds its fp32 result once, as rope does.
    On CPU: the written output bit for bit where the tables promote x's dtype or x is fp32 (and the
    gradients too for fp32 x); elsewhere eager's per-op roundings' distance."""
    mod, own = fused(CastsBack()), CastsBack()
    assert isinstance(mod.__dict__[ROPE_ATTR], RoPECalls)
    torch.manual_seed(1)
    q, k = (torch.randn(B, H, S, HEAD, device=DEVICE, dtype=x_dtype) for _ in range(2))
    cos, sin = tables(per_sequence=True, dtype=table_dtype)  # [B, S, HEAD], as Hugging Face's models pass them
    g = [torch.randn_like(q), torch.randn_like(k)]
    got, want = (step_pair(m, q, k, cos, sin, g) for m in (mod, own))
    assert len(rope_calls) == 2 and all(t.dtype == x_dtype for t in got)
    exact_out = DEVICE.type == "cpu" and (x_dtype == torch.float32 or torch.promote_types(x_dtype, table_dtype) != x_dtype)
    exact_grad = DEVICE.type == "cpu" and x_dtype == torch.float32
    for i, (a, b) in enumerate(zip(got, want)):
        if exact_grad or exact_out and i < 2:
            assert torch.equal(a, b), i
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * b.abs().max().item())


def test_a_partial_rotation_takes_its_width_from_the_table_it_reads():
    """partial_one reads R off sin: with a cos of one entry (broadcast over the R dims) the rewritten
    function still rotates the first R dims, as written (the written ops there, bit for bit)."""
    proof = prove_function(partial_one)
    x = torch.randn(2, S, HEAD, device=DEVICE, dtype=torch.bfloat16)
    cos, sin = tables()
    cos1, sin = cos[:, :1], sin[:, : HEAD // 2]
    assert torch.equal(proof.run(x, cos1, sin), partial_one(x, cos1, sin))


class PartialRotary(nn.Module):  # Phi-3's attention, the rotation alone
    def forward(self, q, k, cos, sin):
        return phi3_apply_rotary_pos_emb(q, k, cos, sin)


class PairsRotary(nn.Module):  # GLM's
    def forward(self, q, k, cos, sin):
        return glm_apply_rotary_pos_emb(q, k, cos, sin)


class PartialWrittenWithRope(nn.Module):  # the same with the fused op in its code
    interleaved = False

    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.interleaved:  # GLM's tables: the first half's entries, each twice in a row
            cos, sin = (t[..., : t.shape[-1] // 2].repeat_interleave(2, dim=-1) for t in (cos, sin))
        r = cos.shape[-1]
        return tuple(torch.cat([rope(t[..., :r], cos, sin, self.interleaved), t[..., r:]], dim=-1).contiguous()
                     for t in (q, k))


class PairsWrittenWithRope(PartialWrittenWithRope):
    interleaved = True


@pytest.mark.parametrize("cls, written", [(PartialRotary, PartialWrittenWithRope), (PairsRotary, PairsWrittenWithRope)],
                         ids=["phi3", "glm"])
@pytest.mark.parametrize("width", [HEAD, HEAD // 2], ids=["whole", "half"])
def test_a_partial_rotation_runs_rope_on_its_part(cls, written, width, rope_calls):
    """Phi-3's cat([rotation of x[..., :R], x[..., R:]], dim=-1), R the tables' width, and GLM's, whose
    rotation is the adjacent pairs' form by tables repeated per pair: rope (interleaved for GLM's)
    on the first R dims (the whole of x, no concatenation, where R is its last dim), the output
    contiguous as the concatenation's; the bits of the same module written with rope, and within
    eager's per-op roundings of the written code."""
    mod, own = fused(cls()), cls()
    assert isinstance(mod.__dict__[ROPE_ATTR], RoPECalls)
    torch.manual_seed(1)
    q, k = (torch.randn(B, S, H, HEAD, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    cos, sin = (t[..., :width] for t in tables(per_sequence=True))
    if width < HEAD:  # the tables of a width-R rotation: each frequency over both of its halves
        cos, sin = (torch.cat([t[..., : width // 2]] * 2, dim=-1) for t in (cos, sin))
    g = [torch.randn(B, H, S, HEAD, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)]
    got = step_pair(mod, q, k, cos, sin, g)
    assert len(rope_calls) == 2 and all(t.is_contiguous() for t in got[:2])
    for a, b in zip(got, step_pair(written(), q, k, cos, sin, g)):
        assert torch.equal(a, b)
    for a, b in zip(got, step_pair(own, q, k, cos, sin, g)):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * b.abs().max().item())


class CohereRotary(nn.Module):  # the rotations alone
    def forward(self, q, k, cos, sin):
        return cohere_apply_rotary_pos_emb(q, k, cos, sin)


class ErnieRotary(nn.Module):
    def forward(self, q, k, cos, sin):
        return ernie_apply_rotary_pos_emb(q, k, cos, sin)


class GptOssRotary(nn.Module):
    def forward(self, q, k, cos, sin):
        return gpt_oss_apply_rotary_pos_emb(q, k, cos, sin)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_rotation_by_half_width_tables_runs_rope_on_the_tables_repeated(table_dtype, rope_calls):
    """GPT-OSS's cat((x1 * c - x2 * s, x2 * c + x1 * s)) by tables of half the head: rope with each table
    repeated over both halves, its output contiguous as the concatenation's (bf16 tables; fp32 ones
    promote the written result to fp32: the written ops, bit for bit); close to the written code."""
    mod, own = fused(GptOssRotary()), GptOssRotary()
    torch.manual_seed(1)
    q, k = (torch.randn(B, S, H, HEAD, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    cos, sin = (t[..., : HEAD // 2].to(table_dtype) for t in tables(per_sequence=True))
    out_dtype = torch.promote_types(torch.bfloat16, table_dtype)
    g = [torch.randn(B, H, S, HEAD, device=DEVICE, dtype=out_dtype) for _ in range(2)]
    got, want = (step_pair(m, q, k, cos, sin, g) for m in (mod, own))
    assert len(rope_calls) == (2 if table_dtype == torch.bfloat16 else 0)
    if table_dtype == torch.bfloat16:  # the bits of the module written with rope on the repeated tables
        c2, s2 = (torch.cat([t, t], dim=-1).unsqueeze(1) for t in (cos, sin))
        assert all(torch.equal(a, rope(x, c2, s2).contiguous()) for a, x in zip(got, (q, k)))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        if table_dtype == torch.float32:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * b.abs().max().item())


class CastToTheOther(nn.Module):
    def forward(self, q, k, cos, sin):
        return cast_to_the_other(q, k, cos, sin)


@pytest.mark.parametrize("cls", [CohereRotary, ErnieRotary], ids=["cohere", "ernie"])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotations_upcast_to_fp32_and_cast_back_run_rope(cls, table_dtype, rope_calls):
    """Cohere's (q.float() rotated) and Ernie 4.5's (q.float() * cos + rotate_half(q).float() * sin),
    cast back to q's dtype read once for q and k: rope (the adjacent pairs' form), whose fp32 math and
    one rounding are the written code's: on CPU the outputs bit for bit, the gradients within eager's
    roundings."""
    mod, own = fused(cls()), cls()
    assert isinstance(mod.__dict__[ROPE_ATTR], RoPECalls)
    torch.manual_seed(1)
    q, k = (torch.randn(B, S, H, HEAD, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    cos, sin = tables(per_sequence=True, dtype=table_dtype)
    g = [torch.randn(B, H, S, HEAD, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)]
    got, want = (step_pair(m, q, k, cos, sin, g) for m in (mod, own))
    assert len(rope_calls) == 2 and all(t.dtype == torch.bfloat16 for t in got)
    for i, (a, b) in enumerate(zip(got, want)):
        if i < 2 and DEVICE.type == "cpu":
            assert torch.equal(a, b), i
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * b.abs().max().item())


def test_a_rotation_cast_to_another_arguments_dtype_runs_rope_only_where_that_is_its_own(rope_calls):
    """cast_to_the_other: q cast to k's dtype, k to q's. One dtype: rope (2 calls); q bf16 and k fp16:
    the written ops, bit for bit."""
    mod, own = fused(CastToTheOther()), CastToTheOther()
    torch.manual_seed(1)
    q, k = (torch.randn(B, H, S, HEAD, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    cos, sin = tables(per_sequence=False)
    mod(q, k, cos, sin)
    assert len(rope_calls) == 2
    k16 = k.half()
    got, want = mod(q, k16, cos, sin), own(q, k16, cos, sin)
    assert len(rope_calls) == 2 and [t.dtype for t in got] == [torch.float16, torch.bfloat16]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def step_pair(mod, q, k, cos, sin, g):
    """(q out, k out, q grad, k grad) of a module rotating q and k."""
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    out = mod(q, k, cos, sin)
    torch.autograd.backward(out, g)
    return [*out, q.grad, k.grad]


def test_rebinding_after_conversion_is_followed(monkeypatch, rope_calls):
    """The module's global rebound, the function's code replaced, the class forward rebound: each
    runs what the user's code now says."""
    mod = fused(make())
    x, (cos, sin) = inputs(), tables()
    seen, original = [], apply_rope
    globals()["apply_rope"] = lambda t, c, s: seen.append(1) or t
    try:
        mod(x, cos, sin)
    finally:
        globals()["apply_rope"] = original
    assert len(seen) == 2 and not rope_calls
    mod(x, cos, sin)
    assert len(rope_calls) == 2

    rope_calls.clear()
    code = apply_rope.__code__
    apply_rope.__code__ = swapped_halves.__code__
    try:
        assert torch.equal(mod(x, cos, sin), Attention.forward(mod, x, cos, sin)) and not rope_calls
    finally:
        apply_rope.__code__ = code

    monkeypatch.setattr(Attention, "forward", WrittenWithRope.forward)
    assert torch.equal(mod(x, cos, sin), WrittenWithRope.forward(mod, x, cos, sin)) and not rope_calls


class WritesGlobals(Attention):
    def forward(self, x, cos, sin, scale=1.0):
        global SCALE
        SCALE = scale
        return apply_rope(self.wq(x).view(B, S, H, HEAD), cos, sin)


class ReadsGlobals(Attention):
    def forward(self, x, cos, sin, scale=1.0):
        scale = globals().get("SCALE", scale)
        return apply_rope(self.wq(x).view(B, S, H, HEAD), cos, sin) * scale


class Meta(type):
    pass


class WithMetaclass(Attention, metaclass=Meta):
    pass


class NoRope(Attention):
    def forward(self, x, cos, sin, scale=1.0):
        return rotate_half(self.wq(x))  # reads only a function that is not a rotation


class ComparesTheFunction(Attention):
    def __init__(self):
        super().__init__()
        self.rotate = apply_rope

    def forward(self, x, cos, sin, scale=1.0):
        q = self.wq(x).view(B, S, H, HEAD).transpose(1, 2)
        return apply_rope(q, cos, sin) if self.rotate is apply_rope else q


@pytest.mark.parametrize("cls,reason", [
    (ComparesTheFunction, "forward compares apply_rope (it would see the fused callable, not the function)"),
    (WritesGlobals, "forward writes or reads its globals as a mapping (STORE_GLOBAL SCALE)"),
    (ReadsGlobals, "forward writes or reads its globals as a mapping (LOAD_GLOBAL globals)"),
    (WithMetaclass, "its class has the metaclass Meta")], ids=lambda c: getattr(c, "__name__", ""))
def test_modules_not_fused_are_left_alone_with_the_reason(cls, reason):
    mod = fused(make(cls))
    assert type(mod) is cls and mod.__dict__[ROPE_ATTR] == reason
    assert f"RoPE not fused: {reason}" in str(fusion_report(mod))


def test_modules_that_call_no_rotation_are_not_examined():
    mod = fused(nn.Sequential(make(NoRope)))
    assert type(mod[0]) is NoRope and ROPE_ATTR not in mod[0].__dict__ and "RoPE" not in str(fusion_report(mod))


def deprecate_kwarg(fn):  # as transformers' decorators wrap forwards: functools.wraps, fn in a closure cell
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        kwargs.pop("old_name", None)
        return fn(*args, **kwargs)
    return wrapped


class Decorated(Attention):
    @deprecate_kwarg
    def forward(self, x, cos, sin, scale=1.0):  # Attention's code, decorated
        q = self.wq(x).view(B, S, H, HEAD).transpose(1, 2)
        k = self.wk(x).view(B, S, H, HEAD).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return (q * scale) @ k.transpose(-1, -2)


def test_a_decorated_forward_is_fused_through_its_wrapper(rope_calls):
    mod = fused(make(Decorated))
    assert isinstance(mod, FusedRoPEModule)
    x, (cos, sin) = inputs(), tables()
    assert torch.equal(mod(x, cos, sin, old_name=1), make(WrittenWithRope)(x, cos, sin))
    assert len(rope_calls) == 2


def test_copies_pickles_and_state_dict(rope_calls):
    model = nn.Sequential(make())
    fused(model)
    keys = list(make().state_dict())
    x, (cos, sin) = inputs(), tables()
    want = model[0](x, cos, sin)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), copy.copy(model)):
        assert type(twin[0]) is type(model[0]) and isinstance(twin[0].__dict__[ROPE_ATTR], RoPECalls)
        assert torch.equal(twin[0](x, cos, sin), want) and list(twin[0].state_dict()) == keys
    assert len(rope_calls) == 2 * 4
    summary = str(fusion_report(model))
    fused(model)  # twice: a no-op
    assert str(fusion_report(model)) == summary and "0.attention" not in summary
    assert "RoPE fused: apply_rope, apply_rotary_pos_emb run as f8tensor.rope" in summary


def test_opting_out_leaves_every_module_alone():
    mod = fused(make(), rope=False)
    assert type(mod) is Attention and ROPE_ATTR not in mod.__dict__


def test_checkpointing_fx_tracing_and_compile(rope_calls):
    """Activation checkpointing recomputes the fused path (same gradients); fx symbolic tracing of
    a parent and torch.compile see the module's own code."""
    from torch.utils.checkpoint import checkpoint

    mod = fused(make())
    x, (cos, sin) = inputs(), tables()
    want = step(mod, x, cos, sin)
    assert len(rope_calls) == 2  # q and k
    mod.zero_grad()
    x2 = x.clone().requires_grad_()
    out = checkpoint(mod, x2, cos, sin, use_reentrant=False)
    out.float().square().sum().backward()
    assert len(rope_calls) == 6  # the checkpointed forward and its recomputation fused too
    for g, w in zip([out, x2.grad] + [p.grad for p in mod.parameters()], want, strict=True):
        assert torch.equal(g, w)

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = mod

        def forward(self, x):
            return self.attention(x, cos, sin)

    traced = torch.fx.symbolic_trace(Parent())
    assert any(n.target is torch.cat for n in traced.graph.nodes)
    torch.testing.assert_close(traced(x), make()(x, cos, sin))
    compiled = torch.compile(mod)
    torch.testing.assert_close(compiled(x, cos, sin).float(), mod(x, cos, sin).float(), rtol=0.02, atol=0.05)


def test_float8_model_trains_with_the_fusion():
    """With float8 layers: the fused module and the model written with rope agree bit for bit
    through a training step."""
    cos, sin = tables()

    class WithTables(nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.attention = make(cls)

        def forward(self, x):
            return self.attention(x, cos, sin)

    rotated = convert_and_fuse(WithTables(Attention))
    written = convert_and_fuse(WithTables(WrittenWithRope))
    x = inputs()
    for g, w in zip(train_step(rotated, x), train_step(written, x)):
        assert torch.equal(g, w)


# --- review findings (each a way the fused module could have run other code than the written one)

def rotate_half_along(x, dim=-1):
    x1, x2 = x.chunk(2, dim=dim)
    return torch.cat((-x2, x1), dim=dim)


def with_helper_default(x, cos, sin):
    return x * cos + rotate_half_along(x) * sin


class CallsHelperDefault(nn.Module):
    def forward(self, x, cos, sin):
        return with_helper_default(x, cos, sin)


class CallsPair(nn.Module):
    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)


def test_defaults_rebound_after_conversion_run_the_written_function(rope_calls):
    """The function's or a helper's defaults changed: the function as written now runs (the
    rewritten graph holds the defaults it was proven with)."""
    q, k = (torch.randn(B, H, S, HEAD, device=DEVICE) for _ in range(2))
    cos, sin = (t.expand(B, S, HEAD).float() for t in tables())
    mod = fused(CallsPair())
    assert isinstance(mod, FusedRoPEModule)
    defaults = apply_rotary_pos_emb.__defaults__
    apply_rotary_pos_emb.__defaults__ = (2,)  # tables [B, S, 1, D]: q, k as [B, S, H, D]
    try:
        qs, ks = q.transpose(1, 2), k.transpose(1, 2)
        assert all(torch.equal(g, w) for g, w in zip(mod(qs, ks, cos, sin), CallsPair.forward(mod, qs, ks, cos, sin)))
        assert not rope_calls
    finally:
        apply_rotary_pos_emb.__defaults__ = defaults
    mod(q, k, cos, sin)
    assert len(rope_calls) == 2

    rope_calls.clear()
    helper = fused(CallsHelperDefault())
    assert isinstance(helper, FusedRoPEModule)
    x, (cos, sin) = torch.randn(B, H, S, HEAD, device=DEVICE), (t.float() for t in tables())
    helper(x, cos, sin)
    assert len(rope_calls) == 1
    rotate_half_along.__defaults__ = (-2,)
    try:
        assert torch.equal(helper(x, cos, sin), CallsHelperDefault.forward(helper, x, cos, sin)) and len(rope_calls) == 1
        # converted again: proven again, with the new default (a rotation along dim -2 is not one)
        assert isinstance(prove_function(with_helper_default), str)
    finally:
        rotate_half_along.__defaults__ = (-1,)


def test_a_decorated_forwards_inner_function_rebound_is_followed(rope_calls):
    mod = fused(make(Decorated))
    x, (cos, sin) = inputs(), tables()
    inner = Decorated.forward.__wrapped__
    defaults = inner.__defaults__
    inner.__defaults__ = (10.0,)
    try:
        assert torch.equal(mod(x, cos, sin), make(Attention)(x, cos, sin, 10.0)) and not rope_calls
    finally:
        inner.__defaults__ = defaults
    code = inner.__code__
    inner.__code__ = WrittenWithRope.forward.__code__
    try:
        assert torch.equal(mod(x, cos, sin), make(WrittenWithRope)(x, cos, sin)) and not rope_calls
    finally:
        inner.__code__ = code
    mod(x, cos, sin)
    assert len(rope_calls) == 2


class CallsApplyRope(nn.Module):
    def forward(self, x, cos, sin):
        try:
            fn = apply_rope
        except NameError:
            fn = None
        return fn(x, cos, sin) if fn is not None else x


def test_zero_dim_tables_and_a_deleted_global_behave_as_unfused(rope_calls):
    mod = fused(CallsApplyRope())
    assert isinstance(mod, FusedRoPEModule)
    x = torch.randn(2, 3, 8, device=DEVICE)
    cos, sin = torch.tensor(0.6, device=DEVICE), torch.tensor(0.8, device=DEVICE)
    assert torch.equal(mod(x, cos, sin), CallsApplyRope.forward(mod, x, cos, sin)) and not rope_calls
    original = globals().pop("apply_rope")
    try:
        assert mod(x, cos, sin) is x
    finally:
        globals()["apply_rope"] = original


def rope_of_self(self, cos, sin):
    x1, x2 = self.chunk(2, dim=-1)
    return self * cos + torch.cat([-x2, x1], dim=-1) * sin


def float_dim(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1.0)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def named_like_builtins(input, cos, sin):
    x1, x2 = input.chunk(2, dim=-1)
    return input * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_arguments_and_constants_the_rewrite_would_change_are_not_proven():
    assert prove_function(rope_of_self) == "rope_of_self has an argument named self"
    assert "returns something other than rotations" in prove_function(float_dim)
    proof = prove_function(named_like_builtins)  # proven only if fx keeps the argument names
    assert isinstance(proof, str) or inspect.signature(proof.run) == inspect.signature(named_like_builtins)


class DefinesAClass(Attention):
    def forward(self, x, cos, sin, scale=1.0):
        class Config:
            factor = SCALE
        return apply_rope(self.wq(x).view(B, S, H, HEAD).transpose(1, 2), cos, sin) * Config.factor


class UsesProve(Attention):  # a method named like the mixins' members before they were prefixed
    def prove(self, t):
        return t + 1

    def forward(self, x, cos, sin, scale=1.0):
        return self.prove(apply_rope(self.wq(x).view(B, S, H, HEAD).transpose(1, 2), cos, sin))


def test_class_bodies_refused_and_user_members_not_hidden(rope_calls):
    mod = fused(make(DefinesAClass))
    assert type(mod) is DefinesAClass and mod.__dict__[ROPE_ATTR] == "forward defines a class"
    mod = fused(make(UsesProve))
    assert isinstance(mod, FusedRoPEModule)
    x, (cos, sin) = inputs(), tables()
    assert torch.equal(mod(x, cos, sin), 1 + rope(mod.wq(x).view(B, S, H, HEAD).transpose(1, 2), cos, sin))
    assert len(rope_calls) == 1


def test_torchscript_and_jit_trace_see_the_module_as_its_own_class():
    mod = fused(make())
    x, (cos, sin) = inputs(), tables()
    traced = torch.jit.trace(mod, (x, cos, sin))
    assert torch.equal(traced(x, cos, sin), Attention.forward(mod, x, cos, sin))
    scriptable = fused(CallsApplyRopeOnly())
    assert isinstance(scriptable, FusedRoPEModule)
    with pytest.warns(FusionWarning, match="scripted as its own class"):
        scripted = torch.jit.script(scriptable)
    x = x.view(B, S, H, HEAD).transpose(1, 2)
    assert torch.equal(scripted(x, cos, sin), apply_rope(x, cos, sin))
    assert isinstance(mod, FusedRoPEModule) and isinstance(scriptable, FusedRoPEModule)  # both unchanged
    # a fused child: TorchScript puts the unfused copy in the parent; said, and a deepcopy keeps the model fused
    model = HoldsARotation()
    with pytest.warns(FusionWarning, match=r"Script copy.deepcopy\(model\)"):
        torch.jit.script(copy.deepcopy(model))
    assert isinstance(model.inner, FusedRoPEModule)


class HoldsARotation(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = fused(CallsApplyRopeOnly())

    def forward(self, x, cos, sin):
        return self.inner(x, cos, sin)


class CallsApplyRopeOnly(nn.Module):
    def forward(self, x, cos, sin):
        return apply_rope(x, cos, sin)


def test_copies_keep_a_subclass_made_after_conversion():
    mod = fused(make())

    class Marker:
        pass

    mod.__class__ = type("FSDPAttention", (Marker, type(mod)), {})  # as fully_shard does
    twin = copy.deepcopy(mod)
    assert type(twin) is type(mod) and isinstance(twin.__dict__[ROPE_ATTR], RoPECalls)


def test_small_tensors_and_other_layouts_run_the_written_ops(monkeypatch, rope_calls):
    """Below MIN_FUSED_NUMEL elements of x (decoding: host-bound, where rope's launch costs more
    than eager's kernels) and for an x whose last dim is strided (rope would return another
    layout), the written ops run: eager's values and strides."""
    import f8tensor.fusion.rope_proof as rope_proof

    mod = fused(CallsApplyRopeOnly())
    cos, sin = tables()
    x = torch.randn(B, H, S, HEAD, device=DEVICE, dtype=torch.bfloat16)
    monkeypatch.setattr(rope_proof, "MIN_FUSED_NUMEL", x.numel() + 1)
    assert torch.equal(mod(x, cos, sin), apply_rope(x, cos, sin)) and not rope_calls
    monkeypatch.setattr(rope_proof, "MIN_FUSED_NUMEL", x.numel())
    mod(x, cos, sin)
    assert len(rope_calls) == 1
    strided = torch.randn(B, H, HEAD, S, device=DEVICE, dtype=torch.bfloat16).transpose(-1, -2)
    got, want = mod(strided, cos, sin), apply_rope(strided, cos, sin)
    assert torch.equal(got, want) and got.stride() == want.stride() and len(rope_calls) == 1
    assert rope_proof.MIN_FUSED_NUMEL == x.numel()
    monkeypatch.undo()
    assert rope_proof.MIN_FUSED_NUMEL == 1 << 20  # the default (a 2 x 8 x 4096 x 128 k is 8 M elements)


def passes_on(fn, *args):
    assert fn.__code__.co_argcount == 3 and fn.__name__ == "apply_rope"
    return fn(*args)


class PassesTheFunction(nn.Module):
    def forward(self, x, cos, sin):
        self.kept = apply_rope  # kept on the module: pickles as the function
        return passes_on(apply_rope, x, cos, sin)


def test_the_name_stands_in_for_the_function_beyond_calls(rope_calls):
    mod = fused(PassesTheFunction())
    assert isinstance(mod, FusedRoPEModule)
    x, (cos, sin) = torch.randn(B, H, S, HEAD, device=DEVICE, dtype=torch.bfloat16), tables()
    assert torch.equal(mod(x, cos, sin), rope(x, cos, sin)) and len(rope_calls) == 1
    assert mod.kept is not apply_rope and mod.kept.__name__ == "apply_rope"
    twin = pickle.loads(pickle.dumps(mod))
    assert twin.kept is apply_rope and isinstance(twin, FusedRoPEModule)


def test_a_sum_written_rotated_half_first_has_eagers_layout(rope_calls):
    """reordered (rotate_half(x) * sin + cos * x): eager's sum takes its first term's layout, a
    contiguous one, where x is a transposed view; the fused rotation gives the same, and x's own
    layout where the terms are in Hugging Face's order."""
    torch.manual_seed(1)
    x = torch.randn(B, S, H, HEAD, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = tables()
    for fn in (reordered, apply_rope):
        got, want = prove_function(fn).run(x, cos, sin), fn(x, cos, sin)
        assert got.stride() == want.stride() and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02 * want.abs().max().item())
    assert len(rope_calls) == 2
    assert reordered(x, cos, sin).is_contiguous() and not apply_rope(x, cos, sin).is_contiguous()


def test_a_whole_width_partial_rotation_by_tables_that_broadcast_x_raises_as_written(rope_calls):
    """Phi-3's partial form with R the whole head: the concatenation drops out where the tables keep
    x's shape (rope, contiguous); where they broadcast x to a larger shape the written cat raises,
    and so does the fused function."""
    torch.manual_seed(1)
    q, k = (torch.randn(1, H, S, HEAD, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    cos, sin = tables(per_sequence=True)  # [B, S, HEAD], B = 2: q and k [1, ...] broadcast to [2, ...]
    run = prove_function(phi3_apply_rotary_pos_emb).run
    for fn in (phi3_apply_rotary_pos_emb, run):
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            fn(q, k, cos, sin)
    assert rope_calls == []
    q, k = (t.expand(B, -1, -1, -1).contiguous() for t in (q, k))
    got, want = run(q, k, cos, sin), phi3_apply_rotary_pos_emb(q, k, cos, sin)
    assert len(rope_calls) == 2 and all(a.shape == b.shape and a.is_contiguous() for a, b in zip(got, want))


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_casts_of_the_argument_to_fp32_run_rope(table_dtype, rope_calls):
    """ModernBERT's and ESM's q.float() * cos + rotate_half(q.float()) * sin, cast to q's dtype: Cohere's
    rotation in fp32 written with two casts; rope, whose fp32 math and one rounding are the written
    code's (on CPU bit for bit)."""
    torch.manual_seed(1)
    q, k = (torch.randn(B, S, H, HEAD, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    cos, sin = tables(per_sequence=True, dtype=table_dtype)
    got = prove_function(modernbert_apply_rotary_pos_emb).run(q, k, cos, sin)
    want = modernbert_apply_rotary_pos_emb(q, k, cos, sin)
    assert len(rope_calls) == 2
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.bfloat16 and a.stride() == b.stride()
        if DEVICE.type == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * b.abs().max().item())
