"""f8tensor.rope: the fused kernel against its reference (forward and backward, every leading
layout, broadcast tables), the layout of what it returns, and the autograd wrapper's edges.

The kernel runs on the GPU, or in the interpreter on CPU. The interpreter truncates fp32 to
bf16/fp16 instead of rounding, and the GPU may fuse a product and a sum (one rounding fewer), so
values are checked to within one unit in the last place of the reference plus 2^-22 of the terms'
magnitude; on the GPU at most 0.1 % of bf16/fp16 elements may differ at all. On CPU `rope` itself
runs the reference: the tests of the public function there test its wrapper.
"""

import pytest
import torch
from f8utils import DEVICE, HP_DTYPES

from f8tensor import rope
from f8tensor.kernels import rope_backward_ref, rope_ref, rope_triton
from f8tensor.kernels.naive import _pairs as pairs
from f8tensor.kernels.naive import _unpair as unpair

ON_GPU = DEVICE.type == "cuda"
needs_triton = pytest.mark.skipif(rope_triton is None, reason="needs triton")


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def eager_rope(x, cos, sin):
    """Hugging Face's Llama apply_rotary_pos_emb, for one tensor."""
    return x * cos + rotate_half(x) * sin


def complex_rope(x, cos, sin):
    """torchtitan's apply_rotary_emb, for one tensor, given interleaved tables (freqs_cis is
    cos[..., 0::2] + i sin[..., 0::2])."""
    freqs_cis = torch.complex(cos[..., 0::2].float(), sin[..., 0::2].float())
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(-2).type_as(x)


def tables(seq, dim, dtype=torch.float32, theta=10000.0, interleaved=False):
    """cos, sin [seq, dim]: each frequency over both halves, or twice in a row (interleaved)."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), freqs)
    angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)
    return angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)


def randn(shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype)


def assert_close_to_reference(out, ref, terms):
    """|out - ref| <= one unit in the last place of ref + 2^-22 * terms (the magnitude of the
    products summed, where cancellation leaves fp32 rounding of the terms to decide)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    o, r = out.double(), ref.double()
    ulp = torch.nextafter(ref.abs(), torch.full_like(ref, float("inf"))).double() - r.abs()
    bad = (o - r).abs() > ulp + 2**-22 * terms
    assert not bad.any(), f"{int(bad.sum())} of {out.numel()} beyond tolerance, e.g. {o[bad][:3]} vs {r[bad][:3]}"
    if ON_GPU and out.dtype != torch.float32:
        differ = int((o != r).sum())
        assert differ <= max(1, out.numel() // 1000), f"{differ} of {out.numel()} differ"


def terms(x, cos, sin, backward=False, interleaved=False):
    """The magnitudes summed for each output: |x1 c1| + |x2 s1|, |x2 c2| + |x1 s2| (backward:
    |g1 c1| + |g2 s2|, |g2 c2| + |g1 s1|)."""
    (x1, x2), (c1, c2), (s1, s2) = (pairs(t.double().abs().broadcast_to(x.shape), interleaved)
                                    for t in (x, cos, sin))
    if backward:
        return unpair(x1 * c1 + x2 * s2, x2 * c2 + x1 * s1, interleaved)
    return unpair(x1 * c1 + x2 * s1, x2 * c2 + x1 * s2, interleaved)


def test_reference_is_the_rotation_and_its_derivative():
    """rope_ref is eager's formula (in float64, where rounding does not intervene), and
    rope_backward_ref is autograd's derivative of it."""
    x, g = randn((2, 3, 16, 8), torch.float64), randn((2, 3, 16, 8), torch.float64, seed=1)
    cos, sin = tables(16, 8, torch.float64)
    x.requires_grad_()
    want = eager_rope(x, cos, sin)
    (want_grad,) = torch.autograd.grad(want, (x,), g)
    x32, g32, c32, s32 = x.detach().float(), g.float(), cos.float(), sin.float()
    torch.testing.assert_close(rope_ref(x32, c32, s32).double(), want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rope_backward_ref(g32, c32, s32).double(), want_grad, rtol=1e-6, atol=1e-6)
    # A rotation: lengths of each (x_i, x_{i + D/2}) pair are kept.
    out = rope_ref(x32, c32, s32)
    pair_norm = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(out), pair_norm(x32), rtol=1e-5, atol=1e-6)


