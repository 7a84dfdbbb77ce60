"""f8tensor.swiglu and f8tensor.geglu (GeGLU's gate, GELU in its tanh form): the fused kernels against
their reference, the amax records they hand to Float8Linear (fewer amax passes, same bits), and the
autograd wrapper's edges.

The Triton kernels run on the GPU, or in the interpreter on CPU. The interpreter truncates fp32 to
bf16/fp16 instead of rounding (and the GPU's fast exp differs from PyTorch's in the last fp32 bits),
so bf16/fp16 kernel values are checked to within one unit in the last place of the reference on
both, and the GPU must match it exactly on all but 0.1 % of elements; fp32 values to the fp32
arithmetic error of the terms (fast exp: in proportion to |a|). The amax records are checked
exactly: they must be the amax of what the kernel wrote. On CPU, `swiglu` itself runs the
reference: the tests of the public function there test its autograd wrapper and the records.
"""

import pytest
import torch
import torch.nn.functional as F
from f8utils import DEVICE, HP_DTYPES, count_amax_passes, ignore_records, sqnr
from torch import nn

from f8tensor import Float8Linear, geglu, geglu_halves, swiglu, swiglu_halves
from f8tensor.kernels import (_as_amax_value, amax_ref, geglu_backward_ref, geglu_ref, swiglu_backward_ref, swiglu_ref,
                              swiglu_triton)
from f8tensor.kernels.naive import GELU_TANH_BETA, GELU_TANH_KAPPA
from f8tensor.core.tensor_cache import produced_amax

ON_GPU = DEVICE.type == "cuda"
needs_triton = pytest.mark.skipif(swiglu_triton is None, reason="needs triton")
SHAPES = [(1, 7), (3, 5000), (64, 256)] + ([(4096, 14336), (3, 1 << 20)] if ON_GPU else [])


def sigmoid_arg(a, gelu_tanh=False):
    """The argument of the gate's sigmoid: a (silu), 2 beta (a + kappa a^3) (GELU's tanh form)."""
    a = a.double()
    return 2 * GELU_TANH_BETA * (a + GELU_TANH_KAPPA * a ** 3) if gelu_tanh else a


def assert_close_to_reference(out, ref, a, scale=None, gelu_tanh=False, cancel=None):
    """|out - ref| <= one unit in the last place of ref's dtype at ref (what decides bf16/fp16),
    plus fp32 arithmetic error: 2^-20 of `scale` (the magnitude of the terms; default |ref|) times
    1 + |z| (the GPU's fast exp of -z, z the sigmoid's argument, errs in proportion to |z|; what
    decides fp32), plus `cancel` (an absolute allowance: GELU's 1 + t cancels for negative a); on
    the GPU at most 0.1 % of bf16/fp16 elements may differ at all."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    o, r = out.double(), ref.double()
    ulp = torch.nextafter(ref.abs(), torch.full_like(ref, float("inf"))).double() - r.abs()
    terms = r.abs() if scale is None else scale.double()
    z = sigmoid_arg(a, gelu_tanh)
    # GELU's sigmoid saturates where its argument is large: there an error in exp moves s by
    # s (1 - s) |z| of it, not |z|.
    allowed = ulp + 2**-20 * terms * (1 + (torch.sigmoid(z) * (1 - torch.sigmoid(z)) * z.abs() if gelu_tanh
                                           else z.abs()))
    if cancel is not None:
        allowed = allowed + cancel
    bad = ((o - r).abs() > allowed) & ~(o.isnan() & r.isnan())
    assert not bad.any(), f"{int(bad.sum())} of {out.numel()} beyond tolerance, e.g. {o[bad][:3]} vs {r[bad][:3]}"
    if ON_GPU and out.dtype != torch.float32:
        differ = int((o != r).sum()) - int((o.isnan() & r.isnan()).sum())
        assert differ <= max(1, out.numel() // 1000), f"{differ} of {out.numel()} differ"


def grad_a_scale(g, a, b, gelu_tanh=False):
    """Magnitude of the terms of grad_a = g b s (1 + a (1 - s)): where they cancel, fp32 rounding
    of the terms, not of the result, bounds the error. GELU's tanh form, g b (0.5 (1 + t) + 0.5 a
    (1 - t^2) beta (1 + 3 kappa a^2)): t's own rounding, amplified by the second term's factor of
    (1 - t^2), which stays where 1 - t^2 vanishes."""
    g, a, b = g.double(), a.double(), b.double()
    if gelu_tanh:
        return (g * b).abs() * (1 + a.abs() * GELU_TANH_BETA * (1 + 3 * GELU_TANH_KAPPA * a * a))
    s = torch.sigmoid(a)
    return (g * b * s).abs() * (1 + a.abs() * (1 - s))


def act_cancel(a, other, gelu_tanh):
    """GELU's tanh form, 0.5 a (1 + t) other: t's rounding near -1 (2^-24), which 1 + t keeps for
    negative a; nothing for silu."""
    return 2**-23 * (a.double() * other.double()).abs() if gelu_tanh else None


GATES = {False: (swiglu, swiglu_ref, swiglu_backward_ref), True: (geglu, geglu_ref, geglu_backward_ref)}


def assert_record_is_amax_of(record, t):
    """The record's max, as an fp32 value, is exactly max(|t|) (NaN if t has one)."""
    got, want = _as_amax_value(record), amax_ref(t)
    assert torch.equal(got, want) or (got.isnan() and want.isnan()), (got, want)


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b, grad = (torch.randn(shape, generator=g) * s for s in (4.0, 1.0, 1e-3))
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype), grad.to(DEVICE, dtype)


