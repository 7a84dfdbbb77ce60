"""Float8Config(keep_fp8_weight=True): the weight is cast once while unchanged, results are the
same bits as casting every time, and every documented change invalidates the kept copies."""

import gc
import weakref

import pytest
import torch
from f8utils import DEVICE
from torch import nn
from torch.utils.checkpoint import checkpoint

import f8tensor.core.linear as linear_mod
import f8tensor.core.weight_cache as weight_cache
from f8tensor import Float8Config, Float8Linear, forget_fp8_weights

KEEP = Float8Config(keep_fp8_weight=True)


@pytest.fixture(autouse=True)
def empty_cache():
    forget_fp8_weights()
    yield
    forget_fp8_weights()


def model(config=None, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        Float8Linear(64, 128, device=DEVICE, dtype=torch.bfloat16, config=config), nn.GELU(),
        Float8Linear(128, 32, device=DEVICE, dtype=torch.bfloat16, config=config))


def micro_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 16, 64, generator=g).to(DEVICE, torch.bfloat16) for _ in range(n)]


def accumulate(m, batches, ckpt=False):
    """Gradient accumulation over `batches`: (outputs, gradients of every parameter)."""
    outs = []
    for x in batches:
        x = x.requires_grad_()
        out = checkpoint(m, x, use_reentrant=False) if ckpt else m(x)
        out.float().square().mean().backward()
        outs.append(out.detach())
    return outs, [p.grad.clone() for p in m.parameters()]


