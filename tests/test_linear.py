"""Float8Linear: numerics (SQNR, exact parity with _scaled_mm by hand), modes, nn.Linear compatibility."""

import pytest
import torch
from f8utils import DEVICE, skip_rowwise_without_cpu_gemm, sqnr
from torch import nn

from f8tensor import Float8Config, Float8Linear
from f8tensor.kernels import quantize_ref
from f8tensor.core.tensor_cache import shared_input


def pair(bias=True, in_f=256, out_f=512, dtype=torch.float32, config=None):
    ref = nn.Linear(in_f, out_f, bias=bias, device=DEVICE, dtype=dtype)
    f8 = Float8Linear(in_f, out_f, bias=bias, device=DEVICE, dtype=dtype, config=config)
    f8.load_state_dict(ref.state_dict())
    return ref, f8


def run(mod, x, grad):
    x = x.detach().clone().requires_grad_()
    out = mod(x)
    out.backward(grad)
    return out, x.grad, mod.weight.grad, None if mod.bias is None else mod.bias.grad


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sqnr_against_fp32_reference(bias, dtype):
    ref, f8 = pair(bias, dtype=dtype)
    ref = ref.float()
    x = torch.randn(4, 128, 256, device=DEVICE)
    grad = torch.randn(4, 128, 512, device=DEVICE)
    want = run(ref, x, grad)
    got = run(f8, x.to(dtype), grad.to(dtype))
    assert got[0].shape == (4, 128, 512) and got[0].dtype == dtype
    assert sqnr(want[0], got[0]) >= 25
    assert sqnr(want[1], got[1]) >= 20
    assert sqnr(want[2], got[2]) >= 20
    if bias:  # the bias gradient is a plain sum: only rounding to the parameter dtype
        assert sqnr(want[3], got[3]) >= 40


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_parity_with_scaled_mm_by_hand(bias, dtype):
    ref, f8 = pair(bias, dtype=dtype)
    x = torch.randn(4, 128, 256, device=DEVICE, dtype=dtype)
    grad = torch.randn(4, 128, 512, device=DEVICE, dtype=dtype)
    out, gx, gw, _ = run(f8, x, grad)
    cfg = f8.config
    x_row, x_col, sx = quantize_ref(x.view(-1, 256), cfg.forward_dtype, "both")
    w_row, w_col, sw = quantize_ref(f8.weight.detach(), cfg.forward_dtype, "both")
    g_row, g_col, sg = quantize_ref(grad.view(-1, 512), cfg.backward_dtype, "both")
    b = f8.bias if bias and dtype != torch.float32 else None
    want = torch._scaled_mm(x_row, w_row.t(), sx, sw, bias=b, out_dtype=dtype, use_fast_accum=True)
    if bias and dtype == torch.float32:
        want = want + f8.bias
    assert torch.equal(out.view(-1, 512), want)
    assert torch.equal(gx.view(-1, 256), torch._scaled_mm(g_row, w_col, sg, sw, out_dtype=dtype))
    assert torch.equal(gw, torch._scaled_mm(g_col.t(), x_col, sg, sx, out_dtype=dtype))


@pytest.mark.parametrize("recipe, flags", [
    ("tensorwise", (True, False, False)), ("tensorwise", (False, True, True)),
    ("rowwise", (True, False, False)), ("rowwise", (False, True, True)), ("blockwise", (False, False, False))],
    ids=["tensorwise-default", "tensorwise-flipped", "rowwise-default", "rowwise-flipped", "blockwise"])