def test_reference_is_the_derivative_of_silu_times_b():
    a, b, g = (t.double() for t in inputs((16, 300), torch.float32))
    a.requires_grad_(), b.requires_grad_()
    h = F.silu(a) * b
    want = torch.autograd.grad(h, (a, b), g)
    a32, b32, g32 = a.detach().float(), b.detach().float(), g.float()
    torch.testing.assert_close(swiglu_ref(a32, b32).double(), h.detach(), rtol=1e-6, atol=1e-7)
    for got, w in zip(swiglu_backward_ref(g32, a32, b32), want):
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-9)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", HP_DTYPES)
@pytest.mark.parametrize("blocks", [dict(block=256, num_warps=4), {}], ids=["small_blocks", "default"])
@pytest.mark.parametrize("gelu_tanh", [False, True], ids=["silu", "gelu_tanh"])
def test_kernels_match_the_reference_and_record_their_amax(shape, dtype, blocks, gelu_tanh):
    from f8tensor.kernels.swiglu import swiglu_backward_triton, swiglu_triton

    _, ref, backward_ref = GATES[gelu_tanh]
    a, b, g = inputs(shape, dtype)
    h, record = swiglu_triton(a, b, gelu_tanh, **blocks)
    assert_close_to_reference(h, ref(a, b), a, gelu_tanh=gelu_tanh, cancel=act_cancel(a, b, gelu_tanh))
    assert_record_is_amax_of(record, h)
    grad_a, grad_b, record_a, record_b = swiglu_backward_triton(g, a, b, gelu_tanh, **blocks)
    want_a, want_b = backward_ref(g, a, b)
    assert_close_to_reference(grad_a, want_a, a, grad_a_scale(g, a, b, gelu_tanh), gelu_tanh=gelu_tanh)
    assert_close_to_reference(grad_b, want_b, a, gelu_tanh=gelu_tanh, cancel=act_cancel(a, g, gelu_tanh))
    assert_record_is_amax_of(record_a, grad_a)
    assert_record_is_amax_of(record_b, grad_b)


@needs_triton
def test_kernels_propagate_nan_and_inf_into_the_records():
    """NaN in a poisons h and both gradients; an infinite b makes h infinite: the records say so
    (a NaN record's scale is NaN downstream, as quantize's own amax pass would make it)."""
    from f8tensor.kernels.swiglu import swiglu_backward_triton

    a, b, g = inputs((4, 3000), torch.bfloat16)
    a[2, 17] = float("nan")
    h, record = swiglu_triton(a, b)
    grad_a, grad_b, record_a, record_b = swiglu_backward_triton(g, a, b)
    for t, r in ((h, record), (grad_a, record_a), (grad_b, record_b)):
        assert_record_is_amax_of(r, t)
        assert _as_amax_value(r).isnan()
    a, b, g = inputs((4, 3000), torch.bfloat16)
    a[1, 5], b[1, 5] = 3.0, float("inf")
    h, record = swiglu_triton(a, b)
    assert_record_is_amax_of(record, h)
    assert _as_amax_value(record).isinf()


