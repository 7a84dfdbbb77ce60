"""f8tensor.RMSNorm: the fused kernels against their reference, the amax record handed to the
float8 layers after the norm (fewer amax passes, same bits), the module as a drop-in nn.RMSNorm,
where PyTorch's own rms_norm runs instead, and the conversion that swaps it in.

The kernels run on the GPU, or in the interpreter on CPU. The interpreter truncates fp32 to
bf16/fp16 instead of rounding, and the kernels sum a row in another order than the reference, so
values are checked to within one unit in the last place of the reference plus 2^-20 of the
magnitude of the terms (fp32 outputs carry rstd's rounding; where the input gradient's two terms
cancel, fp32 rounding of the terms decides); on the GPU at most 0.1 % of bf16/fp16 outputs may differ at all. The amax record is
checked exactly. On CPU the module itself runs the reference: the tests of the module there test
its autograd wrapper, its record and its fallbacks.
"""

import pytest
import torch
import torch.nn.functional as F
from f8utils import DEVICE, HP_DTYPES, count_amax_passes, ignore_records, sqnr, train_step
from torch import nn

from f8tensor import Float8Linear, RMSNorm, conversion_summary, convert_to_float8_training, fuse_model_ops
from f8tensor.kernels import _as_amax_value, amax_ref, rms_norm_backward_ref, rms_norm_ref, rms_norm_triton
from f8tensor.core.tensor_cache import produced_amax

ON_GPU = DEVICE.type == "cuda"
needs_triton = pytest.mark.skipif(rms_norm_triton is None, reason="needs triton")
# [rows..., D]: a single row, D not a power of two, rows not a multiple of the block of rows, a 3-D input.
SHAPES = [(1, 16), (37, 100), (5, 4096), (2, 9, 64)] + ([(8192, 4096), (3, 16384)] if ON_GPU else [])
EPS = 1e-5


def ulp(ref):
    return torch.nextafter(ref.abs(), torch.full_like(ref, float("inf"))).double() - ref.double().abs()


def assert_close(out, ref, terms, elementwise=True):
    """|out - ref| <= one unit in the last place of ref + 2^-20 * terms; on the GPU at most 0.1 %
    of bf16/fp16 elements differ at all where each is computed from its own row (not the weight
    gradient: sums over every row, in another order)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    o, r = out.double(), ref.double()
    bad = ((o - r).abs() > ulp(ref) + 2**-20 * terms.double()) & ~(o.isnan() & r.isnan())
    assert not bad.any(), f"{int(bad.sum())} of {out.numel()} beyond tolerance, e.g. {o[bad][:3]} vs {r[bad][:3]}"
    if ON_GPU and out.dtype != torch.float32 and elementwise:
        differ = int((o != r).sum()) - int((o.isnan() & r.isnan()).sum())
        assert differ <= max(1, out.numel() // 1000), f"{differ} of {out.numel()} differ"


def backward_terms(g, x, weight, rstd):
    """Magnitudes of the terms of dx = rstd (gw - x_hat mean(gw x_hat)) and of dweight's sums."""
    x_hat = x.double() * rstd.double().unsqueeze(-1)
    gw = g.double() * (1 if weight is None else weight.double())
    dx = rstd.double().unsqueeze(-1) * (gw.abs() + x_hat.abs() * (gw * x_hat).abs().mean(-1, keepdim=True))
    dw = (g.double() * x_hat).abs().reshape(-1, x.shape[-1]).sum(0)
    return dx, dw


def assert_record_is_amax_of(record, t):
    got, want = _as_amax_value(record), amax_ref(t)
    assert torch.equal(got, want) or (got.isnan() and want.isnan()), (got, want)


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    weight = 1 + 0.5 * torch.randn(shape[-1], generator=g)
    grad = torch.randn(shape, generator=g) * 1e-3
    return x.to(DEVICE, dtype), weight.to(DEVICE, dtype), grad.to(DEVICE, dtype)