def test_interleaved_reference_is_the_complex_multiply_and_a_permuted_rotate_half():
    """interleaved=True is Meta's / torchtitan's x * freqs_cis on adjacent pairs as complex numbers,
    with cos, sin = freqs_cis.real, .imag each repeated twice; and it is the rotate_half form on the
    head dims permuted evens-then-odds."""
    x, g = randn((2, 8, 3, 16), torch.float64), randn((2, 8, 3, 16), torch.float64, seed=1)
    angles = torch.rand(8, 8, dtype=torch.float64, device=DEVICE) * 6
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # [S, 1, D/2]: every head alike
    want = torch.view_as_real(torch.view_as_complex(x.reshape(2, 8, 3, 8, 2)) * freqs_cis).flatten(3)
    cos, sin = (t.repeat_interleave(2, dim=-1) for t in (freqs_cis.real, freqs_cis.imag))
    torch.testing.assert_close(rope_ref(x.float(), cos.float(), sin.float(), True).double(), want,
                               rtol=1e-6, atol=1e-6)
    perm = torch.cat([torch.arange(0, 16, 2), torch.arange(1, 16, 2)])
    for f in (rope_ref, rope_backward_ref):
        torch.testing.assert_close(f(g, cos, sin, True)[..., perm], f(g[..., perm], cos[..., perm], sin[..., perm]))


# (x's shape, how it is laid out, the tables' shape and dtype): [B, H, S, D] views of [B, S, H, D]
# memory as Hugging Face's Llama makes them, contiguous [B, S, H, D] with [S, 1, D] tables
# (torchtitan's layout), per-sequence tables [B, 1, S, D], 3-D and 2-D x, a head_dim that is not a
# power of two; fp32 and bf16 tables.
CASES = [
    ((2, 4, 33, 16), "transposed", (33, 16), torch.bfloat16),
    ((2, 33, 4, 16), "contiguous", (33, 1, 16), torch.float32),
    ((2, 4, 33, 16), "contiguous", (2, 1, 33, 16), torch.bfloat16),
    ((5, 33, 96), "contiguous", (33, 96), torch.float32),
    ((33, 64), "contiguous", (33, 64), torch.bfloat16),
    ((3, 2, 7, 6), "transposed", (7, 6), torch.float32),
]
if ON_GPU:
    CASES += [((2, 32, 4096, 128), "transposed", (4096, 128), torch.bfloat16),
              ((2, 8, 4096, 128), "transposed", (4096, 128), torch.float32),
              ((2, 4096, 32, 128), "contiguous", (4096, 1, 128), torch.float32)]


def make_x(shape, layout, dtype, seed=0):
    if layout == "transposed":  # [B, H, S, D] view of [B, S, H, D] memory
        B, H, S, D = shape
        return randn((B, S, H, D), dtype, seed).transpose(1, 2)
    return randn(shape, dtype, seed)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{str(c[3])[6:]}")