@needs_triton
def test_double_backward_goes_through_plain_ops(monkeypatch):
    """create_graph=True: backward is the reference in plain ops, so the gradients differentiate
    (the kernels' outputs would carry no graph). The kernels stand in for backward on CPU too."""
    import sys

    from f8tensor.kernels.swiglu import swiglu_backward_triton

    swiglu_mod = sys.modules["f8tensor.fused_ops.swiglu"]
    monkeypatch.setattr(swiglu_mod, "swiglu_backward_with_amax", swiglu_backward_triton)
    a, b, g = inputs((8, 96), torch.float32)
    a.requires_grad_(), b.requires_grad_()
    grad_a, _ = torch.autograd.grad(swiglu(a, b), (a, b), g, create_graph=True)
    got = torch.autograd.grad(grad_a.sum(), (a, b))
    want_a, _ = torch.autograd.grad(F.silu(a) * b, (a, b), g, create_graph=True)
    for x, y in zip(got, torch.autograd.grad(want_a.sum(), (a, b))):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", HP_DTYPES)
@pytest.mark.parametrize("gelu_tanh", [False, True], ids=["swiglu", "geglu"])
def test_swiglu_values_and_gradients(dtype, gelu_tanh):
    gate, ref, backward_ref = GATES[gelu_tanh]
    a, b, g = inputs((2, 8, 96), dtype)
    a.requires_grad_(), b.requires_grad_()
    h = gate(a, b)
    grad_a, grad_b = torch.autograd.grad(h, (a, b), g)
    ad, bd = a.detach(), b.detach()
    want_a, want_b = backward_ref(g, ad, bd)
    assert_close_to_reference(h, ref(ad, bd), ad, gelu_tanh=gelu_tanh, cancel=act_cancel(ad, bd, gelu_tanh))
    assert_close_to_reference(grad_a, want_a, ad, grad_a_scale(g, ad, bd, gelu_tanh), gelu_tanh=gelu_tanh)
    assert_close_to_reference(grad_b, want_b, ad, gelu_tanh=gelu_tanh, cancel=act_cancel(ad, g, gelu_tanh))
    # One input without grad: its gradient is not returned; the other's is unchanged.
    (only_a,) = torch.autograd.grad(gate(a, bd), (a,), g)
    assert torch.equal(only_a, grad_a)


def test_geglu_reference_is_the_written_gelu_tanh_gate():
    """geglu's reference against the written gate, F.gelu(a, approximate="tanh") * b in fp32, and
    autograd's derivative of it: within 2^-22 |a b| everywhere (where PyTorch's tanh gives -1 and
    the gate 0 too), and within 4 fp32 units in the last place of the value for a > -1."""
    a, b, g = inputs((8, 3000), torch.float32)
    a[0, :200] = torch.linspace(-20, 20, 200)  # the tails and the middle
    af = a.clone().requires_grad_()
    written = F.gelu(af, approximate="tanh") * b
    (want_a,) = torch.autograd.grad(written, (af,), g)
    got_a, got_b = geglu_backward_ref(g, a, b)
    scale = (a * b).abs()
    assert ((geglu_ref(a, b) - written.detach()).abs() <= 2**-22 * scale + 1e-6 * written.detach().abs()).all()
    near = a > -1
    w = written.detach()[near]
    ulp = torch.nextafter(w.abs(), torch.full_like(w, float("inf"))) - w.abs()
    assert ((geglu_ref(a, b)[near] - w).abs() <= 4 * ulp).all()
    want_b = g * F.gelu(a, approximate="tanh")
    assert ((got_b - want_b).abs() <= 2**-22 * (a * g).abs() + 1e-6 * want_b.abs()).all()
    assert ((got_a - want_a).abs() <= 2**-22 * grad_a_scale(g, a, b, True) + 1e-5 * want_a.abs()).all()


