"""Float8Linear under saved-tensor hooks (core/saves_first.py): its saves come before its forward
GEMM, so a checkpoint recomputation that stops early skips the GEMM of a block's last layer. The
outputs, gradients and saved tensors are those of the one-Function form, bit for bit; the amax
records still reach backward."""

import pytest
import torch
import torch.nn.functional as F
from f8utils import DEVICE, count_amax_passes, cpu_rowwise_gemm, torchtitan_llama
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import f8tensor.core.saves_first as saves_first
from f8tensor import Float8Config, Float8Linear, convert_to_float8_training, swiglu

RECIPES = ["tensorwise", "rowwise", "rowwise_with_gw_hp", "blockwise"]


def config(recipe, **changes):
    # The GEMMs run through _scaled_mm and its routing (on CPU, blockwise through conftest's CUDA-rules
    # stand-in, which multiplies in fp32); rowwise is emulated only on a torch whose CPU _scaled_mm
    # takes no rowwise scales (2.11's). The GEMM still runs where the deferral puts it.
    emulate = DEVICE.type == "cpu" and recipe.startswith("rowwise") and not cpu_rowwise_gemm()
    return Float8Config.from_recipe_name(recipe).replace(emulate=emulate, **changes)


class Block(nn.Module):
    """x + w2(gelu(w1(x))): a residual block whose last saves are w2's."""

    def __init__(self, recipe, dim=256, hidden=512, **changes):
        super().__init__()
        torch.manual_seed(0)
        self.w1 = Float8Linear(dim, hidden, config=config(recipe, **changes), device=DEVICE, dtype=torch.bfloat16)
        self.w2 = Float8Linear(hidden, dim, config=config(recipe, **changes), device=DEVICE, dtype=torch.bfloat16)

    def forward(self, x):
        return x + self.w2(F.gelu(self.w1(x)))


def forward_gemms(monkeypatch) -> list:
    """Log every forward GEMM (all run in saves_first._gemm); returns the log."""
    log = []
    real = saves_first.scaled_mm_data
    monkeypatch.setattr(saves_first, "scaled_mm_data", lambda *a: log.append(1) or real(*a))
    return log


def first_forward_ran(gemms: list, n: int):
    """A `between` for step(): asserts the first forward ran n forward GEMMs, then clears the log
    for the recomputation's."""
    def check():
        assert len(gemms) == n
        gemms.clear()
    return check


def one_function_form(monkeypatch):
    """Float8Linear as one autograd Function even under saved-tensor hooks (the form before the deferral)."""
    monkeypatch.setattr(saves_first, "saved_tensors_hooks_active", lambda: False)


def step(model, x, ac: bool, early_stop: bool = True, between=None):
    """Output and the gradients of x and every parameter, the block checkpointed (early stop as
    given) or not; `between()`, if given, runs after the forward, before backward."""
    x = x.detach().requires_grad_()
    with set_checkpoint_early_stop(early_stop):
        out = checkpoint(model, x, use_reentrant=False) if ac else model(x)
        if between is not None:
            between()
        out.float().square().sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return [out.detach()] + grads


