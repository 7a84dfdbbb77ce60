"""f8tensor.cross_entropy: its kernels against PyTorch's own F.cross_entropy of fp32 logits (the
reference), the autograd wrapper's reductions and edges, and the errors it raises.

The Triton kernels run on the GPU, or in the interpreter on CPU (which truncates fp32 to bf16/fp16
instead of rounding). Bounds (the module docstring's): the loss and the rows' logsumexp within
2^-18 of max(1, |lse|) (fp32 sums of exp in another order than PyTorch's two passes; the GPU's fast
exp); the gradient within one unit in the last place of its dtype at the reference plus 2^-20 of
max(1, |lse|, |x|) relative (`assert_grad_close`). On CPU, `cross_entropy` itself runs the reference kernels: its tests there test
the autograd wrapper.
"""

import pytest
import torch
import torch.nn.functional as F
from f8utils import DEVICE, HP_DTYPES

from f8tensor import causal_lm_loss, cross_entropy
from f8tensor.kernels import cross_entropy_backward_ref, cross_entropy_ref
from f8tensor.kernels import cross_entropy_backward_triton, cross_entropy_forward_triton

ON_GPU = DEVICE.type == "cuda"
needs_triton = pytest.mark.skipif(cross_entropy_forward_triton is None, reason="needs triton")
# (rows, vocab): a vocab under one block, one of several blocks and a partial one, one class
SHAPES = [(5, 1), (7, 37), (64, 4096), (9, 10000)] + ([(8192, 128256)] if ON_GPU else [])


def logits_and_target(n, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g) * 4).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    if n > 2:
        t[1] = -100  # ignored
    return x.to(DEVICE), t.to(DEVICE)


def assert_loss_close(out, ref, lse):
    bad = ~((out.double() - ref.double()).abs() <= 2**-18 * lse.double().abs().clamp(min=1))  # NaN: bad
    bad &= ~(out.isnan() & ref.isnan())
    assert not bad.any(), f"{int(bad.sum())} rows beyond tolerance: {out[bad][:3]} vs {ref[bad][:3]}"


