"""Float8Linear inside an activation checkpoint's recomputation (core/weight_amax.py, core/linear.py):
the weight is cast once there, in both layouts, with the amax of its latest forward cast, and not
again in backward; output and gradients are the unchecked block's, bit for bit. The amax is used
only while the weight is unchanged since that forward."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from f8utils import DEVICE
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import f8tensor.core.linear as linear_mod
from f8tensor import Float8Linear
from f8tensor.core import weight_amax
from f8tensor.torch_internals import inside_backward


class Block(nn.Module):
    def __init__(self, dim=256, hidden=512):
        super().__init__()
        torch.manual_seed(0)
        self.w1 = Float8Linear(dim, hidden, bias=False, device=DEVICE, dtype=torch.bfloat16)
        self.w2 = Float8Linear(hidden, dim, bias=False, device=DEVICE, dtype=torch.bfloat16)

    def forward(self, x):
        return x + self.w2(F.gelu(self.w1(x)))


def weight_casts(monkeypatch, params) -> list:
    """Log each quantization of a parameter: (which, layout, own amax pass, inside backward)."""
    names = {id(p): n for n, p in params}
    log = []
    real = linear_mod.quantize_with_amax

    def logged(t, dtype, layout="row", *a, amax=None, **k):
        if id(t) in names:
            log.append((names[id(t)], layout, amax is None, inside_backward()))
        return real(t, dtype, layout, *a, amax=amax, **k)

    monkeypatch.setattr(linear_mod, "quantize_with_amax", logged)
    return log


def run(block, x, mode):
    """Output and gradients (x's, then each parameter's) with the block plain or checkpointed."""
    x = x.detach().requires_grad_()
    if mode == "plain":
        out = block(x)
    elif mode == "reentrant":
        out = checkpoint(block, x, use_reentrant=True)
    else:
        with set_checkpoint_early_stop(mode == "early stop"):
            out = checkpoint(block, x, use_reentrant=False)
    out.float().square().sum().backward()
    result = [out.detach(), x.grad] + [p.grad for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    return result


def assert_identical(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("mode", ["early stop", "no early stop", "reentrant"])
def test_recomputation_casts_each_weight_once_with_the_forward_amax(mode, monkeypatch):
    block = Block()
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16)
    want = run(block, x, "plain")
    log = weight_casts(monkeypatch, block.named_parameters())
    got = run(block, x, mode)
    assert_identical(got, want)
    # First forward: row-major, own amax. Recomputation: both layouts from the forward's amax.
    # Backward: no cast of the weight (it reads the recomputation's column-major copy). A reentrant
    # checkpoint's recomputation (no saved-tensor hooks to recognize) reuses the amax only.
    first = [("w1.weight", "row", True, False), ("w2.weight", "row", True, False)]
    if mode == "reentrant":
        recomputed = [("w1.weight", "row", False, True), ("w2.weight", "row", False, True),
                      ("w2.weight", "col", False, True), ("w1.weight", "col", False, True)]
    else:
        recomputed = [("w1.weight", "both", False, True), ("w2.weight", "both", False, True)]
    assert log == first + recomputed


def test_plain_backward_still_casts_the_weight_from_the_forward_amax(monkeypatch):
    block = Block()
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16)
    log = weight_casts(monkeypatch, block.named_parameters())
    run(block, x, "plain")
    assert log == [("w1.weight", "row", True, False), ("w2.weight", "row", True, False),
                   ("w2.weight", "col", False, True), ("w1.weight", "col", False, True)]


def test_a_weight_written_after_forward_gets_its_own_amax_in_the_recomputation(monkeypatch):
    """An in-place write between the checkpointed forward and backward bumps the version: the
    recomputation measures the new values, as it would with nothing remembered."""

    def written_between(block, x):
        x = x.detach().requires_grad_()
        out = checkpoint(block, x, use_reentrant=False)
        with torch.no_grad():
            block.w1.weight.mul_(4)
        out.float().square().sum().backward()
        with torch.no_grad():
            block.w1.weight.div_(4)  # exact: a power of two
        result = [x.grad] + [p.grad for p in block.parameters()]
        block.zero_grad(set_to_none=True)
        return result

    block = Block()
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16)
    with monkeypatch.context() as m:
        m.setattr(weight_amax, "latest", lambda w: None)
        want = written_between(block, x)
    log = weight_casts(monkeypatch, block.named_parameters())
    got = written_between(block, x)
    assert ("w1.weight", "both", True, True) in log and ("w2.weight", "both", False, True) in log
    assert_identical(got, want)


def test_every_forward_replaces_the_remembered_amax():
    """A write the version counter does not see (`.data`) followed by a new forward: that forward's
    amax is the one remembered, so the recomputation of that forward is exact."""
    block = Block()
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16)
    run(block, x, "no early stop")
    block.w1.weight.data.mul_(4)  # no version bump
    got = run(block, x, "no early stop")
    want = run(block, x, "plain")
    assert_identical(got, want)


def test_the_amax_lives_on_its_weight_and_is_never_reused_for_another():
    """The entry is the weight's own (freed with it, no weak reference: swap_tensors still works);
    a copy of the weight, another tensor, the weight given other storage or after a write gets none;
    the weight's storage freed and filled again (FSDP2's reshard and regather) keeps it."""
    layer = Float8Linear(64, 64, bias=False, device=DEVICE, dtype=torch.bfloat16)
    layer(torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16))
    assert weight_amax.latest(layer.weight) is not None
    assert weakref.getweakrefcount(layer.weight) == 0
    assert weight_amax.latest(torch.randn(64, 64, device=DEVICE, dtype=torch.bfloat16)) is None
    assert weight_amax.latest(copy.deepcopy(layer).weight) is None  # the copy's storage differs
    storage = layer.weight.untyped_storage()  # freed and filled again with the same values, version kept
    values = layer.weight.detach().clone()
    storage.resize_(0)
    storage.resize_(values.numel() * values.element_size())
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(layer.weight):
        layer.weight.copy_(values)
    assert weight_amax.latest(layer.weight) is not None  # as FSDP2 regathers a weight for a recomputation
    held = layer.weight.data
    layer.weight.data = values  # other storage, the same values and version: not the remembered tensor
    assert weight_amax.latest(layer.weight) is None
    layer.weight.data = held
    assert weight_amax.latest(layer.weight) is not None
    with torch.no_grad():
        layer.weight.mul_(2)
    assert weight_amax.latest(layer.weight) is None
    probe = weakref.ref(layer.weight.__dict__[weight_amax.ATTR].amax)  # the amax record goes with the weight
    del layer
    gc.collect()
    assert probe() is None


def test_modules_convert_by_swapping_their_weights_after_a_step():
    """Module.to() swaps parameters (torch.utils.swap_tensors) for tensor-subclass parameters and
    under set_swap_module_params_on_conversion(True); swap_tensors refuses a tensor with weak
    references, so nothing f8tensor keeps after a forward and backward may hold one."""
    layer = Float8Linear(64, 64, bias=False, device=DEVICE, dtype=torch.bfloat16)
    layer(torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)).sum().backward()
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.to(torch.float32)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert layer.weight.dtype == torch.float32


def test_inference_forwards_remember_nothing():
    layer = Float8Linear(64, 64, bias=False, device=DEVICE, dtype=torch.bfloat16)
    with torch.inference_mode():
        w = layer.weight.detach().clone()
        layer.weight = nn.Parameter(w, requires_grad=False)
        layer(torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16))
    assert weight_amax.latest(layer.weight) is None and weight_amax.ATTR not in layer.weight.__dict__


def test_the_first_forward_casts_inputs_row_major_only(monkeypatch):
    """What a checkpoint's first forward saves is dropped: it casts each input for its forward
    GEMM only; the recomputation casts both layouts, as the unchecked forward does."""
    block = Block()
    log = []
    real = linear_mod.quantize_with_amax
    params = {id(p) for p in block.parameters()}

    def logged(t, dtype, layout="row", *a, amax=None, **k):
        if id(t) not in params and dtype == torch.float8_e4m3fn:
            log.append((layout, inside_backward()))
        return real(t, dtype, layout, *a, amax=amax, **k)

    monkeypatch.setattr(linear_mod, "quantize_with_amax", logged)
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16)
    run(block, x, "plain")
    assert log == [("both", False)] * 2
    log.clear()
    run(block, x, "no early stop")
    assert log == [("row", False)] * 2 + [("both", True)] * 2


def test_a_kept_stand_in_fails_loudly(monkeypatch):
    """Were checkpointing's first-forward hooks to keep what they pack (a torch that changed them),
    backward would read a stand-in: it raises, naming the cause, rather than use it."""
    import f8tensor.torch_internals as ti

    block = Block()
    x = torch.randn(2, 64, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    monkeypatch.setattr(linear_mod, "checkpoint_phase", lambda: "forward")
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = block(x)
    monkeypatch.setattr(linear_mod, "checkpoint_phase", ti.checkpoint_phase)
    with pytest.raises(RuntimeError, match="stand-in its checkpointed first forward saved"):
        out.float().sum().backward()


def test_fake_weights_remember_nothing():
    """Under FakeTensorMode (shape propagation, memory estimation) a weight has no storage to key an
    entry on: nothing is remembered and its data pointer is never read (PyTorch warns on that)."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Accessing the data pointer of FakeTensor is deprecated"
        with FakeTensorMode(allow_non_fake_inputs=True):
            layer = Float8Linear(64, 64, bias=False, device=DEVICE, dtype=torch.bfloat16)
            layer(torch.empty(8, 64, device=DEVICE, dtype=torch.bfloat16))
    assert weight_amax.ATTR not in layer.weight.__dict__


def test_a_full_view_of_the_weight_shares_its_entry():
    """DTensor.to_local() hands the layer a new full view of the local shard per call: the entry is
    the shard's, so the recomputation's view finds the first forward's."""
    layer = Float8Linear(64, 64, bias=False, device=DEVICE, dtype=torch.bfloat16)
    w = layer.weight.detach()
    first = w.view_as(w)
    weight_amax.remember(first, torch.ones((), device=DEVICE))
    assert weight_amax.ATTR in w.__dict__ and weight_amax.ATTR not in first.__dict__
    assert weight_amax.latest(w.view_as(w)) is not None
    assert weight_amax.latest(w[:32]) is None  # a part of it is another tensor
