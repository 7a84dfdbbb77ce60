"""Triton kernels against the PyTorch reference.

On the GPU every comparison is bit-exact with the hardware cast. On CPU the kernels run in the
Triton interpreter, whose fp32->float8 conversion mis-rounds values that round up into the next
binade (and turns NaN into 384 for e4m3fn). The kernels therefore take `exact_round`, which rounds
to the float8 grid in fp32 integer arithmetic before converting (the interpreter converts
representable values exactly). With it every element is compared exactly on CPU too, so indexing,
masking, layout, amax and scale bugs cannot hide; on the GPU both variants are checked, which
proves the helper and the hardware cast agree.
"""

import pytest
import torch
from f8utils import DEVICE, FLOAT8_DTYPES, HP_DTYPES, spanning_values

pytest.importorskip("triton")

from f8tensor.kernels import quantize_ref  # noqa: E402
from f8tensor.kernels.amax import amax_partials, amax_triton  # noqa: E402
from f8tensor.kernels.cast import launch_cast  # noqa: E402
from f8tensor.kernels.naive import amax_ref  # noqa: E402
from f8tensor.kernels.quantize import quantize_triton  # noqa: E402
from f8tensor.kernels.scale import INTERPRETING  # noqa: E402

ON_GPU = DEVICE.type == "cuda"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
# The interpreter is slow: CPU runs small shapes; the GPU adds the large ones.
SHAPES = [(1, 16), (17, 48), (130, 300), (64, 1), (3, 32)] + ([(4095, 4097), (4096, 16)] if ON_GPU else [])
EXACT_ROUND = [True] if INTERPRETING else [False, True]


def assert_same_fp8(a: torch.Tensor, b: torch.Tensor):
    """Bit equality, except that NaN codes only need to be NaN (formats have several)."""
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    nan_a, nan_b = a.float().isnan(), b.float().isnan()
    assert torch.equal(nan_a, nan_b)
    bits_a, bits_b = a.view(torch.uint8), b.view(torch.uint8)
    bad = (bits_a != bits_b) & ~nan_a
    assert not bad.any(), f"{int(bad.sum())} of {a.numel()} codes differ, first at {bad.nonzero()[0].tolist()}"


def assert_matches_reference(x, float8_dtype, layout, power_of_2=False, **kwargs):
    got = quantize_triton(x, float8_dtype, layout, power_of_2, **kwargs)
    want = quantize_ref(x, float8_dtype, layout, power_of_2)
    assert torch.equal(got[2], want[2]) or (got[2].isnan() and want[2].isnan())
    for g, w in zip(got[:2], want[:2]):
        assert (g is None) == (w is None)
        if g is not None:
            assert_same_fp8(g, w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hp_dtype", HP_DTYPES)
@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES)
@pytest.mark.parametrize("layout", ["row", "col", "both"])
@pytest.mark.parametrize("exact_round", EXACT_ROUND)
def test_quantize_matches_reference(shape, hp_dtype, float8_dtype, layout, exact_round):
    x = spanning_values(shape, hp_dtype)
    assert_matches_reference(x, float8_dtype, layout, exact_round=exact_round)


@gpu_only
@pytest.mark.parametrize("layout", ["row", "col", "both"])
def test_llama_sized_tensor_bit_exact(layout):
    x = torch.randn(16384, 14336, dtype=torch.bfloat16, device=DEVICE) * 3
    assert_matches_reference(x, torch.float8_e4m3fn, layout)


@pytest.mark.parametrize("make", ["col_major", "row_slice", "col_slice", "both_strided"])
@pytest.mark.parametrize("layout", ["row", "col", "both"])
def test_non_contiguous_inputs(make, layout):
    base = spanning_values((96, 160), torch.bfloat16)
    x = {
        "col_major": base.t().contiguous().t(),  # read as its transpose, outputs swapped
        "row_slice": base[:, 16:144],  # row stride larger than the row
        "col_slice": base.t()[:, 8:72],  # column-major with a column stride
        "both_strided": base[::2, ::3],  # neither stride is 1: the general path
    }[make]
    assert_matches_reference(x, torch.float8_e4m3fn, layout)