@pytest.mark.parametrize("dtype", HP_DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("blocks", [dict(block_elements=64, num_warps=1), {}], ids=["small_blocks", "default"])
def test_kernel_matches_the_reference_in_place_and_in_layout(case, dtype, interleaved, blocks):
    shape, layout, table_shape, table_dtype = case
    x, g = make_x(shape, layout, dtype), make_x(shape, layout, dtype, seed=1)
    cos, sin = (randn(table_shape, table_dtype, seed=s) for s in (2, 3))  # any values: not only rotations
    out = rope_triton(x, cos, sin, interleaved=interleaved, **blocks)
    assert out.stride() == x.stride()  # x's layout, read and written in place
    assert_close_to_reference(out, rope_ref(x, cos, sin, interleaved), terms(x, cos, sin, False, interleaved))
    grad = rope_triton(g, cos, sin, backward=True, out_strides=x.stride(), interleaved=interleaved, **blocks)
    assert grad.stride() == x.stride()
    assert_close_to_reference(grad, rope_backward_ref(g, cos, sin, interleaved),
                              terms(g, cos, sin, True, interleaved))


@needs_triton
def test_kernel_cases_are_kept_apart():
    """On the GPU later calls of a case go through the recorded launcher (kernels/launch.py):
    alternating shapes, layouts and directions must each still get their own binary and ints."""
    cos, sin = tables(40, 16)
    for shape, layout, backward, inter in [
            ((2, 4, 40, 16), "transposed", False, False), ((3, 40, 16), "contiguous", False, False),
            ((2, 4, 40, 16), "transposed", True, False), ((2, 4, 40, 16), "transposed", False, True),
            ((3, 40, 16), "contiguous", True, False), ((2, 4, 40, 16), "transposed", False, False)] * 2:
        x = make_x(shape, layout, torch.bfloat16)
        got = rope_triton(x, cos, sin, backward=backward, interleaved=inter)
        want = (rope_backward_ref if backward else rope_ref)(x, cos, sin, inter)
        assert_close_to_reference(got, want, terms(x, cos, sin, backward, inter))
    # Same ints, different alignment (Triton specializes on a pointer's 16-byte alignment).
    buffer = randn((2 * 40 * 4 * 16 + 8,), torch.bfloat16)
    for offset in (0, 1, 8, 3, 0, 1):
        x = buffer[offset:offset + 2 * 40 * 4 * 16].view(2, 40, 4, 16).transpose(1, 2)
        assert_close_to_reference(rope_triton(x, cos, sin), rope_ref(x, cos, sin), terms(x, cos, sin))


@pytest.mark.parametrize("dtype", HP_DTYPES)
def test_rope_values_gradients_and_layout(dtype):
    """The public function: values and gradient against the references, the output in x's
    layout, the gradient in x's layout (so q's view and transpose take it back without a copy)."""
    x = make_x((2, 4, 24, 16), "transposed", dtype).requires_grad_()
    g = randn((2, 4, 24, 16), dtype, seed=1)  # contiguous: not x's layout
    cos, sin = tables(24, 16, dtype)
    xd = x.detach()
    for interleaved in (False, True):
        out = rope(x, cos, sin, interleaved=interleaved)
        (grad,) = torch.autograd.grad(out, (x,), g)
        assert out.stride() == x.stride() and grad.stride() == x.stride()
        assert_close_to_reference(out, rope_ref(xd, cos, sin, interleaved), terms(xd, cos, sin, False, interleaved))
        assert_close_to_reference(grad, rope_backward_ref(g, cos, sin, interleaved),
                                  terms(g, cos, sin, True, interleaved))
    out = rope(x, cos, sin)
    (grad,) = torch.autograd.grad(out, (x,), g)
    # against eager's formula in its own dtype: eager rounds four times, we once
    (eager_grad,) = torch.autograd.grad(eager_rope(x, cos, sin), (x,), g)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, eager_rope(xd, cos, sin), **tol)
    torch.testing.assert_close(grad, eager_grad, **tol)


def test_query_projection_gets_its_gradient_without_a_copy():
    """The Llama pattern: wq(x).view(B, S, H, D).transpose(1, 2), rotated. The gradient reaching
    the projection's output is a view of what rope's backward wrote (no copy in between)."""
    B, S, H, D = 2, 24, 4, 16
    proj = randn((B, S, H * D), torch.bfloat16).requires_grad_()
    seen = []
    proj.register_hook(lambda grad: seen.append(grad))
    q = rope(proj.view(B, S, H, D).transpose(1, 2), *tables(S, D, torch.bfloat16))
    q.backward(randn((B, H, S, D), torch.bfloat16, seed=1))
    assert seen[0].is_contiguous() and seen[0]._base is not None  # a view, not a copy


def test_last_dim_not_contiguous_is_copied_first():
    x = randn((3, 24, 32), torch.bfloat16)[..., ::2]
    cos, sin = tables(24, 16)
    assert torch.equal(rope(x, cos, sin), rope(x.contiguous(), cos, sin))


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_double_backward_goes_through_plain_ops(interleaved):
    """Under create_graph the gradient is the written code's, and differentiates as it does. The
    tables are random, not a rotation's: for a rotation (cos^2 + sin^2 = 1) the second derivative
    of |grad|^2 is 2 g for any orthogonal backward, the wrong rotation or none at all."""
    x = randn((2, 3, 8, 16), torch.float32).requires_grad_()
    g = randn((2, 3, 8, 16), torch.float32, seed=1).requires_grad_()
    half_cos, half_sin = randn((8, 8), torch.float32, seed=2), randn((8, 8), torch.float32, seed=3)
    if interleaved:  # each value twice in a row, as the complex form's tables are
        cos, sin = half_cos.repeat_interleave(2, -1), half_sin.repeat_interleave(2, -1)
    else:  # both halves alike, as rotate_half's tables are
        cos, sin = torch.cat([half_cos, half_cos], -1), torch.cat([half_sin, half_sin], -1)
    (grad,) = torch.autograd.grad(rope(x, cos, sin, interleaved), (x,), g, create_graph=True)
    got = torch.autograd.grad((grad * grad).sum(), (g,))
    eager = complex_rope if interleaved else eager_rope  # the model code it replaces
    (want_grad,) = torch.autograd.grad(eager(x, cos, sin), (x,), g, create_graph=True)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    want = torch.autograd.grad((want_grad * want_grad).sum(), (g,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0], 2 * g, rtol=1e-2)  # the tables are no rotation's


