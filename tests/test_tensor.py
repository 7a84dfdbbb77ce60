"""Float8Tensor: construction, repr, flatten/unflatten, the op table, the fallback policy, GEMM routing."""

import pytest
import torch
from expecttest import TestCase
from f8utils import DEVICE

import f8tensor
from f8tensor import Float8Config, Float8Tensor, GemmRole, scaled_mm, to_float8
from f8tensor.kernels import quantize_ref


def q(x, **kw):
    return to_float8(x.to(DEVICE), **kw)


class TestRepr(TestCase):
    def test_repr(self):
        x = torch.arange(-8, 24, dtype=torch.float32).view(4, 8) / 4
        t = to_float8(x, role=GemmRole.WEIGHT)
        self.assertExpectedInline(repr(t), """Float8Tensor(shape=(4, 8), float8_e4m3fn, layout=row, scale=0.0128348, orig_dtype=float32, role=weight)""")
        self.assertExpectedInline(repr(t.t()), """Float8Tensor(shape=(8, 4), float8_e4m3fn, layout=col, scale=0.0128348, orig_dtype=float32, role=weight)""")
        row, col = to_float8(x.bfloat16(), torch.float8_e5m2, layout="both")
        self.assertExpectedInline(repr(col), """Float8Tensor(shape=(4, 8), float8_e5m2, layout=col, scale=0.000100272, orig_dtype=bfloat16, role=None)""")


def test_construction_validates_fields():
    data = torch.zeros(4, 16, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="float8_e4m3fn or float8_e5m2"):
        Float8Tensor(torch.zeros(4, 16), torch.tensor(1.0), torch.bfloat16)
    with pytest.raises(ValueError, match="one element .tensorwise., one per row"):
        Float8Tensor(data, torch.tensor([1.0, 2.0]), torch.bfloat16)
    with pytest.raises(ValueError, match="must be float32"):
        Float8Tensor(data, torch.tensor(1.0, dtype=torch.float64), torch.bfloat16)
    with pytest.raises(ValueError, match=r"got torch.float32 of shape \(4, 16\)"):  # one scale per element
        Float8Tensor(data, torch.ones(4, 16), torch.bfloat16)
    assert Float8Tensor(data, torch.ones(4, 1), torch.bfloat16).granularity == "per row"
    assert Float8Tensor(data, torch.ones(1, 16), torch.bfloat16).granularity == "per column"
    with pytest.raises(TypeError, match="high-precision"):
        Float8Tensor(data, torch.tensor(1.0), torch.int32)
    t = Float8Tensor(data, torch.tensor([0.5]), torch.bfloat16)
    assert t.dtype == torch.bfloat16 and t.shape == (4, 16) and t._scale.shape == ()


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("shape", [(17, 48), (2, 8, 32), (16,)])
def test_to_float8_matches_reference_and_keeps_shape(layout, shape):
    x = torch.randn(shape, dtype=torch.bfloat16)
    t = q(x, layout=layout)
    assert t.shape == x.shape and t.dtype == torch.bfloat16
    row, col, scale = quantize_ref(x.reshape(-1, shape[-1]).to(DEVICE), torch.float8_e4m3fn, layout)
    want = row if layout == "row" else col
    assert torch.equal(t._data.reshape(want.shape).float(), want.float())
    assert torch.equal(t._scale, scale)
    assert torch.allclose(t.dequantize().float(), x.to(DEVICE).float(), rtol=0.07, atol=1e-6 * x.abs().max())


def test_both_layouts_have_one_scale_value_and_values():
    row, col = q(torch.randn(32, 64), layout="both")
    assert torch.equal(row._scale, col._scale) and row._scale is not col._scale  # a copy_ into one leaves the other
    assert row._data.is_contiguous() and col._data.t().is_contiguous()
    assert torch.equal(row.dequantize(), col.dequantize())


def test_a_copy_into_a_new_tensor_leaves_the_tensors_it_came_from():
    """copy_ writes the destination's data and scale: the layouts of one cast, a concatenation and
    a .to() copy are new tensors with scales of their own, so their sources keep their values."""
    x = torch.randn(16, 32, device=DEVICE)
    big = q(torch.randn(16, 32) * 100)
    row, col = q(x, layout="both")
    want = col.dequantize()
    row.copy_(big)
    assert torch.equal(col.dequantize(), want) and torch.equal(row.dequantize(), big.dequantize())
    a = q(x)
    want = a.dequantize()
    torch.cat([a, a]).copy_(torch.cat([big, big]))
    a.to(torch.bfloat16).copy_(big)
    a.to(torch.float32, copy=True).copy_(big)
    assert torch.equal(a.dequantize(), want)