@pytest.mark.parametrize("block", [(64, 128, 8), (32, 64, 4), (16, 256, 4)])
@pytest.mark.parametrize("num_programs", [1, 2, 7])
def test_block_shapes_and_grid_sizes(block, num_programs):
    x = spanning_values((200, 330), torch.float16)
    block_m, block_n, num_warps = block
    assert_matches_reference(x, torch.float8_e5m2, "both", num_programs=num_programs,
                             block_m=block_m, block_n=block_n, num_warps=num_warps)


@pytest.mark.parametrize("amax_mode", ["staged", "atomic"])
@pytest.mark.parametrize("shape", [(1, 16), (130, 300), (257, 129)])
def test_amax_is_exact(amax_mode, shape):
    x = torch.randn(shape, device=DEVICE) * 7
    for num_programs in (1, 3, 8):
        got = amax_triton(x, num_programs=num_programs, atomic=amax_mode == "atomic")
        assert torch.equal(got, amax_ref(x))
    assert_matches_reference(x, torch.float8_e4m3fn, "both", amax_mode=amax_mode)


def test_amax_propagates_nan_and_inf():
    x = torch.randn(70, 90, device=DEVICE)
    x[69, 89] = float("inf")
    assert amax_triton(x, num_programs=3) == float("inf")
    x[0, 0] = float("nan")
    assert amax_triton(x, num_programs=3).isnan()


@pytest.mark.parametrize("case", ["zeros", "nan", "inf", "tiny"])
@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES)
def test_scale_edge_cases(case, float8_dtype):
    x = torch.randn(33, 80, device=DEVICE)
    if case == "zeros":
        x.zero_()
    elif case == "nan":
        x[3, 5] = float("nan")
    elif case == "inf":
        x[7, 9] = float("-inf")
    else:
        x = x * 1e-30  # amax below EPS: clamped
    assert_matches_reference(x, float8_dtype, "both")


@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES)
def test_power_of_2_scale(float8_dtype):
    assert_matches_reference(spanning_values((65, 80), torch.bfloat16), float8_dtype, "both", power_of_2=True)


def test_empty_and_bad_inputs():
    row, col, scale = quantize_triton(torch.empty(0, 32, device=DEVICE), torch.float8_e4m3fn, "both")
    assert row.shape == col.shape == (0, 32) and scale.isfinite()
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        quantize_triton(torch.ones(4, 16, dtype=torch.float64, device=DEVICE), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="2-D"):
        quantize_triton(torch.ones(2, 4, 16, device=DEVICE), torch.float8_e4m3fn)


@pytest.mark.parametrize("shape", [(17, 48), (130, 300), (1, 16), (64, 1)])
def test_transposed_store_masks_edges(shape):
    """Regression: the column-major store of edge tiles must write every in-bounds element and
    nothing else (the prototype swapped the mask axes in its transposed kernel)."""
    M, N = shape
    x = spanning_values(shape, torch.bfloat16)
    guard = 64
    poison = 0x5A  # a finite code that the data does not produce in the guard bands
    row_buf = torch.full((guard + M * N + guard,), poison, dtype=torch.uint8, device=DEVICE)
    col_buf = torch.full((guard + M * N + guard,), poison, dtype=torch.uint8, device=DEVICE)
    row_out = row_buf.view(torch.float8_e4m3fn)[guard:guard + M * N].view(M, N)
    col_out = col_buf.view(torch.float8_e4m3fn)[guard:guard + M * N].view(N, M).t()
    partials = amax_partials(x, num_programs=3)
    launch_cast(x, partials, torch.float8_e4m3fn, write_row=True, write_col=True, power_of_2=False,
                exact_round=INTERPRETING, eps=1e-12, row_out=row_out, col_out=col_out)
    want_row, want_col, _ = quantize_ref(x, torch.float8_e4m3fn, "both")
    assert_same_fp8(row_out, want_row)
    assert_same_fp8(col_out, want_col)
    for buf in (row_buf, col_buf):
        assert (buf[:guard] == poison).all() and (buf[guard + M * N:] == poison).all()