@pytest.mark.parametrize("affine", [True, False])
def test_reference_is_rms_norm_and_its_derivative(affine):
    x, w, g = (t.double() for t in inputs((6, 5, 48), torch.float32))
    w = w if affine else None
    x.requires_grad_()
    if affine:
        w.requires_grad_()
    y = F.rms_norm(x, (48,), w, EPS)
    want = torch.autograd.grad(y, (x, w) if affine else (x,), g)
    y_ref, rstd = rms_norm_ref(x.detach().float(), None if w is None else w.detach().float(), EPS)
    torch.testing.assert_close(y_ref.double(), y.detach(), rtol=1e-6, atol=1e-6)
    got = rms_norm_backward_ref(g.float(), x.detach().float(), None if w is None else w.detach().float(), rstd)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-9)
    if affine:
        torch.testing.assert_close(got[1].double(), want[1], rtol=1e-5, atol=1e-8)
    else:
        assert got[1] is None


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", HP_DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("blocks", [dict(rows=2, num_warps=4, num_programs=3), {}], ids=["two_rows", "default"])
@pytest.mark.parametrize("eps", [EPS, 0.0])
def test_kernels_match_the_reference_and_record_their_amax(shape, dtype, affine, blocks, eps):
    """eps = 0 too: rows past the end (x = 0 there) must not put their 0 * inf = NaN into the record."""
    from f8tensor.kernels.rms_norm import rms_norm_backward_triton

    x, w, g = inputs(shape, dtype)
    w = w if affine else None
    y, rstd, record = rms_norm_triton(x, w, eps, **blocks)
    y_ref, rstd_ref = rms_norm_ref(x, w, eps)
    assert rstd.shape == shape[:-1] and rstd.dtype == torch.float32
    torch.testing.assert_close(rstd, rstd_ref, rtol=2**-20, atol=0)
    assert_close(y, y_ref, y_ref.abs())  # fp32: rstd's own rounding (a few units) carries over
    assert_record_is_amax_of(record, y)
    dx, dw = rms_norm_backward_triton(g, x, w, rstd, **blocks)
    dx_ref, dw_ref = rms_norm_backward_ref(g, x, w, rstd)
    dx_terms, dw_terms = backward_terms(g, x, w, rstd)
    assert_close(dx, dx_ref, dx_terms)
    if affine:
        assert_close(dw, dw_ref, dw_terms, elementwise=False)
    else:
        assert dw is None


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", HP_DTYPES)
def test_kernels_in_hugging_faces_form_match_the_reference(shape, dtype):
    """cast_before_weight: x * rstd rounded to x's dtype, then times the weight and rounded again.
    Where the kernel's rstd moves the normalized value across a rounding boundary, the output moves
    by the weight times one unit in the last place of that value, beyond one of its own."""
    from f8tensor.kernels.rms_norm import rms_norm_backward_triton

    x, w, g = inputs(shape, dtype)
    y, rstd, record = rms_norm_triton(x, w, EPS, cast_before_weight=True)
    y_ref, rstd_ref = rms_norm_ref(x, w, EPS, cast_before_weight=True)
    normalized = (x.float() * rstd_ref.unsqueeze(-1)).to(dtype)
    assert_close(y, y_ref, y_ref.abs() + 2**20 * (w.double().abs() * ulp(normalized)))
    assert_record_is_amax_of(record, y)
    dx, dw = rms_norm_backward_triton(g, x, w, rstd, cast_before_weight=True)
    dx_ref, dw_ref = rms_norm_backward_ref(g, x, w, rstd, cast_before_weight=True)
    dx_terms, dw_terms = backward_terms(g, x, w, rstd)
    gw_ulp = ulp((g.float() * w.float()).to(dtype)).double()  # gw rounded to x's dtype
    assert_close(dx, dx_ref, dx_terms + 2**20 * rstd.double().unsqueeze(-1) * gw_ulp)
    products = (g.double() * normalized.double()).abs().reshape(-1, shape[-1])
    assert_close(dw, dw_ref, dw_terms + 2**20 * ulp(products.to(dtype)).sum(0), elementwise=False)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []), ids=str)