def assert_identical(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("recompute_unread", [False, True], ids=["default", "recompute_unread_gemm"])
def test_recomputation_skips_the_last_layers_gemm_same_bits(recipe, recompute_unread, monkeypatch):
    """Checkpointed, backward runs one forward GEMM again (w1's), not two: with early stop on
    checkpointing stops after w2's saves, with it off w2 skips its GEMM (zeros go on to the
    residual add); Float8Config.recompute_unread_gemm runs it there. Output and gradients equal
    the unchecked block's bit for bit every way."""
    block = Block(recipe, recompute_unread_gemm=recompute_unread)
    x = torch.randn(2, 128, 256, device=DEVICE, dtype=torch.bfloat16)
    want = step(block, x, ac=False)
    gemms = forward_gemms(monkeypatch)
    for early_stop, recomputed in ((True, 1), (False, 2 if recompute_unread else 1)):
        got = step(block, x, ac=True, early_stop=early_stop, between=first_forward_ran(gemms, 2))
        assert len(gemms) == recomputed, early_stop
        gemms.clear()
        assert_identical(got, want)


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_same_tensors_saved_as_by_one_function(recipe, monkeypatch):
    """Under a saved-tensor hook the deferred form packs the same tensors (shape, dtype, bits) in
    the same order as the one-Function form, and gives the same output and gradients."""

    def packed(model, x):
        log = []

        def pack(t):
            log.append(t.detach().clone())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = step(model, x, ac=False)
        return log, result

    block = Block(recipe)
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16)
    saves, result = packed(block, x)
    with monkeypatch.context() as m:
        one_function_form(m)
        want_saves, want = packed(block, x)
    assert len(saves) == len(want_saves) > 0
    for got, w in zip(saves, want_saves):
        assert got.shape == w.shape and got.dtype == w.dtype and torch.equal(got.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
    assert_identical(result, want)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("early_stop", [True, False])
def test_selective_checkpointing_same_bits(recipe, early_stop):
    """Selective checkpointing as torchtitan's "op" mode writes it (a policy saving the outputs of
    mm, max and, here, _scaled_mm, recomputing the rest): the unchecked block's bits."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = {torch.ops.aten.mm.default, torch.ops.aten.max.default, torch.ops.aten._scaled_mm.default}

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in saved else CheckpointPolicy.PREFER_RECOMPUTE

    block = Block(recipe)
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16)
    want = step(block, x, ac=False)
    with set_checkpoint_early_stop(early_stop):
        x_ = x.detach().requires_grad_()
        out = checkpoint(block, x_, use_reentrant=False,
                         context_fn=functools.partial(create_selective_checkpoint_contexts, policy))
        out.float().square().sum().backward()
    assert_identical([out.detach(), x_.grad] + [p.grad for p in block.parameters()], want)


def test_offloaded_saves_same_bits():
    """Under torch.autograd.graph.save_on_cpu (saved-tensor hooks that are not checkpointing)."""
    block = Block("tensorwise")
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16)
    want = step(block, x, ac=False)
    with torch.autograd.graph.save_on_cpu(pin_memory=False):
        got = step(block, x, ac=False)
    assert_identical(got, want)


def test_one_function_where_nothing_is_saved(monkeypatch):
    """No deferral where no gradient can flow (no_grad, or nothing requiring grad) nor without
    hooks: the output is the layer's own Function's."""
    layer = Float8Linear(64, 32, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16)
    assert type(layer(x.requires_grad_()).grad_fn).__name__ == "_Float8LinearFnBackward"
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert type(layer(x).grad_fn).__name__ == "_GemmBackward"
        with torch.no_grad():
            assert layer(x).grad_fn is None
        layer.requires_grad_(False)
        assert layer(x.detach()).grad_fn is None
        layer.requires_grad_(True)
    want = layer(x.detach())
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        got = layer(x.detach())
    assert got.shape == want.shape and torch.equal(got, want)


class SwiGLUFeedForward(nn.Module):
    def __init__(self, dim=64, hidden=192):
        super().__init__()
        torch.manual_seed(0)
        kw = dict(bias=False, device=DEVICE, dtype=torch.bfloat16)
        self.w1, self.w3 = Float8Linear(dim, hidden, **kw), Float8Linear(dim, hidden, **kw)
        self.w2 = Float8Linear(hidden, dim, **kw)

    def forward(self, x):
        return x + self.w2(swiglu(self.w1(x), self.w3(x)))


def test_amax_records_reach_backward_through_the_deferred_gemm(monkeypatch):
    """swiglu records the amax of its gradients; w1 and w3 read them as their grad_output through
    the _Gemm node: checkpointed, the amax passes and the bits are those of the one-Function form."""
    ffn = SwiGLUFeedForward()
    x = torch.randn(2, 16, 64, device=DEVICE, dtype=torch.bfloat16)
    passes = count_amax_passes(monkeypatch)
    got = step(ffn, x, ac=True)
    deferred = list(passes)
    passes.clear()
    with monkeypatch.context() as m:
        one_function_form(m)
        want = step(ffn, x, ac=True)
    assert deferred == passes
    assert_identical(got, want)


def test_hugging_face_gradient_checkpointing_skips_each_down_projection(monkeypatch):
    """transformers' LlamaForCausalLM with activation checkpointing enabled (non-reentrant, early
    stop): per layer the recomputation runs q, k, v, o, gate and up again, not down_proj, whose
    saves are the layer's last; gradients are those of the one-Function form, bit for bit."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE, torch.bfloat16)
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn != "lm_head")
    model.activation_checkpointing_enable()  # transformers 5.24's name for gradient_checkpointing_enable
    model.train()
    tokens = torch.randint(0, 256, (2, 32), device=DEVICE)
    gemms = forward_gemms(monkeypatch)

    def backward_gemms_and_grads():
        loss = model(tokens).logits.float().square().mean()
        gemms.clear()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return len(gemms), grads

    recomputed, got = backward_gemms_and_grads()
    with monkeypatch.context() as m:
        one_function_form(m)
        recomputed_one, want = backward_gemms_and_grads()
    assert (recomputed, recomputed_one) == (2 * 6, 2 * 7)
    assert_identical(got, want)