@pytest.fixture
def weight_casts(monkeypatch):
    """Every quantization of a 2-D weight-shaped tensor: (data_ptr, layout). (Backward gets the
    weight back from autograd's saved tensors, not always as the Parameter object.)"""
    casts = []

    def counting(real):
        def wrapper(t, dtype, layout="row", *args, **kwargs):
            if tuple(t.shape) in ((128, 64), (32, 128)):  # the weights of model(); inputs are [.., 64|128]
                casts.append((t.data_ptr(), layout))
            return real(t, dtype, layout, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(linear_mod, "quantize_with_amax", counting(linear_mod.quantize_with_amax))
    monkeypatch.setattr(weight_cache, "quantize_with_amax", counting(weight_cache.quantize_with_amax))
    return casts


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_same_bits_as_casting_every_time(ckpt):
    batches = micro_batches(3)
    want_outs, want_grads = accumulate(model(), batches, ckpt)
    got_outs, got_grads = accumulate(model(KEEP), batches, ckpt)
    for want, got in zip(want_outs + want_grads, got_outs + got_grads, strict=True):
        assert torch.equal(want, got)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_each_weight_cast_once_per_optimizer_step(weight_casts, ckpt):
    m = model(KEEP)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    accumulate(m, micro_batches(3), ckpt)
    ids = [m[0].weight.data_ptr(), m[2].weight.data_ptr()]
    assert sorted(weight_casts) == sorted((i, "both") for i in ids)  # not 3 x (row + col)
    assert weight_cache.kept_fp8_weights() == 2
    opt.step()  # changes the weights: the kept copies go, and their memory
    assert weight_cache.kept_fp8_weights() == 0
    weight_casts.clear()
    accumulate(m, micro_batches(2), ckpt)
    assert sorted(weight_casts) == sorted((i, "both") for i in ids)


def test_casting_every_time_without_the_option(weight_casts):
    m = model()
    accumulate(m, micro_batches(3), ckpt=True)
    # per micro-batch and layer: forward row, recomputation both (its column-major copy is
    # backward's; test_recompute_weight.py)
    assert sorted(layout for _, layout in weight_casts) == ["both"] * 6 + ["row"] * 6
    assert weight_cache.kept_fp8_weights() == 0


def test_after_an_optimizer_step_results_follow_the_new_weights():
    batches = micro_batches(2)
    runs = []
    for config in (None, KEEP):
        m = model(config)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        steps = []
        for x in batches:
            steps.append(accumulate(m, [x]))
            opt.step()
            opt.zero_grad()
        runs.append(steps)
    for (want_outs, want_grads), (got_outs, got_grads) in zip(*runs, strict=True):
        for want, got in zip(want_outs + want_grads, got_outs + got_grads, strict=True):
            assert torch.equal(want, got)


def test_in_place_write_is_seen():
    m, x = model(KEEP), micro_batches(1)[0]
    m(x)
    with torch.no_grad():
        m[0].weight.mul_(2)  # bumps the version counter
    ref = model()
    ref.load_state_dict(m.state_dict())
    assert torch.equal(m(x), ref(x))


def test_new_storage_is_seen():
    m, x = model(KEEP), micro_batches(1)[0]
    m(x)
    m[0].weight.data = m[0].weight.data * 2  # same object and version, new storage
    ref = model()
    ref.load_state_dict(m.state_dict())
    assert torch.equal(m(x), ref(x))


def test_write_through_data_needs_forget():
    """The documented blind spot: `.data` writes bypass the version counter. forget_fp8_weights()
    is the remedy; this test pins both halves of that statement."""
    m, x = model(KEEP), micro_batches(1)[0]
    before = m(x)
    m[0].weight.data.mul_(2)
    assert torch.equal(m(x), before)  # stale: not seen
    forget_fp8_weights()
    ref = model()
    ref.load_state_dict(m.state_dict())
    assert torch.equal(m(x), ref(x))


def test_kept_copies_go_with_the_module():
    m = model(KEEP)
    m(micro_batches(1)[0])
    assert weight_cache.kept_fp8_weights() == 2
    del m
    gc.collect()
    assert weight_cache.kept_fp8_weights() == 0


def test_inference_mode_eval_then_training():
    """An eval forward under inference_mode keeps normal (not inference) tensors: the next
    training step reuses them and can save them for backward."""
    m, x = model(KEEP), micro_batches(1)[0]
    ref = model()
    with torch.inference_mode():
        assert torch.equal(m(x), ref(x))
        assert torch.equal(m(x), ref(x))
    assert weight_cache.kept_fp8_weights() == 2
    assert not any(e.row.is_inference() or e.col.is_inference() for e in weight_cache.ENTRIES if e.key is not None)
    want = accumulate(ref, [x.clone()])
    got = accumulate(m, [x.clone()])
    for a, b in zip(want[0] + want[1], got[0] + got[1], strict=True):
        assert torch.equal(a, b)


def test_dropped_copies_are_freed_at_once():
    """Without a garbage collection: an optimizer step, a replaced entry and a freed parameter
    each free the float8 copies immediately (no reference cycle keeps them)."""
    m, x = model(KEEP), micro_batches(1)[0]
    opt = torch.optim.SGD(m.parameters(), lr=0.1)

    def row_ref(layer):
        return weakref.ref(m[layer].weight.__dict__[weight_cache.ATTR].row)

    gc.disable()
    try:
        accumulate(m, [x])
        kept = row_ref(0)
        opt.step()
        assert kept() is None
        m(x)
        kept = row_ref(0)
        with torch.no_grad():
            m[0].weight.add_(1)
        m(x)  # replaces the entry
        assert kept() is None and row_ref(0)() is not None
        del m, opt
        m = model(KEEP)
        m(x)
        kept = row_ref(0)
        del m  # the parameters go with the model: their entries go too
        assert kept() is None
    finally:
        gc.enable()


def test_optimizer_step_drops_copies_of_writes_the_version_does_not_show():
    """FSDP2's all-gather writes the unsharded parameter without bumping its version; what makes
    kept copies safe there is that any torch.optim step drops them all."""
    m, x = model(KEEP), micro_batches(1)[0]
    m(x)
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(m[0].weight):
        m[0].weight.mul_(2)  # as FSDP2's copy-out of updated shards: same storage, same version
    ref = model()
    ref.load_state_dict(m.state_dict())
    assert not torch.equal(m(x), ref(x))  # not seen by itself
    other = torch.zeros(1, requires_grad=True)
    other.grad = torch.ones(1)
    torch.optim.SGD([other], lr=0.1).step()  # any optimizer's step
    assert torch.equal(m(x), ref(x))


def test_subclass_weight_is_refused_with_the_fix_named():
    class Marked(torch.Tensor):
        pass

    m = Float8Linear(64, 32, device=DEVICE, dtype=torch.bfloat16, config=KEEP)
    m.weight = nn.Parameter(m.weight.detach().as_subclass(Marked))
    with pytest.raises(TypeError, match="keep_fp8_weight=False"):
        m(micro_batches(1)[0])


def test_repr_names_the_option():
    assert "keep_fp8_weight" in repr(model(KEEP))
    assert "keep_fp8_weight" not in repr(model())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_records_the_cast():
    """A graph captured while copies are kept must still cast: its replays run after the weight
    changed, where no host-side cache check happens."""
    m = Float8Linear(256, 512, device="cuda", dtype=torch.bfloat16, config=KEEP)
    ref = Float8Linear(256, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                m(x)  # compiles the kernels and keeps the copies
        torch.cuda.current_stream().wait_stream(side)
        assert weight_cache.kept_fp8_weights() == 1
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(x)
        m.weight.mul_(2)
        graph.replay()
        ref.load_state_dict(m.state_dict())
        assert torch.equal(out, ref(x))


def test_a_kept_weight_alive_at_interpreter_exit_prints_nothing():
    """The weak reference's callback runs while the interpreter tears down module globals: it reads
    none, so no 'Exception ignored' traceback at exit."""
    import os
    import subprocess
    import sys

    script = ("import torch, f8tensor\n"
              "m = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(torch.bfloat16)\n"
              "config = f8tensor.Float8Config(keep_fp8_weight=True, emulate=True)\n"
              "f8tensor.convert_to_float8_training(m, config=config, module_filter_fn=lambda m, n: True)\n"
              "m(torch.randn(16, 64, dtype=torch.bfloat16)).sum().backward()\n"
              "print('ran')\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0 and run.stdout.strip() == "ran", run.stderr[-2000:]
    assert "Exception ignored" not in run.stderr, run.stderr[-2000:]


def test_no_weak_reference_to_the_weight_so_modules_convert_by_swapping():
    """Module.to() and load_state_dict() swap parameters (torch.utils.swap_tensors) under
    set_swap_module_params_on_conversion(True), which refuses a tensor with a weak reference: the
    kept copies are the weight's own attribute, and the module registry holds the entry weakly."""
    m, x = model(KEEP), micro_batches(1)[0]
    m(x)
    assert weight_cache.kept_fp8_weights() == 2
    assert all(weakref.getweakrefcount(layer.weight) == 0 for layer in (m[0], m[2]))
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.to(torch.float32)
        m.load_state_dict(model(seed=3).float().state_dict())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    ref = model(seed=3).float()
    assert torch.equal(m(x.float()), ref(x.float()))  # kept copies or not: the same bits


def test_copies_and_pickles_of_a_weight_carry_no_float8_copies():
    """copy.deepcopy of a tensor and torch.save of a module object keep a tensor's attributes: the
    entry goes along as nothing (no duplicated float8 copies, none written to the file), and the
    loaded copy casts for itself."""
    import copy
    import io

    m, x = model(KEEP), micro_batches(1)[0]
    want = m(x)
    plain = m[0].weight.detach().clone()
    plain.__dict__[weight_cache.ATTR] = m[0].weight.__dict__[weight_cache.ATTR]
    copied = copy.deepcopy(plain)  # Tensor.__deepcopy__ copies __dict__ (Parameter's does not)
    assert copied.__dict__[weight_cache.ATTR] is None
    buf = io.BytesIO()
    torch.save(m, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert not loaded[0].weight.__dict__.get(weight_cache.ATTR)  # an empty OrderedDict: no f8tensor class
    assert b"_Entry" not in buf.getvalue()  # neither entry class was pickled (torch.save stores the pickle uncompressed)
    # Parameters with their attributes (state_dict(keep_vars=True)) load with torch.load's default,
    # the weights-only unpickler, which refuses classes it does not know.
    buf = io.BytesIO()
    torch.save(m.state_dict(keep_vars=True), buf)
    state = torch.load(io.BytesIO(buf.getvalue()))
    assert torch.equal(state["0.weight"], m[0].weight)
    assert weight_cache.kept_fp8_weights() == 2  # the loaded module's weights hold nothing yet
    assert torch.equal(loaded(x), want)
    assert weight_cache.kept_fp8_weights() == 4