def test_flatten_unflatten_roundtrip():
    config = Float8Config(fast_accum_output=False)
    t = q(torch.randn(16, 32), role=GemmRole.INPUT, config=config)
    names, meta = t.__tensor_flatten__()
    inner = {n: getattr(t, n) for n in names}
    u = Float8Tensor.__tensor_unflatten__(inner, meta, t.shape, t.stride())
    assert u._data is t._data and u._scale is t._scale
    assert (u._orig_dtype, u._role, u._config) == (torch.float32, GemmRole.INPUT, config)


@pytest.mark.parametrize("op", [
    lambda t: t.detach(), lambda t: t.view(8, 64), lambda t: t.reshape(64, 8), lambda t: t.t(),
    lambda t: t.transpose(0, 1), lambda t: t[2:10], lambda t: t[:, 16:48], lambda t: t[3],
    lambda t: t.unsqueeze(0), lambda t: t.permute(1, 0), lambda t: t.clone(),
    lambda t: t.as_strided((4, 4), (64, 1)), lambda t: t.unsqueeze(1).squeeze(1),
])
def test_view_ops_act_on_data_and_keep_scale(op):
    x = torch.randn(16, 32, device=DEVICE)
    t = q(x)
    out = op(t)
    assert isinstance(out, Float8Tensor)
    assert torch.equal(out._scale, t._scale)
    assert torch.equal(out.dequantize(), op(t.dequantize()))


def test_split_and_cat():
    t = q(torch.randn(16, 32))
    parts = torch.split(t, 5)
    assert all(isinstance(p, Float8Tensor) for p in parts) and [p.shape[0] for p in parts] == [5, 5, 5, 1]
    joined = torch.cat(parts)
    assert isinstance(joined, Float8Tensor) and torch.equal(joined.dequantize(), t.dequantize())
    other = q(torch.randn(16, 32) * 100)
    with pytest.raises(ValueError, match="different scales"):
        torch.cat([t, other])


def test_clone_owns_its_scale_and_copy_between_float8_tensors():
    a, b = q(torch.randn(16, 32)), q(torch.randn(16, 32) * 10)
    c = a.clone()
    c.copy_(b)
    assert torch.equal(c.dequantize(), b.dequantize())
    assert not torch.equal(a._scale, c._scale)  # the original is untouched
    with pytest.raises(ValueError, match="part of another"):
        c[:8].copy_(b[:8])
    with pytest.raises(TypeError, match="requantize"):
        c.copy_(q(torch.randn(16, 32), float8_dtype=torch.float8_e5m2))


def test_copy_high_precision_in_and_out():
    t = q(torch.randn(16, 32))
    x = torch.randn(16, 32, device=DEVICE)
    t.copy_(x)  # quantized onto t's existing scale, saturating
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    assert torch.equal(t._data.float(), (x / t._scale).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn).float())
    plain = torch.empty(16, 32, device=DEVICE)
    plain.copy_(t)
    assert torch.equal(plain, t.dequantize())


def test_to_copy_changes_presented_dtype_keeps_data():
    t = q(torch.randn(16, 32))
    b = t.to(torch.bfloat16)
    assert isinstance(b, Float8Tensor) and b.dtype == torch.bfloat16 and b._data is not None
    assert torch.equal(b._data.view(torch.uint8), t._data.view(torch.uint8))
    assert b._data.data_ptr() != t._data.data_ptr() and b._scale.data_ptr() != t._scale.data_ptr()  # a copy
    with pytest.raises(TypeError, match="ambiguous"):
        t.to(torch.float8_e4m3fn)


def test_empty_like_and_is_same_size():
    t = q(torch.randn(16, 32))
    e = torch.empty_like(t)
    assert isinstance(e, Float8Tensor) and e.shape == t.shape and e._scale is not t._scale
    assert isinstance(torch.empty_like(t, dtype=torch.float16), torch.Tensor)
    assert torch.ops.aten.is_same_size(t, e) and not torch.ops.aten.is_same_size(t, t[:3])


def test_ops_outside_the_table_run_dequantized_with_a_warning():
    t = q(torch.randn(16, 32))
    with pytest.warns(UserWarning, match="not in Float8Tensor's op table"):
        out = t + 1
    assert type(out) is torch.Tensor and torch.equal(out, t.dequantize() + 1)