def test_kernels_round_where_hugging_faces_form_rounds(dtype):
    """The output, the input gradient and the weight gradient of the kernels in Hugging Face's form
    are that form's, not nn.RMSNorm's: elementwise they agree with the cast-before-weight reference
    far more often than with the one-rounding one (which the bounds above could not tell apart).
    bfloat16 on the GPU only: the interpreter's stores to bfloat16 mis-round."""
    from f8tensor.kernels.rms_norm import rms_norm_backward_triton

    x, w, g = inputs((64, 1024), dtype)
    g = g * 1e3
    y, rstd, _ = rms_norm_triton(x, w, EPS, cast_before_weight=True)
    dx, dw = rms_norm_backward_triton(g, x, w, rstd, cast_before_weight=True)
    for got, (cast, plain) in ((y, (rms_norm_ref(x, w, EPS, True)[0], rms_norm_ref(x, w, EPS)[0])),
                               (dx, (rms_norm_backward_ref(g, x, w, rstd, True)[0], rms_norm_backward_ref(g, x, w, rstd)[0])),
                               (dw, (rms_norm_backward_ref(g, x, w, rstd, True)[1], rms_norm_backward_ref(g, x, w, rstd)[1]))):
        same_as_cast, same_as_plain = (got == cast).float().mean(), (got == plain).float().mean()
        assert same_as_cast > 0.9 and same_as_cast > same_as_plain + 0.1, (same_as_cast, same_as_plain)


def test_reference_in_hugging_faces_form_is_its_llama_norm_and_derivative():
    """rms_norm_ref with cast_before_weight is, bit for bit, what Hugging Face's LlamaRMSNorm code
    computes in eager PyTorch (CPU); rms_norm_backward_ref what autograd gives for it, the same
    terms summed in another order."""
    x, w, g = (t.cpu() for t in inputs((6, 5, 48), torch.bfloat16))
    x.requires_grad_(), w.requires_grad_()
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    y = w * h.to(x.dtype)
    want_dx, want_dw = torch.autograd.grad(y, (x, w), g)
    got, rstd = rms_norm_ref(x.detach(), w.detach(), EPS, cast_before_weight=True)
    assert torch.equal(got, y.detach())
    dx, dw = rms_norm_backward_ref(g, x.detach(), w.detach(), rstd, cast_before_weight=True)
    torch.testing.assert_close(dx, want_dx, rtol=2**-7, atol=0)  # dx: autograd's reductions in another order
    torch.testing.assert_close(dw, want_dw, rtol=2**-7, atol=0)


@needs_triton
def test_kernels_propagate_nan_and_inf_into_the_record():
    """A NaN in a row makes that row NaN; an inf makes rstd 0 and its own place NaN (inf * 0), as
    in PyTorch. The record says so: the float8 layer reading y gets a NaN scale, as its own amax
    pass would give it."""
    for bad in (float("nan"), float("inf")):
        x, w, _ = inputs((4, 300), torch.bfloat16)
        x[2, 17] = bad
        y, _, record = rms_norm_triton(x, w, EPS)
        assert_record_is_amax_of(record, y)
        assert _as_amax_value(record).isnan()
        assert torch.equal(y.isnan(), F.rms_norm(x.float(), (300,), w.float(), EPS).isnan())
        assert y[2, 17].isnan() and not y[[0, 1, 3]].isnan().any()


def norms(dtype, dim=64, eps=EPS, affine=True):
    torch.manual_seed(0)
    ref = nn.RMSNorm(dim, eps=eps, elementwise_affine=affine).to(DEVICE, dtype)
    if affine:
        nn.init.normal_(ref.weight, 1.0, 0.5)
    fused = RMSNorm.from_norm(nn.RMSNorm(dim, eps=eps, elementwise_affine=affine).to(DEVICE, dtype))
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def forward_backward(norm, x, g):
    x = x.detach().requires_grad_()
    y = norm(x)
    y.backward(g)
    out = [y.detach(), x.grad] + ([norm.weight.grad] if norm.weight is not None else [])
    if norm.weight is not None:
        norm.weight.grad = None
    return y, out