def test_swiglu_on_non_contiguous_inputs_and_without_grad():
    a, b, _ = inputs((96, 64), torch.bfloat16)
    want = swiglu(a.t().contiguous(), b.t().contiguous())
    assert torch.equal(swiglu(a.t(), b.t()), want)
    with torch.inference_mode():  # inference tensors: nothing is remembered, nothing fails
        assert torch.equal(swiglu(a.t(), b.t()), want)
        assert produced_amax.get(swiglu(a, b)) is None


def test_tensor_subclasses_get_the_reference_in_plain_ops():
    """A subclass (DTensor under tensor parallelism) has no memory of its own for the kernels:
    it gets the reference, in ops it implements, with autograd through them."""
    from torch.testing._internal.two_tensor import TwoTensor

    a, b, g = inputs((8, 96), torch.float32)
    a2 = TwoTensor(a, a.clone()).requires_grad_()
    h = swiglu(a2, TwoTensor(b, b.clone()))
    assert isinstance(h, TwoTensor) and "SwiGLUFn" not in type(h.grad_fn).__name__
    assert torch.equal(h.a, swiglu_ref(a, b)) and torch.equal(h.b, swiglu_ref(a, b))
    (grad,) = torch.autograd.grad(h, (a2,), TwoTensor(g, g.clone()))
    torch.testing.assert_close(grad.a, swiglu_backward_ref(g, a, b)[0], rtol=1e-5, atol=1e-8)


def test_torch_func_transforms_and_forward_ad_get_the_reference():
    """grad, vmap and forward-mode AD work as on F.silu(a) * b (the kernels' Function has no rules
    for them: the reference in plain ops runs instead)."""
    import torch.autograd.forward_ad as fwAD

    a, b, t = inputs((8, 96), torch.float32)
    got = torch.func.grad(lambda v: swiglu(v, b).sum())(a)
    torch.testing.assert_close(got, torch.func.grad(lambda v: (F.silu(v) * b).sum())(a), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.func.vmap(swiglu)(a, b), swiglu_ref(a, b))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(swiglu(fwAD.make_dual(a, t), b)).tangent
    want = torch.func.jvp(lambda v: F.silu(v) * b, (a,), (t,))[1]
    torch.testing.assert_close(tangent, want, rtol=1e-5, atol=1e-7)