def test_mutating_ops_outside_the_table_raise():
    t = q(torch.randn(16, 32))
    with pytest.raises(NotImplementedError, match="mutating op .*add_.*dequantize"):
        t.add_(1)
    with pytest.raises(NotImplementedError, match="mutating op .*add.out"):
        torch.add(torch.ones(16, 32, device=DEVICE), 1, out=t)


def test_ops_that_write_a_plain_tensor_may_read_a_float8_tensor():
    """Only writing into a Float8Tensor would requantize: a plain tensor written from one's values
    (in place, or as out=) is the op on the dequantized values."""
    t = q(torch.randn(16, 32))
    plain = torch.ones(16, 32, device=DEVICE)
    with pytest.warns(UserWarning, match="not in Float8Tensor's op table"):
        plain.add_(t)
    assert torch.equal(plain, 1 + t.dequantize())
    out = torch.empty(16, 32, device=DEVICE)
    torch.mul(t, 2, out=out)
    assert torch.equal(out, t.dequantize() * 2)


def test_requantizing_a_float8_tensor_is_refused():
    with pytest.raises(TypeError, match="already a Float8Tensor"):
        to_float8(q(torch.randn(16, 32)))


# --- GEMM routing ---------------------------------------------------------------------------

def by_hand(a, b, out_dtype, bias=None, fast=False):
    """_scaled_mm on the reference quantization, operands laid out as CUDA wants."""
    a_row, _, sa = quantize_ref(a, torch.float8_e4m3fn, "row")
    _, b_col, sb = quantize_ref(b, torch.float8_e4m3fn, "col")
    return torch._scaled_mm(a_row, b_col, sa, sb, bias=bias, out_dtype=out_dtype, use_fast_accum=fast)


@pytest.mark.parametrize("b_layout", ["row", "col"])
@pytest.mark.parametrize("a_layout", ["row", "col"])
def test_mm_fixes_layouts_only_where_needed(a_layout, b_layout):
    a, b = torch.randn(32, 64, device=DEVICE), torch.randn(64, 48, device=DEVICE)
    out = torch.mm(q(a, layout=a_layout), q(b, layout=b_layout))
    assert type(out) is torch.Tensor and out.dtype == torch.float32
    assert torch.equal(out, by_hand(a, b, torch.float32, fast=True))