@pytest.mark.parametrize("dtype", HP_DTYPES)
@pytest.mark.parametrize("eps", [EPS, None])
@pytest.mark.parametrize("affine", [True, False])
def test_module_is_nn_rms_norm_within_rounding(dtype, eps, affine):
    """Values and gradients of nn.RMSNorm's (eps=None: the fp32 epsilon, as PyTorch's kernel uses
    for every input dtype), through the fused path."""
    ref, fused = norms(dtype, eps=eps, affine=affine)
    x, _, g = inputs((3, 5, 64), dtype)
    y, got = forward_backward(fused, x, g)
    assert "RMSNormFn" in type(y.grad_fn).__name__
    _, want = forward_backward(ref, x, g)
    rstd = rms_norm_ref(x, fused.weight, torch.finfo(torch.float32).eps if eps is None else eps)[1]
    dx_terms, dw_terms = backward_terms(g, x, fused.weight, rstd)
    # Against PyTorch's kernel: one more unit in the last place (each is within one of the exact
    # value in bf16/fp16) and, in fp32, both kernels' rounding of rstd (2^-20 relative).
    assert_close(got[0], want[0], ulp(want[0]) * 2**20 + want[0].abs())
    assert_close(got[1], want[1], dx_terms + ulp(want[1]) * 2**20)
    if affine:
        assert_close(got[2], want[2], dw_terms + ulp(want[2]) * 2**20, elementwise=False)


def test_from_norm_keeps_parameters_state_dict_hooks_and_mode():
    mod = nn.RMSNorm(32, eps=1e-6).to(DEVICE)
    mod.eval()
    calls = []
    handle = mod.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    new = RMSNorm.from_norm(mod)
    assert new.weight is mod.weight and new.eps == 1e-6 and new.normalized_shape == (32,)
    assert not new.training and new.elementwise_affine
    assert list(new.state_dict()) == list(mod.state_dict()) == ["weight"]
    new(torch.randn(2, 32, device=DEVICE))
    assert calls == ["RMSNorm"] and isinstance(new, RMSNorm)
    handle.remove()
    new(torch.randn(2, 32, device=DEVICE))
    assert calls == ["RMSNorm"]
    bare = RMSNorm.from_norm(nn.RMSNorm(32, elementwise_affine=False))
    assert bare.weight is None and not bare.elementwise_affine and list(bare.state_dict()) == []


def test_empty_input_gives_empty_output_and_zero_weight_grad():
    _, fused = norms(torch.bfloat16)
    x = torch.randn(0, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = fused(x)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(fused.weight.grad, torch.zeros_like(fused.weight))


def fell_back(y):
    return "RMSNormFn" not in type(y.grad_fn).__name__


def test_cases_the_kernels_do_not_cover_run_pytorchs_rms_norm():
    """Each runs F.rms_norm itself: the same bits as nn.RMSNorm."""
    ref, fused = norms(torch.float32)
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):  # autocast decides the norm's dtype
        y = fused(x)
        assert fell_back(y) and torch.equal(y, ref(x))
    y = fused(x.to(torch.bfloat16))  # weight of another dtype than x
    assert fell_back(y) and torch.equal(y, ref(x.to(torch.bfloat16)))
    two = nn.RMSNorm((4, 16)).to(DEVICE)  # normalized over two dims
    y = RMSNorm.from_norm(two)(x.view(4, 4, 16))
    assert fell_back(y) and torch.equal(y, two(x.view(4, 4, 16)))
    strided = torch.randn(64, 2, device=DEVICE)[:, 0]  # a weight the kernels cannot read as [D]
    ref.weight, fused.weight = nn.Parameter(strided.clone()), nn.Parameter(strided)
    y = fused(x)
    assert fell_back(y) and torch.equal(y, ref(x))


def test_wrong_weight_shape_gets_pytorchs_error():
    _, fused = norms(torch.float32)
    fused.weight = nn.Parameter(torch.ones(1, device=DEVICE))
    with pytest.raises(RuntimeError, match="same shape as normalized_shape"):
        fused(torch.randn(4, 64, device=DEVICE))


def test_zero_width_rows():
    """nn.RMSNorm(0) runs; so does the fused module, forward and backward."""
    ref, fused = norms(torch.float32, dim=0)
    x = torch.randn(3, 0, device=DEVICE, requires_grad=True)
    y = fused(x)
    assert y.shape == (3, 0) and torch.equal(y, ref(x))
    y.sum().backward()
    assert x.grad.shape == (3, 0) and fused.weight.grad.shape == (0,)