class GatedBlock(nn.Module):
    """gelu(w2(gelu(w1(x)))): w2's output is saved again by the gelu after it, so w2's saves are
    not the checkpoint's last."""

    def __init__(self, recipe, dim=256, hidden=512):
        super().__init__()
        torch.manual_seed(0)
        self.w1 = Float8Linear(dim, hidden, config=config(recipe), device=DEVICE, dtype=torch.bfloat16)
        self.w2 = Float8Linear(hidden, dim, config=config(recipe), device=DEVICE, dtype=torch.bfloat16)

    def forward(self, x):
        return F.gelu(self.w2(F.gelu(self.w1(x))))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_a_layer_whose_output_is_saved_later_runs_its_gemm(recipe, monkeypatch):
    """Early stop off, w2 followed by an op that saves w2's output: the recomputation runs both
    forward GEMMs, and the gradients are the unchecked block's bit for bit."""
    block = GatedBlock(recipe)
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16)
    want = step(block, x, ac=False)
    gemms = forward_gemms(monkeypatch)
    got = step(block, x, ac=True, early_stop=False, between=gemms.clear)
    assert len(gemms) == 2
    assert_identical(got, want)


@pytest.mark.parametrize("recompute_unread", [False, True], ids=["default", "recompute_unread_gemm"])
def test_code_after_the_last_saves_sees_zeros_in_the_recomputation(recompute_unread):
    """The contract of the skip: with early stop off, a forward hook on w2 sees w2's real output in
    the first forward and zeros in the recomputation (its values reach no backward); with
    recompute_unread_gemm the real output both times."""
    block = Block("tensorwise", recompute_unread_gemm=recompute_unread)
    seen = []
    block.w2.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    with set_checkpoint_early_stop(False):
        checkpoint(block, x, use_reentrant=False).float().square().sum().backward()
    first, recomputed = seen
    assert first.abs().sum() > 0
    if recompute_unread:
        assert torch.equal(recomputed, first)
    else:
        assert recomputed.shape == first.shape and recomputed.dtype == first.dtype and not recomputed.any()


@pytest.mark.parametrize("early_stop", [True, False])
def test_torchtitans_checkpointed_blocks_skip_each_down_projection(early_stop, monkeypatch):
    """torchtitan's Llama 3 (its own model code), converted and fused, each block wrapped as its
    trainer applies full activation checkpointing (`ptd_checkpoint_wrapper`, early stop as given):
    per block the recomputation runs wq, wk, wv, wo, w1 and w3 again, not w2, with early stop on
    and off; the gradients are those of recompute_unread_gemm=True (w2 run), bit for bit."""
    pytest.importorskip("torchtitan")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from f8tensor import fuse_model_ops

    tokens = torch.randint(0, 256, (2, 32), device=DEVICE)
    gemms = forward_gemms(monkeypatch)

    def backward_gemms_and_grads(recompute_unread):
        model = torchtitan_llama().to(DEVICE)
        convert_to_float8_training(model, config=Float8Config(recompute_unread_gemm=recompute_unread),
                                   module_filter_fn=lambda mod, fqn: fqn != "output")
        fuse_model_ops(model, strict=True)
        for name, block in list(model.layers.named_children()):
            model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False,
                                                                  early_stop=early_stop))
        loss = model(tokens).float().square().mean()
        gemms.clear()
        loss.backward()
        return len(gemms), [p.grad for p in model.parameters()]

    recomputed, got = backward_gemms_and_grads(False)
    recomputed_all, want = backward_gemms_and_grads(True)
    assert (recomputed, recomputed_all) == (2 * 6, 2 * (6 if early_stop else 7))
    assert_identical(got, want)