def test_mm_quantizes_a_plain_operand_and_matmul_linear_work():
    x, w = torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16), torch.randn(32, 64, device=DEVICE, dtype=torch.bfloat16)
    w8 = q(w, role=GemmRole.WEIGHT)
    want = by_hand(x, w.t(), torch.bfloat16, fast=True)
    assert torch.equal(torch.mm(x, w8.t()), want)
    assert torch.equal(x @ w8.t(), want)
    assert torch.equal(torch.nn.functional.linear(x.view(2, 4, 64), w8).view(8, 32), want)
    bias = torch.randn(32, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(torch.nn.functional.linear(x, w8, bias), by_hand(x, w.t(), torch.bfloat16, bias, fast=True))
    one = bias[:1]  # broadcast, as torch.addmm broadcasts it
    assert torch.equal(torch.addmm(one, x, w8.t()), want + one)
    with pytest.raises(TypeError, match="cast the bias to torch.bfloat16"):  # torch.addmm refuses two dtypes too
        torch.addmm(bias.float(), x, w8.t())


def test_to_float8_of_a_tensor_that_requires_grad_is_refused_under_grad_mode():
    """The cast is not differentiable: to_float8 of a weight that requires grad returned a Float8Tensor
    without a gradient path, silently. Now a RuntimeError naming the ways out; under no_grad, or of
    a detached tensor, it runs (the same bits); the op table's on-the-fly cast of a plain operand that
    requires grad still runs (below autograd)."""
    w = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    for granularity in ("tensorwise", "rowwise", "blockwise"):
        with pytest.raises(RuntimeError, match="requires grad.*torch.no_grad\\(\\) or on x.detach\\(\\)"):
            to_float8(w, granularity=granularity)
    with torch.no_grad():
        kept = to_float8(w)
    assert torch.equal(kept._data.view(torch.uint8), to_float8(w.detach())._data.view(torch.uint8))
    x8 = q(torch.randn(16, 64))
    out = torch.mm(x8, w.t())  # w quantized on the fly inside the op table
    assert out.shape == (16, 32)


def test_scaled_mm_refuses_what_cuda_refuses():
    a = q(torch.randn(32, 64), float8_dtype=torch.float8_e5m2)
    with pytest.raises(TypeError, match="e5m2 x float8_e5m2"):
        scaled_mm(a, q(torch.randn(64, 32), float8_dtype=torch.float8_e5m2, layout="col"))
    # the @ operator shows the same message (torch.Tensor's turned it into "unsupported operand type(s)")
    b = q(torch.randn(32, 64), float8_dtype=torch.float8_e5m2)
    with pytest.raises(TypeError, match="e5m2 x float8_e5m2"):
        a @ b.t()
    with pytest.raises(TypeError, match="e5m2 x float8_e5m2"):
        b.t().__rmatmul__(a)  # what Python calls when the left operand's __matmul__ declines
    x, w = q(torch.randn(32, 64)), q(torch.randn(32, 64))
    assert torch.equal(x @ w.t(), torch.matmul(x, w.t()))
    with pytest.raises(ValueError, match="N divisible by 16"):
        scaled_mm(q(torch.randn(32, 64)), q(torch.randn(64, 40), layout="col"))
    # cuBLAS writes no float64 (docs/data/scaled_mm_out_dtype_h100.txt), though the CPU's _scaled_mm does
    from f8tensor.core.ops import scaled_mm_data
    x, w, one = q(torch.randn(32, 64)), q(torch.randn(64, 32), layout="col"), torch.ones((), device=DEVICE)
    with pytest.raises(TypeError, match="tensorwise _scaled_mm writes .* asked for torch.float64"):
        scaled_mm_data(x._data, one, w._data, one, torch.float64, False, Float8Config())
    assert scaled_mm_data(x._data, one, w._data, one, torch.float32, False, Float8Config()).dtype == torch.float32


@pytest.mark.parametrize("K", [8, 40, 1])
def test_inner_dim_not_multiple_of_16_is_padded_exactly(K):
    a, b = q(torch.randn(32, K)), q(torch.randn(K, 48), layout="col")
    want = (a._data.double() * a._scale.double()) @ (b._data.double() * b._scale.double())
    # fast accumulation on the GPU keeps fewer bits; a misplaced pad would be off by O(1)
    assert torch.allclose(scaled_mm(a, b).double(), want, rtol=1e-3, atol=1e-3 * want.abs().max())
    with pytest.raises(ValueError, match=r"\[M, K\] @ \[K, N\]"):
        scaled_mm(q(torch.randn(32, 64)), q(torch.randn(32, 64), layout="col"))


def test_fast_accum_follows_the_gemm_role():
    calls = []
    real = torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append(kwargs["use_fast_accum"])
        return real(*args, **kwargs)

    cfg = Float8Config(fast_accum_output=True, fast_accum_grad_input=False, fast_accum_grad_weight=True)
    x = q(torch.randn(32, 64), role=GemmRole.INPUT, config=cfg)
    w = q(torch.randn(48, 64), role=GemmRole.WEIGHT, config=cfg)
    g = q(torch.randn(32, 48), role=GemmRole.GRAD_OUTPUT, config=cfg, float8_dtype=torch.float8_e5m2)
    torch._scaled_mm = spy
    try:
        torch.mm(x, w.t())
        torch.mm(g, w)
        torch.mm(g.t(), x)
    finally:
        torch._scaled_mm = real
    assert calls == [True, False, True]


def test_emulate_matches_dequantized_matmul():
    cfg = Float8Config(emulate=True)
    a, b = q(torch.randn(32, 64), config=cfg), q(torch.randn(64, 48), config=cfg, layout="col")
    assert torch.allclose(scaled_mm(a, b), a.dequantize() @ b.dequantize(), rtol=1e-5, atol=1e-5)


def test_gpus_without_float8_get_a_clear_error_or_emulation(monkeypatch):
    import f8tensor.core.ops as ops_mod

    a, b = q(torch.randn(32, 64)), q(torch.randn(64, 48), layout="col")
    emulated = scaled_mm(q(torch.randn(32, 64), config=Float8Config(emulate=True)), b)
    assert emulated.shape == (32, 48)
    # Pretend the tensors sit on a pre-Ada GPU: the real GEMM must refuse, naming the fix.
    monkeypatch.setattr(ops_mod, "has_float8_hardware", lambda device: False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(RuntimeError, match="A100 has no float8 matrix multiply.*emulate=True"):
        scaled_mm(a, b)