@pytest.mark.skipif(not ON_GPU, reason="the row-length limit is the GPU kernel's")
def test_rows_longer_than_the_kernel_holds_run_pytorchs_rms_norm():
    from f8tensor.kernels.limits import RMS_NORM_MAX_D as MAX_D

    ref, fused = norms(torch.bfloat16, dim=MAX_D + 16)
    x = torch.randn(2, MAX_D + 16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = fused(x)
    assert fell_back(y) and torch.equal(y, ref(x))


def test_wrong_input_size_or_device_gets_pytorchs_error():
    _, fused = norms(torch.float32)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        fused(torch.randn(4, 32, device=DEVICE))
    if ON_GPU:
        with pytest.raises(RuntimeError, match="device"):
            fused(torch.randn(4, 64))


@pytest.mark.skipif(not ON_GPU, reason="CUDA's sync debug mode")
def test_no_host_sync_in_forward_and_backward():
    _, fused = norms(torch.bfloat16, dim=4096)
    x = torch.randn(2048, 4096, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    fused(x).sum().backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused(x).backward(torch.ones(2048, 4096, device=DEVICE, dtype=torch.bfloat16))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_tensor_subclasses_and_transforms_get_pytorchs_rms_norm():
    """DTensor under sequence parallelism (a subclass, here TwoTensor), torch.func transforms and
    forward-mode AD: F.rms_norm, which has their rules."""
    import torch.autograd.forward_ad as fwAD
    from torch.testing._internal.two_tensor import TwoTensor

    ref, fused = norms(torch.float32)
    x, _, t = inputs((8, 64), torch.float32)
    y = fused(TwoTensor(x, x.clone()))
    assert isinstance(y, TwoTensor) and torch.equal(y.a, ref(x))
    params = dict(fused.named_parameters())
    got = torch.func.grad(lambda v: torch.func.functional_call(fused, params, (v,)).square().sum())(x)
    torch.testing.assert_close(got, torch.func.grad(lambda v: ref(v).square().sum())(x))
    torch.testing.assert_close(torch.func.vmap(fused)(x.view(2, 4, 64)), ref(x.view(2, 4, 64)))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fused(fwAD.make_dual(x, t))).tangent
    torch.testing.assert_close(tangent, torch.func.jvp(ref, (x,), (t,))[1])


def test_double_backward_goes_through_plain_ops():
    ref, fused = norms(torch.float32)
    x, _, g = inputs((4, 64), torch.float32)
    g = g * 1e3  # unit scale: the second derivative's terms cancel, fp32 rounding of tiny ones would decide
    grads = []
    for norm in (fused, ref):
        v = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad(norm(v), (v,), g, create_graph=True)
        grads.append(torch.autograd.grad(dx.square().sum(), (v, norm.weight)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_inference_mode_and_no_grad():
    _, fused = norms(torch.bfloat16)
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    want = fused(x)
    with torch.no_grad():
        assert torch.equal(fused(x), want)
    with torch.inference_mode():  # inference tensors: nothing is remembered, nothing fails
        y = fused(x)
        assert torch.equal(y, want) and produced_amax.get(y) is None


def test_under_compile_it_is_pytorchs_rms_norm():
    """fullgraph compiles (no graph break) and gives what compiling nn.RMSNorm gives, bit for bit."""
    ref, fused = norms(torch.bfloat16)
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    got = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, torch.compile(ref, fullgraph=True, backend="aot_eager")(x))


class Block(nn.Module):
    """A norm feeding q/k/v and a norm feeding w1/w3, as in a transformer block."""

    def __init__(self, dim=64, ffn=128):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim, eps=EPS), nn.RMSNorm(dim, eps=EPS)
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.w1, self.w3 = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.wq(h) * self.wk(h).sigmoid() + self.wv(h)
        h = self.norm2(x)
        return self.w1(h) * self.w3(h)


def float8_block(fuse_rms_norm=True):
    torch.manual_seed(0)
    block = Block().to(DEVICE, torch.bfloat16)
    for norm in (block.norm1, block.norm2):
        nn.init.normal_(norm.weight, 1.0, 0.3)
    convert_to_float8_training(block, module_filter_fn=lambda mod, fqn: True)
    fuse_model_ops(block, rms_norm=fuse_rms_norm)
    return block


def test_float8_layers_use_the_norms_records_same_bits_fewer_passes(monkeypatch):
    """q/k/v and w1/w3 read the norms' outputs: they skip those two amax passes (forward: five
    weights + 2 inputs = 7 passes without records, 5 with), and give the bits they give when they
    measure the amax themselves."""
    passes = count_amax_passes(monkeypatch)
    block = float8_block()
    x = torch.randn(2, 16, 64, device=DEVICE, dtype=torch.bfloat16)
    counts = []
    for use_records in (True, False):
        if not use_records:
            ignore_records(monkeypatch)
        passes.clear()
        with torch.no_grad():
            block(x)
        counts.append(sum(passes))
    assert counts == [5, 7]
    monkeypatch.undo()
    with_records = train_step(block, x)
    ignore_records(monkeypatch)
    for got, want in zip(with_records, train_step(block, x)):
        assert torch.equal(got, want)


def test_a_record_is_not_used_after_an_in_place_write(monkeypatch):
    block = float8_block()
    h = block.norm1(torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16))
    h.mul_(3)  # the record is of the old values
    passes = count_amax_passes(monkeypatch)
    out = block.wq(h)
    assert passes == [True, True]  # h's amax measured again, and the weight's
    ignore_records(monkeypatch)
    assert torch.equal(out, block.wq(h.clone()))