def test_each_gemm_gets_its_configured_fast_accumulation(recipe, flags, monkeypatch):
    """Float8Linear's forward, grad_input and grad_weight GEMMs pass the config's fast_accum_output,
    fast_accum_grad_input and fast_accum_grad_weight to _scaled_mm (CPU's kernel gives the same
    bits either way, so only the flags show it); blockwise GEMMs have none (its config refuses it)."""
    skip_rowwise_without_cpu_gemm(recipe, DEVICE.type)
    config = Float8Config.from_recipe_name(recipe).replace(
        fast_accum_output=flags[0], fast_accum_grad_input=flags[1], fast_accum_grad_weight=flags[2])
    tokens, in_f, out_f = (256, 384, 128) if recipe == "blockwise" else (32, 64, 48)
    f8 = Float8Linear(in_f, out_f, device=DEVICE, dtype=torch.bfloat16, config=config)
    calls, inner = {}, torch._scaled_mm

    def recording(a, b, *args, use_fast_accum=False, **kwargs):
        # the GEMM's role by its output's shape: [tokens, out_f], [tokens, in_f], [out_f, in_f]
        role = {(tokens, out_f): "output", (tokens, in_f): "grad_input", (out_f, in_f): "grad_weight"}[
            (a.shape[0], b.shape[1])]
        calls.setdefault(role, []).append(use_fast_accum)
        return inner(a, b, *args, use_fast_accum=use_fast_accum, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    run(f8, torch.randn(tokens, in_f, device=DEVICE, dtype=torch.bfloat16),
        torch.randn(tokens, out_f, device=DEVICE, dtype=torch.bfloat16))
    assert calls == {"output": [flags[0]], "grad_input": [flags[1]], "grad_weight": [flags[2]]}


def test_backward_saves_float8_or_high_precision_as_configured():
    for save_fp8 in (True, False):
        _, f8 = pair(config=Float8Config(save_fp8_for_backward=save_fp8))
        x = torch.randn(64, 256, device=DEVICE, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            f8(x)
        saved = [t for t in saved if t is not None]
        # The weight is saved as the parameter itself (no copy), and cast again in backward with
        # forward's amax record (4 bytes of fp32 on the reference path, a few hundred int32
        # partials on the GPU); nothing of the size of the weight is saved besides it.
        if save_fp8:
            x_saved, x_scale, w_saved, w_amax = saved
            assert x_saved.dtype == torch.float8_e4m3fn and x_saved.shape == (64, 256)
            assert x_saved.stride() == (1, 64)  # column-major: the grad-weight GEMM's operand
            assert x_scale.dtype == torch.float32 and x_scale.numel() == 1
        else:
            # x itself, and its amax record: backward casts it again with forward's scale
            x_saved, x_amax, w_saved, w_amax = saved
            assert type(x_saved) is torch.Tensor and x_saved.dtype == torch.float32
            assert x_amax.numel() <= 4 * 132 and x_amax.dtype in (torch.float32, torch.int32)
        assert w_saved is f8.weight
        assert w_amax.numel() <= 4 * 132 and w_amax.dtype in (torch.float32, torch.int32)


def test_recompute_mode_gives_identical_gradients():
    x = torch.randn(2, 64, 256, device=DEVICE)
    grad = torch.randn(2, 64, 512, device=DEVICE)
    _, a = pair()
    _, b = pair(config=Float8Config(save_fp8_for_backward=False))
    b.load_state_dict(a.state_dict())
    for got, want in zip(run(b, x, grad), run(a, x, grad)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(64, 256), (2, 32, 256), (2, 2, 16, 256), (3, 5, 256)])
def test_nd_inputs(shape):  # 3 x 5 = 15 tokens: the weight-gradient GEMM pads K
    ref, f8 = pair()
    x = torch.randn(shape, device=DEVICE)
    grad = torch.randn(*shape[:-1], 512, device=DEVICE)
    want, got = run(ref, x, grad), run(f8, x, grad)
    assert got[0].shape == (*shape[:-1], 512) and got[1].shape == shape
    assert sqnr(want[0], got[0]) >= 25 and sqnr(want[1], got[1]) >= 20 and sqnr(want[2], got[2]) >= 20


def test_autocast_runs_in_the_autocast_dtype():
    ref, f8 = pair()
    x = torch.randn(64, 256, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = f8(x)
        want = ref(x)
    assert out.dtype == torch.bfloat16 == want.dtype
    out.float().sum().backward()
    assert f8.weight.grad.dtype == torch.float32 and f8.bias.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32
    assert sqnr(want.float(), out.float()) >= 25


def test_frozen_weight_input_without_grad_and_no_grad():
    _, f8 = pair()
    f8.weight.requires_grad_(False)
    x = torch.randn(64, 256, device=DEVICE, requires_grad=True)
    f8(x).sum().backward()
    assert x.grad is not None and f8.weight.grad is None and f8.bias.grad is not None
    _, f8 = pair()
    f8(torch.randn(64, 256, device=DEVICE)).sum().backward()
    assert f8.weight.grad is not None
    with torch.no_grad():
        assert not f8(torch.randn(64, 256, device=DEVICE)).requires_grad


def test_dtype_mismatch_and_wrong_width_raise():
    _, f8 = pair()
    with pytest.raises(RuntimeError, match="differs from weight dtype"):
        f8(torch.randn(4, 256, device=DEVICE, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"expects input \[..., 256\]"):
        f8(torch.randn(4, 128, device=DEVICE))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "blockwise"])
@pytest.mark.parametrize("emulate", [False, True])
def test_double_backward_raises_instead_of_differentiating_wrongly(recipe, emulate):
    """A gradient penalty through a Float8Linear (create_graph=True, then a second backward): the
    GEMMs have no derivative, so the second backward raises. Under emulate, whose GEMMs are plain
    differentiable ops, it used to run and silently miss the paths through the saved float8 input."""
    config = Float8Config.from_recipe_name(recipe).replace(emulate=emulate)
    f8 = Float8Linear.from_float(nn.Linear(256, 256, bias=False, device=DEVICE, dtype=torch.bfloat16), config)
    x = torch.randn(16, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    (gw,) = torch.autograd.grad(f8(x).pow(2).sum(), (f8.weight,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gw.pow(2).sum().backward()
    with pytest.raises(RuntimeError, match="not have been used in the graph"):  # no path to x: none is made up
        torch.autograd.grad(gw.pow(2).sum(), (x,))


def test_torch_func_transforms_and_forward_ad_raise_naming_the_fix():
    """Not supported (the GEMMs' Function has a backward only): an error that says so and what to
    do, whether the input or the parameters are transformed."""
    import torch.autograd.forward_ad as fwAD

    _, f8 = pair()
    x = torch.randn(4, 256, device=DEVICE)
    with pytest.raises(NotImplementedError, match="torch.func transforms .* loss.backward"):
        torch.func.grad(lambda v: f8(v).sum())(x)
    with pytest.raises(NotImplementedError, match="torch.func transforms"):
        torch.func.grad(lambda p: torch.func.functional_call(f8, p, (x,)).sum())(dict(f8.named_parameters()))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        with fwAD.dual_level():
            f8(fwAD.make_dual(x, torch.ones_like(x)))
    f8(x).sum().backward()  # plain autograd still works
    assert f8.weight.grad is not None


def test_state_dict_and_parameters_match_nn_linear():
    ref, f8 = pair()
    sd_ref, sd_f8 = ref.state_dict(), f8.state_dict()
    assert list(sd_ref) == list(sd_f8)
    for k in sd_ref:
        assert sd_ref[k].dtype == sd_f8[k].dtype and sd_ref[k].shape == sd_f8[k].shape
        assert torch.equal(sd_ref[k], sd_f8[k])
    moved = Float8Linear.from_float(ref)
    assert moved.weight is ref.weight and moved.bias is ref.bias
    assert "float8: fwd=float8_e4m3fn, bwd=float8_e5m2" in repr(moved)


def test_emulate_is_close_to_real():
    x = torch.randn(64, 256, device=DEVICE)
    _, real = pair()
    _, emu = pair(config=Float8Config(emulate=True))
    emu.load_state_dict(real.state_dict())
    assert sqnr(real(x), emu(x)) >= 40


def test_one_input_feeding_several_layers_is_quantized_once(monkeypatch):
    import f8tensor.core.linear as linear_mod

    calls = []
    real = linear_mod._quantize
    # In forward, _quantize sees layer inputs only (the weight goes through quantize_with_amax).
    monkeypatch.setattr(linear_mod, "_quantize",
                        lambda t, dtype, *a, **k: calls.append(dtype) or real(t, dtype, *a, **k))
    layers = [pair(in_f=64, out_f=64)[1] for _ in range(3)]
    x = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    outs = [layer(x) for layer in layers]  # q, k, v projections of one x
    assert calls.count(torch.float8_e4m3fn) == 1
    want = [pair(in_f=64, out_f=64)[1] for _ in range(3)]
    for w, layer, out in zip(want, layers, outs):
        w.load_state_dict(layer.state_dict())
        shared_input.put(torch.empty(0), None)  # forget: compute it afresh
        assert torch.equal(w(x), out)
    sum(o.sum() for o in outs).backward()
    with torch.no_grad():
        x.mul_(2)  # an in-place write bumps the version: the cached quantization is stale
    calls.clear()
    assert torch.equal(layers[0](x), want[0](x.detach().clone().requires_grad_()))
    assert calls.count(torch.float8_e4m3fn) == 2


def test_shared_input_cache_is_dropped_with_its_input():
    """The cached float8 copies of an input must not outlive it (they would add to peak memory)."""
    layer = pair(in_f=64, out_f=64)[1]
    x = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    h = x * 2  # a fresh activation, as a norm's output
    out = layer(h)
    assert len(shared_input) == 1
    del h  # autograd saved only the float8 copy, so the activation is freed here
    assert len(shared_input) == 0
    out.sum().backward()
    assert x.grad is not None


def test_inference_mode():
    ref, f8 = pair()
    with torch.inference_mode():
        x = torch.randn(8, 256, device=DEVICE)
        first = f8(x)
        assert sqnr(ref(x), first) >= 25
        x.mul_(-3)  # inference tensors track no version: the input must be quantized afresh
        out = f8(x)
        assert torch.equal(out, f8(x.clone())) and not torch.equal(out, first)


@pytest.mark.parametrize("save_fp8", [True, False])
def test_activation_checkpointing_gives_identical_gradients(save_fp8):
    from torch.utils.checkpoint import checkpoint

    _, a = pair(config=Float8Config(save_fp8_for_backward=save_fp8))
    _, b = pair(config=Float8Config(save_fp8_for_backward=save_fp8))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 32, 256, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a = torch.nn.functional.gelu(a(xa))
    out_b = checkpoint(lambda t: torch.nn.functional.gelu(b(t)), xb, use_reentrant=False)
    assert torch.equal(out_a, out_b)
    out_a.square().sum().backward()
    out_b.square().sum().backward()  # recomputes b's forward, then runs its backward
    for ga, gb in ((xa.grad, xb.grad), (a.weight.grad, b.weight.grad), (a.bias.grad, b.bias.grad)):
        assert torch.equal(ga, gb)


def test_input_kept_by_its_producer_is_saved_as_is(monkeypatch):
    """exp saves its result for backward: a float8 copy of a view of it would only add memory,
    so the layer saves the view itself and quantizes it again in backward, to the same bits,
    reusing forward's amax (backward computes one amax: grad_output's).
    Under activation checkpointing (saved-tensor hooks) the layer saves as configured."""
    import f8tensor.core.linear as linear_mod

    amax_passes = []
    real = linear_mod.quantize_with_amax
    monkeypatch.setattr(linear_mod, "quantize_with_amax", lambda t, *a, amax=None, **k: amax_passes.append(
        amax is None) or real(t, *a, amax=amax, **k))
    ref, f8 = pair()
    z = torch.randn(64, 256, device=DEVICE, requires_grad=True)
    grads = []
    for keep in (True, False):
        z.grad = f8.weight.grad = None
        y = torch.exp(z)
        x = y.view(2, 32, 256) if keep else y.view(2, 32, 256).clone()  # the clone is not kept
        out = f8(x)  # (saved-tensor hooks would switch the check off: read the node instead)
        x_saved = out.grad_fn.saved_tensors[0]
        if keep:
            assert x_saved.dtype == torch.float32
            assert x_saved.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
        else:
            assert x_saved.dtype == torch.float8_e4m3fn
        amax_passes.clear()
        out.square().sum().backward()
        assert sum(amax_passes) == 1  # grad_output's; x's (if kept) and the weight's come from forward
        grads.append((out.detach(), z.grad, f8.weight.grad, f8.bias.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)

    from torch.utils.checkpoint import checkpoint

    def block(z):
        return f8(torch.exp(z).view(2, 32, 256))

    z.grad = f8.weight.grad = None
    checkpoint(block, z, use_reentrant=False).square().sum().backward()
    assert torch.equal(z.grad, grads[0][1]) and torch.equal(f8.weight.grad, grads[0][2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_in_a_training_step_of_the_layer():
    """Forward, backward and an optimizer step of Float8Linear layers (shared input, bias) never
    wait for the GPU: a sync would stall eager training's CPU run-ahead."""
    layers = nn.ModuleList(Float8Linear(256, 512, bias=True, device="cuda", dtype=torch.bfloat16)
                           for _ in range(2))
    opt = torch.optim.AdamW(layers.parameters(), lr=1e-3, fused=True)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        (layers[0](x) * layers[1](x)).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # first calls: kernels compile, plans are recorded, optimizer state is created
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_features_the_gemms_cannot_take_are_refused_when_the_layer_is_built(recipe):
    # Forward may run (K is zero-padded); the backward GEMMs would fail on the first step.
    config = Float8Config.from_recipe_name(recipe)
    for k, n in ((40, 64), (64, 40)):
        with pytest.raises(ValueError, match="divisible by 16"):
            Float8Linear(k, n, config=config)
        with pytest.raises(ValueError, match="divisible by 16"):
            Float8Linear.from_float(torch.nn.Linear(k, n), config)
    Float8Linear(40, 72, config=Float8Config.from_recipe_name("blockwise"))  # its GEMMs are padded


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "blockwise"])
def test_a_layer_without_features_is_refused_and_kept_by_conversion(recipe):
    """nn.Linear takes zero features; no float8 GEMM does: refused when built, kept by conversion
    with the reason (before, the layer was built and its first forward failed on a reshape)."""
    from f8tensor import conversion_summary, convert_to_float8_training

    config = Float8Config.from_recipe_name(recipe)
    for k, n in ((0, 16), (16, 0)):
        with pytest.raises(ValueError, match="without features has no GEMM"):
            Float8Linear(k, n, config=config)
        model = nn.Sequential(nn.Linear(k, n))
        convert_to_float8_training(model, config=config, module_filter_fn=lambda mod, fqn: True)
        assert type(model[0]) is nn.Linear
        assert "without features" in conversion_summary(model)


def test_a_config_casting_forward_to_e5m2_is_refused_naming_the_field():
    """The forward GEMM multiplies two forward_dtype operands; CUDA's _scaled_mm rejects e5m2 x e5m2."""
    with pytest.raises(ValueError, match="forward_dtype=torch.float8_e4m3fn"):
        Float8Config(forward_dtype=torch.float8_e5m2)
    Float8Config(backward_dtype=torch.float8_e5m2)  # the gradients' format: fine


def test_a_float8_input_in_another_format_is_refused_naming_the_gather():
    """A Float8Tensor input (what a float8 sequence-parallel gather hands the layer) must be in the
    layer's forward format; forward_dtype is always e4m3fn, so an e5m2 input comes from elsewhere."""
    from f8tensor import to_float8

    layer = Float8Linear(64, 64, device=DEVICE, dtype=torch.bfloat16)
    x = to_float8(torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16), torch.float8_e5m2)
    with pytest.raises(TypeError, match="Float8Tensor in torch.float8_e5m2.*casts inputs to torch.float8_e4m3fn"):
        layer(x)