class Nested(nn.Module):
    """A checkpointed Block inside the function of an outer checkpoint, with a Float8Linear after it
    (whose saves are then the outer checkpoint's last) or before it (the inner checkpoint's input
    saves are the outer's last)."""

    def __init__(self, recipe, inner_last, dim=256):
        super().__init__()
        self.inner = Block(recipe, dim=dim)
        torch.manual_seed(1)
        self.w3 = Float8Linear(dim, dim, config=config(recipe), device=DEVICE, dtype=torch.bfloat16)
        self.inner_last = inner_last

    def forward(self, x):
        if self.inner_last:
            return checkpoint(self.inner, F.gelu(self.w3(x)), use_reentrant=False)
        h = checkpoint(self.inner, x, use_reentrant=False)
        return h + self.w3(F.gelu(h))


@pytest.mark.parametrize("inner_last", [False, True], ids=["linear_last", "inner_checkpoint_last"])
@pytest.mark.parametrize("early_stop", [True, False])
def test_nested_checkpoints_same_bits(inner_last, early_stop, monkeypatch):
    """Nested non-reentrant checkpoints: in the outer recomputation the inner checkpoint runs as a
    first forward under its own hooks (nothing skipped there), and each checkpoint's own last
    layer skips its GEMM in its own recomputation. Gradients: the unchecked model's, bit for bit."""
    model = Nested("tensorwise", inner_last)
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16)
    want = step(model, x, ac=False)
    gemms = forward_gemms(monkeypatch)
    got = step(model, x, ac=True, early_stop=early_stop, between=first_forward_ran(gemms, 3))
    # The inner recomputation (of the first forward's inner checkpoint) runs w1 and skips w2. The
    # outer recomputation runs the inner checkpoint again as a first forward, under a new inner
    # frame whose saves nothing reads (w1 and w2 both run), and w3: linear last, w3's saves are the
    # outer's last (early stop stops there; without it w3 skips its GEMM): 2 + 1; inner last, w3
    # runs, and the inner checkpoint's input saves are the outer's last: early stop stops before
    # the inner region (1 + 1), without it the inner region runs whole (3 + 1).
    assert len(gemms) == (3 if not inner_last else 2 if early_stop else 4)
    assert_identical(got, want)


class InPlaceAfter(Block):
    """Block whose down projection's output is scaled in place (as a residual scale or a tensor-parallel
    all-reduce writes it): in-place code after the checkpoint's last saves."""

    def forward(self, x):
        y = self.w2(F.gelu(self.w1(x)))
        y.mul_(0.5)
        return x + y


def test_in_place_code_after_the_skipped_gemm_runs_on_a_tensor_of_its_own(monkeypatch):
    """Early stop off: the skipped GEMM's zeros are a tensor of their own (not one element expanded),
    which the in-place op after the layer may write; gradients the unchecked block's bit for bit."""
    block = InPlaceAfter("tensorwise")
    seen = []
    block.w2.register_forward_hook(lambda mod, args, out: seen.append(out))
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16)
    want = step(block, x, ac=False)
    gemms = forward_gemms(monkeypatch)
    seen.clear()
    got = step(block, x, ac=True, early_stop=False, between=lambda: (gemms.clear(), seen.clear()))
    assert len(gemms) == 1  # w1's; w2's skipped
    (zeros,) = seen
    assert zeros.is_contiguous() and not zeros.any()
    assert_identical(got, want)