def test_fused_norms_train_like_pytorchs():
    """Against the bf16 block, float8 with fused norms is within 0.5 dB of float8 with PyTorch's
    norms (SQNR of the output and every gradient)."""
    x = torch.randn(4, 32, 64, device=DEVICE, dtype=torch.bfloat16)
    torch.manual_seed(0)
    bf16 = Block().to(DEVICE, torch.bfloat16)
    for norm in (bf16.norm1, bf16.norm2):
        nn.init.normal_(norm.weight, 1.0, 0.3)
    ref = train_step(bf16, x)
    fused, plain = train_step(float8_block(True), x), train_step(float8_block(False), x)
    for f, p, r in zip(fused, plain, ref):
        assert sqnr(r, f) > sqnr(r, p) - 0.5 and sqnr(r, f) > 15


def test_fusion_swaps_rms_norms_and_says_so():
    """An nn.RMSNorm becomes f8tensor.RMSNorm; a subclass that keeps nn.RMSNorm's forward takes
    RMSNorm's in place (the same object, its own methods kept); one that overrides it is kept."""
    class MyNorm(nn.RMSNorm):
        def scale(self):
            return self.weight.mean()

    class OwnForward(nn.RMSNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.RMSNorm(64), nn.Linear(64, 64), MyNorm(64), OwnForward(64))
    weight, mine = model[0].weight, model[2]
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: False)
    assert type(model[0]) is nn.RMSNorm  # conversion converts linear layers only
    report = fuse_model_ops(model)
    assert type(model[0]) is RMSNorm and model[0].weight is weight and type(model[3]) is OwnForward
    assert model[2] is mine and isinstance(mine, RMSNorm) and isinstance(mine, MyNorm)
    assert type(mine).__name__ == "MyNorm" and torch.equal(mine.scale(), mine.weight.mean())
    assert type(model[1]) is nn.Linear
    assert conversion_summary(model).splitlines() == [
        "f8tensor: 0 of 1 linear layers in float8",
        "  1      64->64       kept: excluded by module_filter_fn",
    ]
    assert str(report).splitlines() == [
        "f8tensor fusion: rms_norm 2 of 3",
        "  0      rms_norm  RMSNorm fused",
        "  2      rms_norm  RMSNorm fused",
        "  3      rms_norm  RMSNorm not swapped: OwnForward: overrides forward (OwnForward.forward), which "
        "f8tensor's layer would replace",
    ]
    assert str(fuse_model_ops(model)) == str(report) and type(model[0]) is RMSNorm  # twice: no-op
    kept = nn.Sequential(nn.RMSNorm(64))
    fuse_model_ops(kept, rms_norm=False)
    assert type(kept[0]) is nn.RMSNorm
    root = nn.RMSNorm(64)  # the model itself is not replaced, and the report says so
    assert "the model itself is an nn.RMSNorm" in str(fuse_model_ops(root)) and type(root) is nn.RMSNorm
    wide = nn.Sequential(nn.RMSNorm(16400))  # longer rows than the kernel holds
    assert str(fuse_model_ops(wide)).splitlines()[1].endswith(
        "RMSNorm: PyTorch's kernel runs on CUDA (the fused one takes rows of at most 16384)")
    two_dims = nn.Sequential(nn.RMSNorm((4, 16)))
    assert str(fuse_model_ops(two_dims)).splitlines()[1].endswith(
        "RMSNorm: PyTorch's kernel runs (the fused one normalizes one dim)")