def test_tables_that_require_grad_get_their_gradient():
    """Learned tables: the reference in plain ops, autograd differentiates both."""
    x = randn((2, 3, 8, 16), torch.float32).requires_grad_()
    cos, sin = (t.clone().requires_grad_() for t in tables(8, 16))
    out = rope(x, cos, sin)
    assert "RoPEFn" not in type(out.grad_fn).__name__
    got = torch.autograd.grad(out.square().sum(), (x, cos, sin))
    want = torch.autograd.grad(eager_rope(x, cos, sin).square().sum(), (x, cos, sin))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tensor_subclasses_get_the_reference_in_plain_ops():
    from torch.testing._internal.two_tensor import TwoTensor

    x = randn((2, 3, 8, 16), torch.float32)
    cos, sin = tables(8, 16)
    out = rope(TwoTensor(x, x.clone()), cos, sin)
    assert isinstance(out, TwoTensor) and torch.equal(out.a, rope_ref(x, cos, sin))


def test_torch_func_transforms_and_forward_ad_get_the_reference():
    """grad, vmap and forward-mode AD work as on eager's formula (the kernel's Function has no
    rules for them: the reference in plain ops runs instead)."""
    import torch.autograd.forward_ad as fwAD

    x, t = randn((2, 3, 8, 16), torch.float32), randn((2, 3, 8, 16), torch.float32, seed=1)
    cos, sin = tables(8, 16)
    got = torch.func.grad(lambda v: rope(v, cos, sin).square().sum())(x)
    torch.testing.assert_close(got, torch.func.grad(lambda v: eager_rope(v, cos, sin).square().sum())(x))
    batched = torch.func.vmap(lambda v: rope(v, cos, sin))(x)
    torch.testing.assert_close(batched, rope_ref(x, cos, sin))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(rope(fwAD.make_dual(x, t), cos, sin)).tangent
    torch.testing.assert_close(tangent, rope_ref(t, cos, sin))


def test_inference_mode_and_no_grad():
    x = make_x((2, 4, 24, 16), "transposed", torch.bfloat16)
    cos, sin = tables(24, 16)
    want = rope(x, cos, sin)
    with torch.inference_mode():
        assert torch.equal(rope(x, cos, sin), want)
    with torch.no_grad():
        assert torch.equal(rope(x, cos, sin), want)


def test_bad_inputs_name_the_problem():
    x = randn((2, 3, 8, 16), torch.float32)
    cos, sin = tables(8, 16)
    with pytest.raises(ValueError, match="even last dim"):
        rope(x[..., :15], cos[:, :15], sin[:, :15])
    with pytest.raises(ValueError, match="2 to 4 dims"):
        rope(x[None], cos, sin)
    with pytest.raises(ValueError, match="last dim 16"):
        rope(x, cos[:, :8], sin[:, :8])
    with pytest.raises(ValueError, match="one shape"):
        rope(x, cos, sin[None])
    with pytest.raises(ValueError, match="last dim 16"):
        rope(x, cos[0, 0], sin[0, 0])  # 0-dim tables
    with pytest.raises(ValueError, match="do not broadcast"):
        rope(x, *tables(9, 16))  # 9 positions for 8
    with pytest.raises(ValueError, match="do not broadcast"):
        rope(x[0, 0], cos[None, None].expand(2, 3, 8, 16), sin[None, None].expand(2, 3, 8, 16))
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        rope(x.double(), cos, sin)
    with pytest.raises(TypeError, match="tensors"):
        rope(x, 1.0, sin)
    with pytest.raises(ValueError, match="power of two"):
        rope_triton(x, cos, sin, block_elements=96, num_warps=1)