def test_bad_inputs_name_the_problem():
    a = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        swiglu(a, torch.randn(8, device=DEVICE))  # no broadcasting
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        swiglu(a, a.bfloat16())
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        swiglu(a.long(), a.long())
    with pytest.raises(TypeError, match="two tensors"):
        swiglu(a, 2.0)
    with pytest.raises(ValueError, match=r"geglu\(a, b\) needs a and b of one shape"):
        geglu(a, torch.randn(8, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("shape", [(1, 14), (3, 5000), (2, 3, 512)] + ([(4096, 28672)] if ON_GPU else []))
@pytest.mark.parametrize("dtype", HP_DTYPES)
@pytest.mark.parametrize("gate_half", [0, 1])
@pytest.mark.parametrize("gelu_tanh", [False, True], ids=["silu", "gelu_tanh"])
@pytest.mark.parametrize("offsets", [32, 64], ids=["int32_offsets", "int64_offsets"])
def test_halves_kernels_give_the_bits_of_the_kernels_on_copied_halves(shape, dtype, gate_half, gelu_tanh, offsets,
                                                                      monkeypatch):
    """The halves of one y [..., 2 F] read in place (rows 2 F apart, the row index from 32- or 64-bit
    division): h and both gradients, written into one dy, are the bits the kernels give for
    contiguous copies of the halves; the records are the amax of h and of dy."""
    import f8tensor.kernels.swiglu as kernels
    from f8tensor.kernels.naive import halves
    from f8tensor.kernels.swiglu import (swiglu_backward_triton, swiglu_halves_backward_triton,
                                         swiglu_halves_triton)

    if offsets == 64:  # the division in 64-bit integers, which y past 2^31 elements takes
        monkeypatch.setattr(kernels, "INT32_OFFSETS", 0)

    y, _, g = inputs(shape, dtype)
    g = g[..., : shape[-1] // 2].contiguous()
    a, b = (t.contiguous() for t in halves(y, gate_half))
    blocks = dict(block=256, num_warps=4)
    h, record = swiglu_halves_triton(y, gate_half, gelu_tanh, **blocks)
    assert torch.equal(h, swiglu_triton(a, b, gelu_tanh, **blocks)[0])
    assert_record_is_amax_of(record, h)
    dy, record_dy = swiglu_halves_backward_triton(g, y, gate_half, gelu_tanh, **blocks)
    grad_a, grad_b, _, _ = swiglu_backward_triton(g, a, b, gelu_tanh, **blocks)
    got_a, got_b = halves(dy, gate_half)
    assert dy.shape == y.shape and torch.equal(got_a, grad_a) and torch.equal(got_b, grad_b)
    assert_record_is_amax_of(record_dy, dy)


@needs_triton
def test_halves_offsets_take_32_bit_division_exactly_while_every_offset_fits():
    """y [rows, 2 F] read as its halves: 32-bit division while rows x 2 F < 2^31 (its largest offset
    2^31 - 1 or less), 64-bit from there; contiguous inputs none."""
    from f8tensor.kernels.swiglu import strided_bits

    F = 2 ** 10
    assert strided_bits(2 ** 20 * F, F, 2 * F) == 64  # 2^20 rows of 2^11: y has 2^31 elements
    assert strided_bits((2 ** 20 - 1) * F, F, 2 * F) == 32
    assert strided_bits(2 ** 30 - 1, 1, 2) == 32 and strided_bits(2 ** 30, 1, 2) == 64
    assert strided_bits(2 ** 40, F, F) == 0


@pytest.mark.parametrize("dtype", HP_DTYPES)
@pytest.mark.parametrize("gelu_tanh", [False, True], ids=["swiglu", "geglu"])
@pytest.mark.parametrize("gate_half", [0, 1])
def test_halves_op_gives_the_gate_of_the_chunked_halves(dtype, gelu_tanh, gate_half):
    """swiglu_halves(y) (geglu_halves): the bits of swiglu (geglu) of the halves y.chunk(2, dim=-1)
    gives, and the gradient autograd gives through the chunk, in one tensor of y's shape with one
    amax record."""
    gate = GATES[gelu_tanh][0]
    op = geglu_halves if gelu_tanh else swiglu_halves
    y, _, g = inputs((2, 8, 192), dtype)
    g = g[..., :96].contiguous()
    y1, y2 = y.clone().requires_grad_(), y.clone().requires_grad_()
    h = op(y1, gate_half)
    first, second = y2.chunk(2, dim=-1)
    want = gate(*((first, second) if gate_half == 0 else (second, first)))
    assert torch.equal(h, want)
    assert torch.equal(_as_amax_value(produced_amax.get(h)), amax_ref(h))
    (dy,) = torch.autograd.grad(h, (y1,), g)
    (want_dy,) = torch.autograd.grad(want, (y2,), g)
    assert torch.equal(dy, want_dy)
    # create_graph: the plain-op backward, differentiable, as the two-tensor op's create_graph
    # backward through the chunk (not the kernels' bits: on the GPU those are within one unit in
    # the last place of the plain ops, not equal to them)
    (dy,) = torch.autograd.grad(op(y1, gate_half), (y1,), g, create_graph=True)
    first, second = y2.chunk(2, dim=-1)
    want = gate(*((first, second) if gate_half == 0 else (second, first)))
    (want_dy,) = torch.autograd.grad(want, (y2,), g, create_graph=True)
    assert dy.requires_grad and torch.equal(dy.detach(), want_dy.detach())


def test_halves_op_bad_inputs_name_the_problem():
    y = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="even last dim"):
        swiglu_halves(y[:, :7])
    with pytest.raises(ValueError, match="gate_half is 0"):
        swiglu_halves(y, 2)
    with pytest.raises(TypeError, match="gate_half is the int 0 or 1, got bool True"):
        geglu_halves(y, True)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        swiglu_halves(y.long())
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):  # the dtype first, odd width or not
        swiglu_halves(y[:, :7].long())
    with pytest.raises(TypeError, match="takes a tensor"):
        swiglu_halves([1.0, 2.0])


class FeedForward(nn.Module):
    def __init__(self, dim=64, ffn=192, fused=True):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)
        self.fused = fused

    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        return self.w2(swiglu(a, b) if self.fused else F.silu(a) * b)


