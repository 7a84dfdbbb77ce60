"""Each private PyTorch interface f8tensor reads (f8tensor/torch_internals.py) exists in the installed
torch and answers as f8tensor relies on: a PyTorch upgrade that removes or changes one fails here,
instead of switching a gain off without a sign."""

import pytest
import torch
import torch.nn.functional as F
from f8utils import DEVICE
from torch import nn
from torch.utils.checkpoint import checkpoint

from f8tensor import torch_internals as ti


def test_saved_tensor_hooks_are_seen():
    assert ti.saved_tensors_hooks_active() is False
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert ti.saved_tensors_hooks_active() is True


def test_a_view_of_sdpas_saved_output_is_known_to_be_kept():
    """The attention output feeding wo: SDPA saves it, so Float8Linear saves it rather than a float8 copy."""
    q, k, v = (torch.randn(2, 4, 16, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # A view of o, as the [B, S, H * D] input of wo is where SDPA's kernel lays o out [B, S, H, D]
    # (CUDA's flash and cuDNN backends; the CPU one does not, so the view is made here directly).
    wo_input = o.transpose(1, 2)
    h = (q * 2).sum(1)  # a product autograd saves nothing of
    assert wo_input._base is o and ti.saved_by_producer(wo_input) and ti.saved_by_producer(o)
    assert not ti.saved_by_producer(h)
    assert ti.SAVED_NAMES  # node types were inspected


def test_under_checkpointing_nothing_is_assumed_kept():
    q, k, v = (torch.randn(2, 4, 16, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    seen = []

    def attend(q, k, v):
        o = F.scaled_dot_product_attention(q, k, v)
        seen.append(ti.saved_by_producer(o))
        return o

    checkpoint(attend, q, k, v, use_reentrant=False).sum().backward()
    assert seen and not any(seen)


def test_functorch_fx_fake_and_hooks():
    x = torch.randn(3)
    assert not ti.is_functorch_wrapped(x) and not ti.transformed(x)
    seen = []

    def loss(t):
        seen.append(ti.transformed(t))
        return t.sum()

    torch.func.grad(loss)(x)
    assert seen == [True]
    assert not ti.fx_tracing()
    traced = []
    torch.fx.symbolic_trace(type("M", (nn.Module,), {"forward": lambda self, t: traced.append(ti.fx_tracing()) or t})())
    assert traced == [True]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert ti.is_fake(torch.empty(2)) and ti.is_fake_tensor(torch.empty(2))
    assert not ti.is_fake(x) and not ti.is_fake_tensor(x)
    lin = nn.Linear(2, 2)
    assert not ti.has_hooks(lin)
    lin.register_forward_pre_hook(lambda *a: None)
    assert ti.has_hooks(lin)
    assert {"_forward_hooks", "_forward_pre_hooks", "_backward_hooks"} <= set(ti.module_hook_attributes())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA build's stream handle")
def test_current_raw_stream_on_cuda():
    assert ti.raw_stream_available()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        assert ti.current_raw_stream(torch.cuda.current_device()) == s.cuda_stream


def test_shard_placements():
    """FSDP2's placement over tensor parallelism is among the shard placements (fsdp_float8.py reads it)."""
    from torch.distributed.tensor import Shard

    from f8tensor.torch_internals import shard_placements

    assert Shard in shard_placements() and len(shard_placements()) == 2  # _StridedShard importable


def test_a_storage_is_known_through_reallocation_and_not_after_replacement():
    """same_storage holds while the storage object is resized to nothing and back (as FSDP2 frees
    and regathers a weight), not for other storage (`.data =`, a copy); the reference keeps the
    object, not its memory, and is no Python weak reference to the tensor."""
    import weakref

    w = torch.randn(64, 64, device=DEVICE)
    ref = ti.storage_ref(w)
    assert ti.same_storage(w, ref) and ti.same_storage(w.view(-1), ref) and weakref.getweakrefcount(w) == 0
    w.untyped_storage().resize_(0)
    w.untyped_storage().resize_(64 * 64 * 4)
    assert ti.same_storage(w, ref)
    assert not ti.same_storage(w.clone(), ref)
    w.data = torch.randn(64, 64, device=DEVICE)
    # The old storage's memory is freed with its last tensor; the reference keeps only the object,
    # whose address no new storage can take, so it never matches another.
    assert not ti.same_storage(w, ref) and ref.expired()
    for _ in range(100):
        assert not ti.same_storage(torch.empty(64, 64, device=DEVICE), ref)


def test_dispatch_modes_are_off_inside_and_back_after():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.randn(3)
    with Seen() as mode:
        with ti.dispatch_modes_disabled():
            x + 1
        assert mode.ops == []
        x + 1
    assert mode.ops == [torch.ops.aten.add.Tensor]


def test_written_arguments_are_those_the_schema_writes():
    a, b = torch.zeros(2), torch.ones(2)
    assert list(ti.written_arguments(torch.ops.aten.copy_.default, (a, b), {})) == [a]
    assert list(ti.written_arguments(torch.ops.aten.add.Tensor, (a, b), {})) == []
    assert list(ti.written_arguments(torch.ops.aten._foreach_add_.List, ([a, b], [b, a]), {})) == [a, b]


def test_inside_backward_is_seen_in_a_recomputation_only():
    seen = []

    def block(x):
        seen.append(ti.inside_backward())
        return x.sin()

    x = torch.randn(4, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert seen == [False, True] and not ti.inside_backward()


def test_checkpoint_phases_and_selective_checkpointing_are_recognized():
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    from torch.utils.flop_counter import FlopCounterMode

    seen = []

    def block(x):
        seen.append((ti.checkpoint_phase(), ti.selective_checkpointing_active()))
        return x.sin()

    x = torch.randn(4, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert seen == [("forward", False), ("recompute", False)]
    seen.clear()
    policy = functools.partial(create_selective_checkpoint_contexts, lambda *a, **k: CheckpointPolicy.PREFER_RECOMPUTE)
    checkpoint(block, x, use_reentrant=False, context_fn=policy).sum().backward()
    assert seen == [("forward", True), ("recompute", True)]
    seen.clear()
    checkpoint(block, x, use_reentrant=True).sum().backward()
    assert seen == [(None, False), (None, False)]
    seen.clear()
    with FlopCounterMode(display=False):  # a dispatch mode that is not selective checkpointing's
        block(x)
    assert seen == [(None, False)]
    with torch.autograd.graph.save_on_cpu():
        assert ti.checkpoint_phase() is None
    assert ti.checkpoint_phase() is None and not ti.selective_checkpointing_active()


@pytest.mark.parametrize("early_stop", [True, False])
def test_recomputation_saves_complete_only_after_the_last_save(early_stop):
    """True in a non-reentrant recomputation with early stop off once every tensor the first
    forward saved has been recomputed; never in the first forward, with early stop on, in a
    reentrant checkpoint or outside checkpointing."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    seen = []

    def block(x):
        seen.append(ti.recomputation_saves_complete())
        y = x.sin()  # saves x
        seen.append(ti.recomputation_saves_complete())
        z = y.cos()  # saves y: the last save
        seen.append(ti.recomputation_saves_complete())
        return z + 1  # saves nothing
    x = torch.randn(4, requires_grad=True)
    with set_checkpoint_early_stop(early_stop):
        checkpoint(block, x, use_reentrant=False).sum().backward()
    # early stop on: the recomputation stops inside cos, before the third look
    assert seen == [False] * 3 + ([False, False] if early_stop else [False, False, True])
    seen.clear()
    checkpoint(block, x, use_reentrant=True).sum().backward()
    assert seen == [False] * 6
    assert not ti.recomputation_saves_complete()
