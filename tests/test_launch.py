"""The direct kernel relaunch (kernels/launch.py, plans in kernels/quantize.py): which Triton versions
take it, and on the GPU that it gives the bits of Triton's own launch path in every case a plan or
relaunch key must tell apart. Run it on the GPU after any Triton upgrade."""

import warnings

import pytest
import torch
from f8utils import DEVICE

ON_GPU = DEVICE.type == "cuda"
GPU = pytest.mark.skipif(not ON_GPU, reason="relaunches CUDA kernels")


def test_only_checked_triton_versions_take_the_direct_launch(monkeypatch):
    from f8tensor.kernels import launch

    assert launch.triton_checked("3.6.0") and launch.triton_checked("3.6.1")
    assert not launch.triton_checked("3.7.0") and not launch.triton_checked("4.0.0")
    monkeypatch.setattr(launch, "INTERPRETING", False)
    monkeypatch.setattr(launch, "raw_stream_available", lambda: True)
    monkeypatch.setattr(launch, "_TRITON_CHECKED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not launch.relaunch_possible() and not launch.relaunch_possible()
    assert len(caught) == 1 and "its kernel launcher was not checked" in str(caught[0].message)


@pytest.fixture
def replays(monkeypatch):
    """Q (the quantize module) with a switch for the direct path and a count of plan replays."""
    import f8tensor.kernels.quantize as Q

    count = {"n": 0}
    replay = Q._Plan.__call__

    def counted(self, *args):
        count["n"] += 1
        return replay(self, *args)

    monkeypatch.setattr(Q._Plan, "__call__", counted)
    possible = Q.relaunch_possible
    assert possible(), "the direct relaunch is off here (interpreter, unchecked Triton or launch hooks)"

    def fast(on: bool):
        monkeypatch.setattr(Q, "relaunch_possible", possible if on else (lambda: False))

    return Q, fast, count


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _bits(t):
    return None if t is None else t.view(_SAME_SIZE_INT[t.element_size()]).clone()


def _same(a, b) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and x.shape == y.shape
               and x.stride() == y.stride() and torch.equal(x, y)) for x, y in zip(a, b))


def _rnd(shape, dtype, scale=3.0):
    return (torch.randn(shape, device="cuda", dtype=torch.float32) * scale).to(dtype)


def _check(replays, x, f8=torch.float8_e4m3fn, layout="both", p2=False, mode="staged", amax=None):
    """Triton's launch path, then the plan recorded (or replayed), then a replay: the same bits."""
    Q, fast, count = replays

    def run():
        out = Q.quantize_triton_with_amax(x, f8, layout, p2, amax_mode=mode, amax=amax)[:3]
        torch.cuda.synchronize()
        return tuple(_bits(t) for t in out)

    fast(False)
    ref = run()
    fast(True)
    first = run()
    n = count["n"]
    second = run()
    assert _same(ref, first) and _same(ref, second) and count["n"] == n + 1


SHAPES = [(1, 16), (17, 48), (64, 1), (1, 1), (128, 256), (144, 272), (1000, 1000), (333, 4097), (4096, 4096)]


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_replays_give_triton_launch_bits(replays, dtype, shape):
    """Ints == 1 and not multiples of 16, every dtype, format and layout, power-of-2 with the atomic
    amax, column-major and misaligned inputs, and a hit of the same shape class with other values."""
    for f8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        for layout in ("row", "col", "both"):
            _check(replays, _rnd(shape, dtype), f8, layout)
    _check(replays, _rnd(shape, dtype), p2=True, mode="atomic")
    _check(replays, _rnd(shape, dtype).t())
    M, N = shape
    flat = _rnd(M * N + 1, dtype)
    _check(replays, flat[1:].view(M, N))  # data_ptr not 16-byte aligned
    _check(replays, _rnd((M + 16, N + 32), dtype))


@GPU
def test_given_records_non_finite_values_and_alternating_keys(replays):
    Q, fast, count = replays
    for shape in [(17, 48), (1000, 1000), (4096, 4096)]:  # a record given: only the cast is replayed
        x = _rnd(shape, torch.bfloat16)
        _check(replays, x, amax=Q.quantize_triton_with_amax(x * 3, torch.float8_e4m3fn)[3])
    for bad in (float("inf"), float("nan")):
        x = _rnd((64, 128), torch.bfloat16)
        x[3, 5] = bad
        _check(replays, x)
    for _ in range(4):  # each launch must pick the kernel of its own key, not the last one used
        for shape in [(1, 16), (17, 48), (128, 256), (64, 1)]:
            _check(replays, _rnd(shape, torch.bfloat16))