def float8_ffn(fused=True, dtype=torch.bfloat16):
    torch.manual_seed(0)
    ffn = FeedForward(fused=fused).to(DEVICE, dtype)
    for name in ("w1", "w3", "w2"):
        setattr(ffn, name, Float8Linear.from_float(getattr(ffn, name)))
    return ffn


def step(ffn, x):
    x = x.detach().requires_grad_()
    out = ffn(x)
    out.float().square().sum().backward()
    grads = [x.grad] + [getattr(ffn, n).weight.grad for n in ("w1", "w3", "w2")]
    for n in ("w1", "w3", "w2"):
        getattr(ffn, n).weight.grad = None
    return [out.detach()] + grads


def test_float8_layers_use_the_records_same_bits_fewer_passes(monkeypatch):
    """w2 reads swiglu's output, w1/w3 its gradients: each skips its amax pass (forward 4 instead
    of 5: x once for w1/w3, three weights; backward 1 instead of 3: w2's grad_output), and the
    results are the bits the layers give when they measure the amax themselves."""
    passes = count_amax_passes(monkeypatch)
    x = torch.randn(2, 16, 64, device=DEVICE, dtype=torch.bfloat16)
    ffn = float8_ffn()
    counts = []
    for use_records in (True, False):
        if not use_records:
            ignore_records(monkeypatch)
        passes.clear()
        out = ffn(x.requires_grad_())
        forward = sum(passes)
        out.float().square().sum().backward()
        counts.append((forward, sum(passes) - forward))
        x.grad = None
        for n in ("w1", "w3", "w2"):
            getattr(ffn, n).weight.grad = None
    assert counts == [(4, 1), (5, 3)]
    monkeypatch.undo()
    with_records = step(ffn, x)
    ignore_records(monkeypatch)
    for got, want in zip(with_records, step(ffn, x)):
        assert torch.equal(got, want)


def test_a_record_is_not_used_after_an_in_place_write(monkeypatch):
    passes = count_amax_passes(monkeypatch)
    ffn = float8_ffn()
    a, b, _ = inputs((32, 192), torch.bfloat16)
    h = swiglu(a, b)
    h.mul_(3)  # the record is of the old values
    passes.clear()
    out = ffn.w2(h)
    assert passes == [True, True]  # h's amax measured again, and the weight's
    ignore_records(monkeypatch)
    assert torch.equal(out, ffn.w2(h.clone()))


def test_float8_feed_forward_as_accurate_as_the_unfused_one():
    """Against the bf16 feed-forward, fused float8 is within 1 dB of unfused float8 (SQNR of the
    output and of every gradient; both ~21-24 dB at this size)."""
    x = torch.randn(4, 32, 64, device=DEVICE, dtype=torch.bfloat16)
    torch.manual_seed(0)
    ref = step(FeedForward(fused=False).to(DEVICE, torch.bfloat16), x)
    fused, unfused = step(float8_ffn(True), x), step(float8_ffn(False), x)
    for f, u, r in zip(fused, unfused, ref):
        assert sqnr(r, f) > sqnr(r, u) - 1 and sqnr(r, f) > 18


def test_checkpointed_feed_forward_gives_identical_gradients():
    from torch.utils.checkpoint import checkpoint

    ffn = float8_ffn()
    x = torch.randn(2, 16, 64, device=DEVICE, dtype=torch.bfloat16)
    plain = step(ffn, x)
    ffn_forward = ffn.forward
    ffn.forward = lambda t: checkpoint(ffn_forward, t, use_reentrant=False)
    for got, want in zip(step(ffn, x), plain):
        assert torch.equal(got, want)