@gpu_only
def test_no_host_sync_in_quantization():
    x = torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16)
    quantize_triton(x, torch.float8_e4m3fn, "both")  # compile outside the check
    quantize_triton(x, torch.float8_e4m3fn, "both", amax_mode="atomic")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layout in ("row", "col", "both"):
            quantize_triton(x, torch.float8_e4m3fn, layout)
            quantize_triton(x.t(), torch.float8_e5m2, layout)
        quantize_triton(x, torch.float8_e4m3fn, "both", amax_mode="atomic")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_repeated_launches_reuse_compiled_kernels_correctly():
    """Second and later calls of a case replay its recorded plan (direct C launches, see
    kernels/quantize.py and kernels/launch.py) on the GPU; revisiting cases in a different order
    after others ran must give the same bits, including for misaligned inputs and sizes that
    Triton specializes (1, multiples of 16, neither)."""
    flat = spanning_values((3 * 130 * 300 + 1,), torch.bfloat16)
    cases = [
        flat[: 130 * 300].view(130, 300),
        flat[1 : 1 + 130 * 300].view(130, 300),  # 2-byte offset: not 16-byte aligned
        flat[: 64 * 48].view(64, 48),
        flat[: 48].view(1, 48),
        flat[: 33 * 17].view(33, 17),
        flat[: 130 * 300].view(300, 130).t(),  # column-major
    ]
    for _ in range(3 if ON_GPU else 1):  # the interpreter has no plan to replay
        for x in cases[::-1] + cases:
            for layout in ("row", "both"):
                assert_matches_reference(x, torch.float8_e4m3fn, layout)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("layout", ["row", "col", "both"])
def test_a_given_amax_record_skips_the_amax_pass(monkeypatch, layout, transposed):
    """Float8Linear casts its weight again in backward with forward's amax record: one pass,
    and the same bits as a full quantization (the record is what decides the scale)."""
    import importlib

    quantize_mod = importlib.import_module("f8tensor.kernels.quantize")
    x = spanning_values((300, 130) if transposed else (130, 300), torch.bfloat16)
    x = x.t() if transposed else x  # a column-major input is quantized as its transpose
    _, _, _, record = quantize_mod.quantize_triton_with_amax(x, torch.float8_e4m3fn, "row")
    _, _, _, doubled = quantize_mod.quantize_triton_with_amax(x * 2, torch.float8_e4m3fn, "row")

    def no_amax_pass(*args, **kwargs):
        raise AssertionError("the amax pass ran although an amax record was given")

    monkeypatch.setattr(quantize_mod, "amax_partials", no_amax_pass)
    for _ in range(2 if ON_GPU else 1):  # on the GPU the second call replays the recorded plan
        *got, _ = quantize_mod.quantize_triton_with_amax(x, torch.float8_e4m3fn, layout, amax=record)
        want = quantize_ref(x, torch.float8_e4m3fn, layout)
        assert torch.equal(got[2], want[2])
        for g, w in zip(got[:2], want[:2]):
            assert (g is None) == (w is None)
            if g is not None:
                assert_same_fp8(g, w)
    # Someone else's record is used as given: x quantized on the scale of 2x.
    *got, _ = quantize_mod.quantize_triton_with_amax(x, torch.float8_e4m3fn, layout, amax=doubled)
    want = quantize_ref(x, torch.float8_e4m3fn, layout, amax=amax_ref(x * 2))
    assert torch.equal(got[2], want[2])
    assert torch.equal(got[2], quantize_ref(x * 2, torch.float8_e4m3fn)[2])