@GPU
def test_int_arguments_past_int32(replays):
    """A row stride of 2**31 + 16 / + 17 (Triton switches that argument to i64), and an input of
    more than 2**31 elements."""
    for extra in (16, 17):
        big = torch.empty((2, 2**31 + extra), device="cuda", dtype=torch.bfloat16)
        big[:, :192].copy_(_rnd((2, 192), torch.bfloat16))
        _check(replays, big[:, :192])
        del big
    x = _rnd((65536 + 64, 32768 + 128), torch.bfloat16, 1.0)
    _check(replays, x)
    del x
    torch.cuda.empty_cache()


@GPU
def test_a_launch_hook_takes_tritons_path_and_sees_every_launch(replays):
    import triton

    Q, fast, count = replays
    seen = []
    hook = seen.append
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        n = count["n"]
        Q.quantize_triton_with_amax(_rnd((128, 256), torch.bfloat16), torch.float8_e4m3fn, "both")
        torch.cuda.synchronize()
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert count["n"] == n and len(seen) == 2


@GPU
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_the_key_holds_the_current_device(replays):
    with torch.cuda.device(1):
        for shape in [(17, 48), (128, 256)]:
            x = (torch.randn(shape, device="cuda:1") * 3).bfloat16()
            _check(replays, x)


@GPU
def test_fused_op_relaunches_give_triton_launch_bits(monkeypatch):
    """The fused ops' kernels go through launch_kernel: relaunched from its recorded cases, they give
    the bits of Triton's own launch (odd sizes, both RoPE forms, backward with its output strides)."""
    from f8tensor.kernels import launch
    from f8tensor.kernels.rms_norm import rms_norm_backward_triton, rms_norm_triton
    from f8tensor.kernels.rope import rope_triton
    from f8tensor.kernels.swiglu import swiglu_backward_triton, swiglu_triton

    relaunches = []
    call = launch.Relaunch.__call__
    monkeypatch.setattr(launch.Relaunch, "__call__", lambda self, *a: relaunches.append(1) or call(self, *a))
    possible = launch.relaunch_possible
    bf16 = torch.bfloat16
    a, b, g = _rnd((333, 4097), bf16), _rnd((333, 4097), bf16), _rnd((333, 4097), bf16)
    x, w = _rnd((3, 111, 2048), bf16), _rnd(2048, bf16, 1.0)
    rstd = rms_norm_triton(x, w, 1e-5)[1]
    q = _rnd((2, 64, 8, 128), bf16).transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D]
    cos, sin = _rnd((64, 128), torch.float32, 1.0), _rnd((64, 128), torch.float32, 1.0)
    cases = {
        "swiglu": lambda: swiglu_triton(a, b),
        "swiglu backward": lambda: swiglu_backward_triton(g, a, b),
        "rms_norm": lambda: rms_norm_triton(x, w, 1e-5),
        "rms_norm backward": lambda: rms_norm_backward_triton(x, x, w, rstd),
        "rope": lambda: rope_triton(q, cos, sin),
        "rope interleaved backward": lambda: rope_triton(q, cos, sin, backward=True, interleaved=True,
                                                         out_strides=q.stride()),
    }
    for name, fn in cases.items():
        monkeypatch.setattr(launch, "relaunch_possible", lambda: False)
        ref = fn()
        monkeypatch.setattr(launch, "relaunch_possible", possible)
        first = fn()
        n = len(relaunches)
        second = fn()
        torch.cuda.synchronize()
        as_tuple = (lambda out: out if isinstance(out, tuple) else (out,))
        assert _same(*[tuple(_bits(t) for t in as_tuple(out)) for out in (ref, first)]), name
        assert _same(*[tuple(_bits(t) for t in as_tuple(out)) for out in (ref, second)]), name
        assert len(relaunches) > n, f"{name}: the second call did not relaunch"
