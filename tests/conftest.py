import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter; this must be set before triton's
# jit decorators run, i.e. before f8tensor is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Graphs compiled here call the checking torch._scaled_mm below, and inductor's on-disk cache does
# not key on that patch: with the shared cache a later run of the same graph outside the tests
# would call the test helper (seen: AttributeError '_cuda_rules_scaled_mm'), and a graph cached
# outside the tests would skip the checks here. The tests compile into a cache of their own.
_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="f8tensor-tests-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE
atexit.register(shutil.rmtree, _INDUCTOR_CACHE, ignore_errors=True)

_real_scaled_mm = torch._scaled_mm


def _cuda_rules_scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None,
                          use_fast_accum=False, **out):
    """torch._scaled_mm with CUDA's operand rules checked first: CPU's kernel accepts more."""
    assert a.is_contiguous(), f"first operand not row-major: {a.stride()}"
    assert b.t().is_contiguous(), f"second operand not column-major: {b.stride()}"
    # storage_offset, not data_ptr: the check must also run on torch.compile's fake tensors
    assert a.storage_offset() % 16 == 0 and b.storage_offset() % 16 == 0, "operand not 16-byte aligned"
    assert not (a.dtype == b.dtype == torch.float8_e5m2), "e5m2 x e5m2"
    assert b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0, f"K, N not multiples of 16: {b.shape}"
    assert scale_a.dtype == scale_b.dtype == torch.float32, "scales must be fp32"
    M, N = a.shape[0], b.shape[1]
    if scale_a.numel() != 1 or scale_b.numel() != 1:
        if scale_a.shape == (M, 1) and scale_b.shape == (1, N):  # rowwise
            assert scale_a.is_contiguous() and scale_b.is_contiguous(), "rowwise scales must be contiguous"
            assert out_dtype in (torch.bfloat16, torch.float16, torch.float32), "rowwise writes bf16, fp16 or fp32"
        else:
            kinds = _blockwise_kinds(a, b, scale_a, scale_b)
            assert kinds in (("1x128", "128x128"), ("1x128", "1x128"), ("128x128", "1x128")), (
                f"neither rowwise nor blockwise scales: {scale_a.shape} {scale_a.stride()}, "
                f"{scale_b.shape} {scale_b.stride()}")
            k_multiple = 512 if "128x128" in kinds else 128  # 128x128 scale rows: a multiple of 4 blocks
            assert a.shape[0] % 128 == 0 and b.shape[0] % k_multiple == 0 and b.shape[1] % 128 == 0, (
                f"blockwise sizes not multiples of 128 (K: of {k_multiple}; cuBLAS's products were wrong): "
                f"{a.shape} @ {b.shape}")
            assert not use_fast_accum, "blockwise GEMMs have no fast accumulation"
            assert a.dtype == b.dtype == torch.float8_e4m3fn, "blockwise GEMMs take e4m3fn operands only"
            assert out_dtype == torch.bfloat16, "blockwise writes bf16"
            if a.device.type == "cpu":  # CPU's kernel has no blockwise scaling: the same math in fp32
                return _blockwise_product(a, b, scale_a, scale_b, bias, out_dtype)
    elif a.device.type == "cpu" and scale_result is None:
        from f8tensor.core import ops

        if ops.CPU_ROWWISE_KERNEL:
            # As ops.scaled_mm_data routes tensorwise CPU GEMMs (CPU's tensorwise kernel is two orders
            # of magnitude slower), so that a test's own tensorwise call gives the library's bits; in
            # spawned ranks too (f8utils.join_process_group installs this function).
            scale_a, scale_b = ops.tensorwise_as_rowwise(scale_a, scale_b, M, N)
    return _real_scaled_mm(a, b, scale_a, scale_b, bias=bias, scale_result=scale_result,
                           out_dtype=out_dtype, use_fast_accum=use_fast_accum, **out)


def _blockwise_kinds(a, b, scale_a, scale_b):
    """The blockwise kinds of (scale_a, scale_b) by CUDA's size and stride rules (ScaledBlas.cpp:
    is_blockwise_1x128_scaling / is_blockwise_128x128_scaling, b's checked as b.t() with scale_b.t()),
    None for a scale that fits neither."""
    def kind(t, scale):  # t [rows, K] row-major, scale as t's
        rows, k = t.shape
        kb, rb = -(-k // 128), -(-rows // 128)
        if scale.shape == (rows, kb) and scale.stride() == (1, rows):
            return "1x128"
        if scale.shape == (rb, kb) and scale.stride() == (kb, 1):
            return "128x128"
        return None
    return kind(a, scale_a), kind(b.t(), scale_b.t())


def _blockwise_product(a, b, scale_a, scale_b, bias, out_dtype):
    """(a * scale_a) @ (b * scale_b) in fp32, each scale expanded to its tiles: CPU's stand-in."""
    def expand(scale, shape):
        for dim, size in enumerate(shape):
            if scale.shape[dim] != size:
                scale = scale.repeat_interleave(128, dim)[:size] if dim == 0 else scale.repeat_interleave(128, dim)[:, :size]
        return scale
    out = (a.float() * expand(scale_a, a.shape)) @ (b.float() * expand(scale_b, b.shape))
    return (out if bias is None else out + bias).to(out_dtype)


@pytest.fixture(autouse=True)
def cuda_rules_for_scaled_mm(monkeypatch):
    """Every test's GEMMs must pass CUDA's layout and dtype rules, on every device (on CPU,
    blockwise GEMMs, which its kernel lacks, are computed in fp32 once they pass)."""
    monkeypatch.setattr(torch, "_scaled_mm", _cuda_rules_scaled_mm)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def fresh_state():
    """Every test starts from f8tensor's state as imported (f8tensor/state.py): no warning already
    given, nothing cached by an earlier test."""
    import f8tensor

    f8tensor.reset_state()