@pytest.mark.parametrize("layout", ["row", "col", "both"])
def test_a_given_record_sets_the_scale_of_an_empty_input(layout):
    """An empty input (a rank's empty shard under FSDP2's float8 all-gather) quantized with a given
    record: the scale is the record's, as on the reference path, not the empty input's own; the
    record comes back as given. A record that is empty or strided is refused."""
    from f8tensor.kernels.quantize import quantize_triton_with_amax

    x = spanning_values((130, 64), torch.bfloat16)
    *_, record = quantize_triton_with_amax(x, torch.float8_e4m3fn, "row")
    empty = x[:0]
    *got, back = quantize_triton_with_amax(empty, torch.float8_e4m3fn, layout, amax=record)
    assert torch.equal(got[2], quantize_ref(x, torch.float8_e4m3fn)[2]) and back is record
    strided = torch.stack([record, record], dim=1).flatten()[::2]
    for bad in (record[:0], strided):
        with pytest.raises(ValueError, match="contiguous, not empty"):
            quantize_triton_with_amax(x, torch.float8_e4m3fn, layout, amax=bad)


def test_reference_path_amax_record():
    """The entry point's reference path (CPU, GPUs without float8) keeps the same contract."""
    from f8tensor.kernels import quantize_with_amax

    x = spanning_values((17, 48), torch.float32).cpu()
    row, _, scale, record = quantize_with_amax(x, torch.float8_e5m2, "row")
    assert torch.equal(record, amax_ref(x))
    row2, _, scale2, record2 = quantize_with_amax(x, torch.float8_e5m2, "row", amax=record * 4)
    assert torch.equal(scale2, scale * 4) and record2 is not record


def test_entry_point_takes_either_kind_of_amax_record():
    """The Triton path's int32 partials and the 0-d fp32 amax (reference path, torch.compile) are
    interchangeable at the entry point: the same bits from either, on the suite's device."""
    from f8tensor.kernels import quantize_with_amax

    x = spanning_values((130, 300), torch.bfloat16)
    want = quantize_ref(x, torch.float8_e4m3fn, "both", amax=amax_ref(x) * 3)
    _, _, _, record = quantize_with_amax(x * 3, torch.float8_e4m3fn, "row")
    # The path's own record (int32 partials from Triton, fp32 from the reference), the fp32 value,
    # and where the path gave fp32, int32 partials made by hand (one per row: the bits of each
    # row's max(|x|), as the amax kernel writes them), so both kinds reach the entry point.
    records = [record, amax_ref(x) * 3]
    if record.dtype != torch.int32:
        records.append((x * 3).abs().float().amax(dim=1).view(torch.int32) & 0x7FFFFFFF)
    assert {r.dtype for r in records} == {torch.int32, torch.float32}
    for given in records:
        row, col, scale, _ = quantize_with_amax(x, torch.float8_e4m3fn, "both", amax=given)
        assert torch.equal(scale, want[2])
        assert_same_fp8(row, want[0])
        assert_same_fp8(col, want[1])
    with pytest.raises(ValueError, match="record"):
        quantize_with_amax(x, torch.float8_e4m3fn, "row", amax=torch.zeros(3, device=x.device))