def assert_grad_close(out, ref, x, t, g, rows_per_check=256):
    """Within one unit in the last place of ref's dtype at ref, plus 2^-20 of max(1, |lse|, |x|)
    relative to |ref| (exp(x - lse) errs relatively by the error of x - lse) and, in the target's
    column, where p - 1 cancels, to |g|. Checked rows_per_check rows at a time: in float64 the
    whole of an 8192 x 128256 case would hold tens of GB (the GPU suite's parallel workers share one card)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    g = g.reshape(-1)
    for i in range(0, out.shape[0], rows_per_check):
        rows = slice(i, i + rows_per_check)
        o, rf, xs, ts = out[rows], ref[rows], x[rows], t[rows]
        r = rf.double()
        ulp = torch.nextafter(rf.abs(), torch.full_like(rf, float("inf"))).double() - r.abs()
        size = torch.maximum(torch.logsumexp(xs.double(), -1).abs().clamp(min=1).unsqueeze(1), xs.double().abs())
        target_col = F.one_hot(ts.clamp(min=0), xs.shape[1]).bool() & (ts != -100).unsqueeze(1)
        allowed = ulp + 2**-20 * size * (r.abs() + target_col * g[rows].double().abs().reshape(-1, 1))
        bad = ~((o.double() - r).abs() <= allowed)  # a NaN where the reference has none: bad
        bad &= ~(o.isnan() & rf.isnan())
        assert not bad.any(), (f"rows {i}..{i + o.shape[0] - 1}: {int(bad.sum())} of {o.numel()} beyond "
                               f"tolerance: {o[bad][:3]} vs {rf[bad][:3]}")


def test_the_gradient_check_reads_every_chunk_of_rows():
    """assert_grad_close, checking a few rows at a time, still finds one wrong value in the last rows."""
    x, t = logits_and_target(7, 37, torch.float32)
    g = torch.ones(7, device=DEVICE)
    ref = cross_entropy_backward_ref(x, t, g, -100)
    assert_grad_close(ref.clone(), ref, x, t, g, rows_per_check=2)
    wrong = ref.clone()
    wrong[6, 3] += 1e-3
    with pytest.raises(AssertionError, match=r"rows 6\.\.6: 1 of 37"):
        assert_grad_close(wrong, ref, x, t, g, rows_per_check=2)


@needs_triton
@pytest.mark.parametrize("dtype", HP_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_the_reference(shape, dtype):
    x, t = logits_and_target(*shape, dtype)
    loss, lse = cross_entropy_forward_triton(x, t, -100)
    ref_loss, ref_lse = cross_entropy_ref(x, t, -100)
    assert_loss_close(lse, ref_lse, ref_lse)
    assert_loss_close(loss, ref_loss, ref_lse)
    if shape[0] > 2:
        assert loss[1] == 0  # the ignored row
    g = torch.rand(shape[0], device=DEVICE) + 0.5
    dx = cross_entropy_backward_triton(x, t, lse, g, -100)
    assert_grad_close(dx, cross_entropy_backward_ref(x, t, g, -100), x, t, g)
    if shape[0] > 2:
        assert not dx[1].any()  # the ignored row: no gradient


@needs_triton
@pytest.mark.parametrize("block_v, num_warps", [(128, 1), (1024, 4)])
def test_kernels_match_the_reference_over_many_blocks(block_v, num_warps):
    """Blocks other than the defaults: the running max grows from block to block (a rising row)."""
    x, t = logits_and_target(5, 3000, torch.bfloat16)
    x = x + torch.linspace(0, 30, 3000, device=DEVICE).to(x.dtype)
    loss, lse = cross_entropy_forward_triton(x, t, -100, block_v=block_v, num_warps=num_warps)
    ref_loss, ref_lse = cross_entropy_ref(x, t, -100)
    assert_loss_close(lse, ref_lse, ref_lse)
    assert_loss_close(loss, ref_loss, ref_lse)
    g = torch.rand(5, device=DEVICE) + 0.5
    dx = cross_entropy_backward_triton(x, t, lse, g, -100, block_v=block_v, num_warps=num_warps)
    assert_grad_close(dx, cross_entropy_backward_ref(x, t, g, -100), x, t, g)


@needs_triton
def test_kernels_read_rows_of_a_wider_tensor_and_one_factor_for_all_rows():
    wide, t = logits_and_target(6, 300, torch.bfloat16)
    x = wide[:, 10:250]  # row stride 300, unit column stride
    t = t.clamp(max=239)
    loss, lse = cross_entropy_forward_triton(x, t, -100)
    ref_loss, ref_lse = cross_entropy_ref(x, t, -100)
    assert_loss_close(loss, ref_loss, ref_lse)
    g = torch.tensor(0.25, device=DEVICE)  # 0-d: the mean's factor
    dx = cross_entropy_backward_triton(x, t, lse, g, -100)
    assert dx.is_contiguous()
    assert_grad_close(dx, cross_entropy_backward_ref(x, t, g, -100), x, t, g.expand(6))


@needs_triton
def test_kernel_edges_ignored_out_of_range_and_non_finite_rows():
    x = torch.randn(6, 50, device=DEVICE)
    t = torch.tensor([3, -100, 50, -1, 7, 2], device=DEVICE)  # ignored, past V, negative
    x[4, 9] = float("nan")
    x[5] = float("-inf")
    loss, lse = cross_entropy_forward_triton(x, t, -100)
    assert loss[1] == 0 and loss[0].isfinite()
    assert loss[2].isnan() and loss[3].isnan(), "a target outside [0, V) must give NaN, not a number"
    assert loss[4].isnan() and loss[5].isnan()
    dx = cross_entropy_backward_triton(x, t, lse, torch.ones(6, device=DEVICE), -100)
    assert not dx[1].any() and dx[0].isfinite().all()
    assert dx[2].isnan().all() and dx[3].isnan().all(), "a target outside [0, V): a NaN gradient, not a plausible one"
    # another ignore_index: -100 is then a target like any other (outside [0, V): NaN)
    loss7, _ = cross_entropy_forward_triton(x[:2], torch.tensor([7, -100], device=DEVICE), 7)
    assert loss7[0] == 0 and loss7[1].isnan()


def assert_equals_the_written_loss(x, t, reduction):
    """cross_entropy(x, t) against F.cross_entropy(x.float(), t): the loss within 2^-18 of |lse|
    (summed over the rows for "mean" and "sum"), the gradient of a weighted sum by assert_grad_close."""
    x.requires_grad_()
    out = cross_entropy(x, t, reduction=reduction)
    ref = F.cross_entropy(x.float(), t, reduction=reduction)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    w = torch.rand(ref.shape, device=DEVICE) + 0.5  # a gradient other than ones for "none"
    (gx,) = torch.autograd.grad((out * w).sum(), x)
    (gr,) = torch.autograd.grad((ref * w).sum(), x)
    lse = torch.logsumexp(x.detach().float(), -1)
    scale = lse.abs().clamp(min=1).sum() if reduction != "none" else lse.abs()
    assert ((out - ref).abs() <= 2**-18 * scale).all()
    factor = w / (t != -100).sum() if reduction == "mean" else w
    assert_grad_close(gx, gr, x.detach(), t, factor.expand(x.shape[0]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", HP_DTYPES)
def test_equals_the_written_loss(reduction, dtype):
    assert_equals_the_written_loss(*logits_and_target(33, 1000, dtype, seed=1), reduction)


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_wrapper_around_the_kernels_equals_the_written_loss(reduction, monkeypatch):
    """The autograd wrapper with the Triton kernels (on CPU: interpreted, put in the references'
    place), as it runs on a GPU."""
    import f8tensor.fused_ops.cross_entropy as module

    monkeypatch.setattr(module, "cross_entropy_forward", cross_entropy_forward_triton)
    monkeypatch.setattr(module, "cross_entropy_backward", cross_entropy_backward_triton)
    assert_equals_the_written_loss(*logits_and_target(12, 5000, torch.bfloat16, seed=2), reduction)


def test_ignore_index_and_all_rows_ignored():
    x, t = logits_and_target(8, 50, torch.float32)
    t[:] = 5
    assert torch.isnan(cross_entropy(x, t, ignore_index=5))  # 0 / 0, as F.cross_entropy gives
    assert torch.isnan(F.cross_entropy(x, t, ignore_index=5))
    assert cross_entropy(x, t, ignore_index=5, reduction="sum") == 0
    t[0] = 4
    torch.testing.assert_close(cross_entropy(x, t, ignore_index=5), F.cross_entropy(x, t, ignore_index=5))


def test_all_rows_ignored_with_create_graph_gives_a_zero_gradient():
    x, t = logits_and_target(4, 20, torch.float32)
    x.requires_grad_()
    t[:] = -100
    for create_graph in (False, True):
        (gx,) = torch.autograd.grad(cross_entropy(x, t), x, create_graph=create_graph)
        assert not gx.any(), create_graph  # F.cross_entropy's too: the loss is NaN, the gradient 0


def test_one_class_with_any_stride():
    x = torch.randn(1, 5, device=DEVICE).t().requires_grad_()  # [5, 1], strides (1, 5)
    t = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    out = cross_entropy(x, t)
    out.backward()
    assert out == 0 and not x.grad.any()


def test_empty_batch():
    x = torch.zeros(0, 10, device=DEVICE, requires_grad=True)
    t = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert cross_entropy(x, t, reduction="sum") == 0
    assert cross_entropy(x, t, reduction="none").shape == (0,)
    cross_entropy(x, t, reduction="sum").backward()
    assert x.grad.shape == (0, 10)


def test_non_contiguous_columns_are_copied_first():
    x, t = logits_and_target(16, 64, torch.bfloat16)
    xt = x.t().contiguous().t().requires_grad_()  # column-major
    out = cross_entropy(xt, t)
    out.backward()
    torch.testing.assert_close(out, F.cross_entropy(x.float(), t), rtol=0, atol=2**-16)
    assert xt.grad.shape == xt.shape


def test_second_derivative_equals_the_written_loss():
    x, t = logits_and_target(6, 20, torch.float32)
    x.requires_grad_()
    v = torch.randn(6, 20, device=DEVICE)
    for loss_fn in (cross_entropy, lambda x, t: F.cross_entropy(x.float(), t)):
        (gx,) = torch.autograd.grad(loss_fn(x, t), x, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * v).sum(), x)
        if loss_fn is cross_entropy:
            ours = (gx.detach(), ggx)
    torch.testing.assert_close(ours[0], gx.detach(), rtol=2**-20, atol=2**-24)
    torch.testing.assert_close(ours[1], ggx, rtol=2**-18, atol=2**-22)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, t: cross_entropy(x.view(2, 4, 10), t), ValueError, r"flatten\(0, -2\)"),
    (lambda x, t: cross_entropy(x.long(), t), TypeError, "bfloat16, float16 or float32"),
    (lambda x, t: cross_entropy(x, t.int()), TypeError, r"target.long\(\)"),
    (lambda x, t: cross_entropy(x, t.float()), TypeError, "probabilities are not supported"),
    (lambda x, t: cross_entropy(x, t[:4]), ValueError, r"target \[N\]"),
    (lambda x, t: cross_entropy(x[:, :0], t), ValueError, "at least one class"),
    (lambda x, t: cross_entropy(x, t, reduction="avg"), ValueError, "reduction is one of"),
    (lambda x, t: cross_entropy(x, t, ignore_index=-100.0), TypeError, "ignore_index is an int"),
    (lambda x, t: cross_entropy(x.numpy(), t), TypeError, "two tensors"),
])
def test_errors_name_the_problem(call, error, match):
    x, t = torch.randn(8, 10), torch.randint(0, 10, (8,))
    with pytest.raises(error, match=match):
        call(x, t)


def test_compiled_runs_the_written_code():
    x, t = logits_and_target(16, 64, torch.float32)
    compiled = torch.compile(cross_entropy, fullgraph=True)
    torch.testing.assert_close(compiled(x, t), F.cross_entropy(x, t), rtol=0, atol=2**-18)


@pytest.mark.parametrize("num_items", [None, 37, "tensor"])
@pytest.mark.parametrize("shifted", [False, True])
def test_causal_lm_loss_is_hugging_faces(num_items, shifted):
    """causal_lm_loss against transformers' own ForCausalLMLoss, and set as a Llama model's
    loss_function: the same loss and gradients, to fp32 rounding."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    x, _ = logits_and_target(2 * 9, 300, torch.bfloat16, seed=3)
    x = x.view(2, 9, 300).requires_grad_()
    labels = torch.randint(0, 300, (2, 9), device=DEVICE)
    labels[0, 4] = -100
    kwargs = dict(num_items_in_batch=torch.tensor(37, device=DEVICE) if num_items == "tensor" else num_items)
    if shifted:
        kwargs["shift_labels"] = torch.roll(labels, -1, dims=1)
    ours = causal_lm_loss(x, labels, 300, **kwargs, unused_by_both=1)
    ref = ForCausalLMLoss(x, labels, 300, **kwargs, unused_by_both=1)
    torch.testing.assert_close(ours, ref, rtol=2**-18, atol=0)
    (g_ours,) = torch.autograd.grad(ours, x)
    (g_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(g_ours, g_ref, rtol=2**-7, atol=2**-20)


def test_causal_lm_loss_as_a_hugging_face_models_loss_function():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DEVICE)
    tokens = torch.randint(0, 128, (2, 16), device=DEVICE)
    ref = model(tokens, labels=tokens).loss
    calls = []
    model.loss_function = lambda *args, **kwargs: calls.append(kwargs) or causal_lm_loss(*args, **kwargs)
    ours = model(tokens, labels=tokens).loss
    assert len(calls) == 1  # the model called it
    torch.testing.assert_close(ours, ref, rtol=2**-18, atol=0)


@pytest.mark.skipif(not ON_GPU, reason="the CUDA kernels: a GPU")
def test_cuda_step_makes_no_host_sync():
    x, t = logits_and_target(64, 5000, torch.bfloat16)
    x.requires_grad_()
    cross_entropy(x, t).backward()  # compile and launch once outside the check
    x.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        cross_entropy(x, t).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