def test_the_swap_keeps_the_module_itself():
    """In place: the same object, so its buffers, attributes, eval mode, references to it, every
    name it is registered under and load_state_dict pre-hooks (which hold it weakly) stay."""
    import gc

    norm = nn.RMSNorm(64).to(DEVICE)
    norm.register_buffer("scale", torch.ones(1, device=DEVICE))
    norm.tag, seen = "attention", []
    norm.register_load_state_dict_pre_hook(lambda mod, state, prefix, *args: seen.append(type(mod)))
    norm.eval()
    parent = nn.Module()
    parent.a = parent.b = norm  # registered twice
    model = nn.Sequential(parent)
    state = model.state_dict()
    report = fuse_model_ops(model)
    assert str(report).splitlines() == ["f8tensor fusion: rms_norm 1 of 1", "  0.a    rms_norm  RMSNorm fused"]
    gc.collect()
    assert parent.a is parent.b is norm and type(norm) is RMSNorm
    assert norm.tag == "attention" and not norm.training and list(norm.state_dict()) == ["weight", "scale"]
    model.load_state_dict(state)
    assert seen == [RMSNorm, RMSNorm]  # once under each name
    assert set(vars(RMSNorm(8))) == set(vars(nn.RMSNorm(8)))  # no state of its own, so none to set


def test_a_norm_with_its_own_forward_on_the_instance_is_kept_with_the_reason():
    norm = nn.RMSNorm(64)
    norm.forward = lambda x: x
    model = nn.Sequential(norm)
    report = fuse_model_ops(model)
    assert type(norm) is nn.RMSNorm and str(report).splitlines()[1].endswith(
        "RMSNorm not swapped: RMSNorm: the module has an instance-level forward")


def test_a_pruned_norm_runs_fused_through_its_mask():
    """Pruning makes weight a tensor computed before each forward (weight_orig * weight_mask): the
    swapped norm runs fused with it, the gradient reaching weight_orig."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    norm, ref = nn.RMSNorm(64).to(DEVICE, torch.bfloat16), nn.RMSNorm(64).to(DEVICE, torch.bfloat16)
    nn.init.normal_(norm.weight, 1.0, 0.5)
    prune.l1_unstructured(norm, "weight", amount=0.5)
    fuse_model_ops(nn.Sequential(norm))
    assert type(norm) is RMSNorm and list(norm.state_dict()) == ["weight_orig", "weight_mask"]
    x, _, g = inputs((4, 64), torch.bfloat16)
    y = norm(x)
    y.backward(g)
    assert not fell_back(y)
    ref.weight.data.copy_(norm.weight)
    want = ref(x)
    want.backward(g)
    assert_close(y.detach(), want.detach(), ulp(want) * 2**20 + want.abs())
    assert torch.equal(norm.weight_orig.grad != 0, ref.weight.grad * norm.weight_mask != 0)  # masked out: none
    # the values: the written norm's weight gradient through the mask (a sum over rows, in another order)
    torch.testing.assert_close(norm.weight_orig.grad, ref.weight.grad * norm.weight_mask, rtol=2**-7, atol=1e-6)
    with pytest.raises(TypeError, match="computed Tensor, not a Parameter .*fuse_model_ops"):
        RMSNorm.from_norm(norm)