@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES)
@pytest.mark.parametrize("layout", ["row", "col", "both"])
def test_a_record_below_the_amax_saturates_as_the_reference_clamps(layout, float8_dtype):
    """A given amax an eighth of x's: scaled values up to 8x beyond the format's max, and +-inf,
    saturate to +-max, NaN stays NaN, bit for bit the reference's clamp then cast. On the GPU the
    kernel leaves the clamp to the hardware conversion (`scale.saturate_to_float8`): this is the
    check that it saturates as the clamp does, in both formats and layouts."""
    from f8tensor.kernels.quantize import quantize_triton_with_amax

    x = spanning_values((130, 300), torch.bfloat16)
    *_, record = quantize_triton_with_amax(x / 8, float8_dtype, "row")  # the record of amax(x) / 8, exactly
    given = amax_ref(x) / 8
    x[0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    x[5, 7] = -x.abs().nan_to_num(0, 0, 0).max()  # the largest finite magnitude, negative
    row, col, scale, _ = quantize_triton_with_amax(x, float8_dtype, layout, amax=record)
    want = quantize_ref(x, float8_dtype, layout, amax=given)
    assert torch.equal(scale, want[2])
    top = torch.finfo(float8_dtype).max
    for got, ref in ((row, want[0]), (col, want[1])):
        assert (got is None) == (ref is None)
        if got is not None:
            assert_same_fp8(got, ref)
            values = got.float()
            assert values[0, 0] == top and values[0, 1] == -top and values[0, 2].isnan() and values[5, 7] == -top
            assert (values.abs() == top).sum() > 3  # finite values beyond the max saturated too


SATFINITE_PROBE = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from tools.sm90_compile import compile_sm90
from f8tensor.kernels.blockwise import block_kernel
from f8tensor.kernels.cast import cast_kernel
from f8tensor.kernels.rowwise import _format, row_kernel

M, N = 256, 512
x = torch.empty(M, N, dtype=torch.bfloat16)
scales, partials = torch.empty(M * N, dtype=torch.float32), torch.empty(64, dtype=torch.int32)
ptx = {}
for float8_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
    out, fmt = torch.empty(M, N, dtype=float8_dtype), _format(float8_dtype, False, False, x)
    compiled = {
        "cast_kernel": compile_sm90(cast_kernel, (x, partials, 64, out, out.view(torch.uint8), scales, M, N, N, 1, 8, 4), 8, **fmt,
                                    WRITE_ROW=True, WRITE_COL=True, BLOCK_M=64, BLOCK_N=128, BLOCK_PARTIALS=64),
        "row_kernel": compile_sm90(row_kernel, (x, out, scales, M, N, N, 1), 4, **fmt, ONE_PASS=True,
                                   BLOCK_M=32, BLOCK_N=512),
        "block_kernel": compile_sm90(block_kernel, (x, out, scales, out.view(torch.uint8), scales, M, N, N, 1), 4,
                                     **fmt, SQUARE=False, WRITE_ROW=True, WRITE_COL=True, BLOCK_M=128, BLOCK_N=128,
                                     SUB_M=64, SUB_N=64, EVEN=True, OFFSETS_32=True, PACKED=False, COL_VEC=4,
                                     LOADS_AHEAD=False, COLUMNS_FIRST=False),
        "block_kernel words": compile_sm90(block_kernel, (x, out, scales, out.view(torch.int32), scales, M, N, N, 1),
                                           4, **fmt, SQUARE=False, WRITE_ROW=True, WRITE_COL=True, BLOCK_M=128,
                                           BLOCK_N=128, SUB_M=64, SUB_N=64, EVEN=True, OFFSETS_32=True, PACKED=True,
                                           COL_VEC=4, LOADS_AHEAD=True, COLUMNS_FIRST=False),
    }
    for kernel, c in compiled.items():
        ptx[f"{kernel} {float8_dtype}"] = c.asm["ptx"]
print(json.dumps(ptx))
"""


def test_the_cast_kernels_compile_to_the_saturating_conversion(tmp_path):
    """The GPU kernels leave the clamp to Triton's fp32 -> float8 conversion, which is right only
    while Triton compiles it to `cvt.rn.satfinite` (saturating): checked in the sm_90 PTX of the
    tensorwise, rowwise and blockwise casts (compiled here, outside the interpreter, no GPU
    needed; the blockwise cast with its column strips stored as words too, whose conversion is
    inline PTX), in both formats, with no separate clamp left (`min.NaN`)."""
    import json
    import os
    import subprocess
    import sys

    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton without its CUDA backend")
    probe = tmp_path / "probe.py"
    probe.write_text(SATFINITE_PROBE)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(probe), os.path.join(root, "benchmarks")], capture_output=True,
                         text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    ptx = json.loads(run.stdout)
    assert len(ptx) == 8
    for case, text in ptx.items():
        name = "e4m3x2" if "e4m3" in case else "e5m2x2"
        assert f"cvt.rn.satfinite.{name}.f32" in text, case
        assert "min.NaN" not in text, case


def test_an_amax_record_of_the_wrong_kind_is_refused():
    x = spanning_values((17, 48), torch.bfloat16)
    for bad in (torch.zeros(3, dtype=torch.float32, device=x.device),
                torch.zeros(3, 1, dtype=torch.int32, device=x.device)):
        with pytest.raises(ValueError, match="int32 record"):
            quantize_triton(x, torch.float8_e4m3fn, "row", amax=bad)
