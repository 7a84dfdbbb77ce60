"""Rowwise scaling: the kernels against their reference, Float8Linear's GEMMs against _scaled_mm on
reference-quantized operands, the recipes' accuracy with outliers, and the errors.

Kernels: bit for bit (on CPU in the interpreter with exact rounding, as tests/test_kernels.py
explains; on the GPU with the hardware cast too).
"""

import pytest
import torch
from f8utils import DEVICE, FLOAT8_DTYPES, HP_DTYPES, cpu_rowwise_gemm, spanning_values, sqnr, train_step
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from f8tensor import Float8Config, Float8Linear
from f8tensor.kernels import quantize_cols, quantize_rows, quantize_rowwise_ref
from f8tensor.kernels.naive import axis_amax_ref

triton = pytest.importorskip("triton")
from f8tensor.kernels.rowwise import col_cast_triton, row_cast_triton  # noqa: E402
from f8tensor.kernels.scale import INTERPRETING  # noqa: E402

ON_GPU = DEVICE.type == "cuda"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
SHAPES = [(1, 16), (17, 48), (130, 300), (64, 1), (3, 32), (0, 16), (16, 0)] + (
    [(4095, 4097), (16384, 4096)] if ON_GPU else [])
EXACT_ROUND = [True] if INTERPRETING else [False, True]
E4M3 = torch.float8_e4m3fn


def same_fp8(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.numel() == 0 or a.stride() == b.stride(), (a.stride(), b.stride())
    nan_a = a.float().isnan()
    assert torch.equal(nan_a, b.float().isnan())
    bad = (a.view(torch.uint8) != b.view(torch.uint8)) & ~nan_a
    assert not bad.any(), f"{int(bad.sum())} of {a.numel()} codes differ"


def same_values(a, b):
    """Equal, NaN where the other is NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


# The row pass's ways: rows in one tile (default for rows up to 16384 wide), or read twice in
# 32-wide chunks; the column amax pass with small blocks (several row slices per column block).
PATHS = {"one_pass": {}, "two_pass": dict(block_m=4, block_n=32), "small_amax_blocks": dict(amax_blocks=(16, 32, 4))}


def triton_rowwise(x, f8, layout, power_of_2, path="one_pass", **options):
    write_row = layout in ("row", "both")
    want_col = layout in ("col", "both")
    row, row_scale, col_amax = row_cast_triton(x, f8, power_of_2, write_row=write_row, col_amax=want_col,
                                               **PATHS[path], **options)
    col = col_scale = None
    if want_col:
        col, col_scale = col_cast_triton(x, f8, col_amax, power_of_2, **options)
    return row, row_scale, col, col_scale, col_amax


def test_column_cast_takes_its_amaxes_as_given():
    """col_cast_triton's column amaxes set the scales: read in any layout (a strided record), and for
    an input without rows (an empty shard) too, as the reference's."""
    from f8tensor.kernels.naive import scale_from_amax_ref

    x = spanning_values((130, 96), torch.bfloat16)
    _, _, col_amax = row_cast_triton(x, torch.float8_e4m3fn, write_row=False, col_amax=True)
    strided = torch.stack([col_amax, col_amax * 0], dim=1).flatten()[::2]
    assert torch.equal(col_cast_triton(x, torch.float8_e4m3fn, strided)[1],
                       col_cast_triton(x, torch.float8_e4m3fn, col_amax)[1])
    _, scale = col_cast_triton(x[:0], torch.float8_e4m3fn, col_amax)
    assert torch.equal(scale, scale_from_amax_ref(col_amax, torch.float8_e4m3fn)[1].reshape(1, -1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hp_dtype", HP_DTYPES)
@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES)
@pytest.mark.parametrize("layout", ["row", "col", "both"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("exact_round", EXACT_ROUND)
def test_kernels_match_reference(shape, hp_dtype, float8_dtype, layout, path, exact_round):
    check_kernels(shape, hp_dtype, float8_dtype, layout, False, path, exact_round)


@pytest.mark.parametrize("float8_dtype", FLOAT8_DTYPES)
@pytest.mark.parametrize("path", ["one_pass", "two_pass"])
def test_kernels_match_reference_with_power_of_2_scales(float8_dtype, path):
    for shape in SHAPES:
        check_kernels(shape, torch.bfloat16, float8_dtype, "both", True, path, INTERPRETING)


def check_kernels(shape, hp_dtype, float8_dtype, layout, power_of_2, path, exact_round):
    x = spanning_values(shape, hp_dtype)
    if min(shape) > 8:  # a non-finite value poisons its own row and column only
        x[1, 2], x[3, 5] = float("nan"), float("inf")
    got = triton_rowwise(x, float8_dtype, layout, power_of_2, path, exact_round=exact_round)
    want = quantize_rowwise_ref(x, float8_dtype, layout, power_of_2)
    for g, w in zip(got[:4], want):
        assert (g is None) == (w is None)
        if g is not None and g.dtype == float8_dtype:
            same_fp8(g, w)
        elif g is not None:
            same_values(g, w)
    if got[4] is not None:
        same_values(got[4], axis_amax_ref(x, 0).reshape(-1))


@pytest.mark.parametrize("make", ["col_major", "row_slice", "both_strided"])
def test_strided_inputs(make):
    base = spanning_values((96, 160), torch.bfloat16)
    x = {"col_major": base.t().contiguous().t(), "row_slice": base[:, 16:144], "both_strided": base[::2, ::3]}[make]
    got = triton_rowwise(x, E4M3, "both", True)
    for g, w in zip(got[:4], quantize_rowwise_ref(x, E4M3, "both", True)):
        same_fp8(g, w) if g.dtype == E4M3 else same_values(g, w)


def test_block_sizes_and_row_split_give_the_same_bits():
    """The column passes split rows among programs; other block sizes change nothing."""
    x = spanning_values((300, 200), torch.bfloat16)
    want = quantize_rowwise_ref(x, E4M3, "both")
    for block_m, block_n in [(16, 32), (32, 64), (64, 128)]:
        row, row_scale, col_amax = row_cast_triton(x, E4M3, write_row=True, col_amax=True, block_m=block_m,
                                                   block_n=block_n)
        got = (row, row_scale, *col_cast_triton(x, E4M3, col_amax, block_m=block_m, block_n=block_n))
        for g, w in zip(got[:4], want):
            same_fp8(g, w) if g.dtype == E4M3 else same_values(g, w)


def test_col_cast_rejects_a_record_of_another_tensor():
    x = torch.randn(32, 48, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match=r"fp32 \[48\] record"):
        col_cast_triton(x, E4M3, torch.zeros(32, device=DEVICE))
    with pytest.raises(ValueError, match="nothing to do"):
        row_cast_triton(x, E4M3, write_row=False, col_amax=False)


def test_reference_scales_each_row_and_column_by_its_own_amax():
    """The reference, checked from first principles: each row's (column's) scale is amax / 448
    of that row (column) alone, an outlier moves only its own row's and column's, and the data is
    x times 448 / amax rounded to e4m3 (the outlier itself lands on 448)."""
    x = torch.randn(64, 96)
    x[5, 40] = 1e4
    row, row_scale, col, col_scale = quantize_rowwise_ref(x, E4M3, "both")
    amax_r, amax_c = x.abs().amax(1, keepdim=True), x.abs().amax(0, keepdim=True)
    assert amax_r[5, 0] == 1e4 and (amax_r[torch.arange(64) != 5] < 10).all()
    assert amax_c[0, 40] == 1e4 and (amax_c[0, torch.arange(96) != 40] < 10).all()
    # 448 / amax correctly rounded (a tensor divided by a tensor; `448 / t` multiplies by a reciprocal)
    mult_r, mult_c = torch.tensor(448.0) / amax_r, torch.tensor(448.0) / amax_c
    assert row_scale.shape == (64, 1) and col_scale.shape == (1, 96)
    assert torch.equal(row_scale, mult_r.reciprocal()) and torch.equal(col_scale, mult_c.reciprocal())
    assert torch.equal(row.float(), (x * mult_r).clamp(-448, 448).to(E4M3).float())
    assert torch.equal(col.float(), (x * mult_c).clamp(-448, 448).to(E4M3).float())
    assert col.stride() == (1, 64) and row[5, 40].float() == 448 and col[5, 40].float() == 448


def test_dispatch_matches_reference():
    """quantize_rows / quantize_cols (what Float8Linear calls) give the reference's bits on this device."""
    x = spanning_values((48, 80), torch.bfloat16)
    row, row_scale, col_amax = quantize_rows(x, E4M3, True, col_amax=True)
    col, col_scale = quantize_cols(x, E4M3, col_amax, True)
    for g, w in zip((row, row_scale, col, col_scale), quantize_rowwise_ref(x, E4M3, "both", True)):
        same_fp8(g, w) if g.dtype == E4M3 else same_values(g, w)


@gpu_only
def test_llama_sized_tensor_bit_exact():
    x = torch.randn(16384, 14336, dtype=torch.bfloat16, device=DEVICE) * 3
    want = quantize_rowwise_ref(x, E4M3, "both", True)
    for path in PATHS:
        got = triton_rowwise(x, E4M3, "both", True, path)
        for g, w in zip(got[:4], want):
            same_fp8(g, w) if g.dtype == E4M3 else same_values(g, w)
    wide = torch.randn(64, 20000, dtype=torch.bfloat16, device=DEVICE)  # wider than one tile: two passes
    got = triton_rowwise(wide, E4M3, "both", False)
    for g, w in zip(got[:4], quantize_rowwise_ref(wide, E4M3, "both")):
        same_fp8(g, w) if g.dtype == E4M3 else same_values(g, w)


# Float8Linear under the rowwise recipes.

def layers(recipe, K=64, N=48, bias=False):
    lin = nn.Linear(K, N, bias=bias, device=DEVICE, dtype=torch.bfloat16)
    return lin, Float8Linear.from_float(nn.Linear(K, N, bias=bias, device=DEVICE, dtype=torch.bfloat16).requires_grad_(False),
                                        Float8Config.from_recipe_name(recipe))


def fp8_layer(lin, recipe):
    """A float8 copy of lin under a recipe name, or "rowwise_e5m2" (rowwise, e5m2 gradients)."""
    import copy

    config = (Float8Config(scaling_granularity="rowwise") if recipe == "rowwise_e5m2"
              else Float8Config.from_recipe_name(recipe))
    return Float8Linear.from_float(copy.deepcopy(lin), config)


@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp", "rowwise_e5m2"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_gemms_are_scaled_mm_on_reference_quantized_operands(recipe, bias):
    """Each of the three results is torch._scaled_mm of the reference's quantization, bit for bit:
    the routing picks the right operands, layouts and scales."""
    lin = nn.Linear(64, 48, bias=bias, device=DEVICE, dtype=torch.bfloat16)
    f8 = fp8_layer(lin, recipe)
    x = torch.randn(2, 16, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 16, 48, device=DEVICE, dtype=torch.bfloat16)
    out = f8(x)
    out.backward(g)
    x2, g2, w = x.detach().reshape(32, 64), g.reshape(32, 48), lin.weight.detach()
    xr, xs, xc, xcs = quantize_rowwise_ref(x2, E4M3, "both")
    wr, ws, wc, wcs = quantize_rowwise_ref(w, E4M3, "both")
    gr, gs, gc, gcs = quantize_rowwise_ref(g2, f8.config.backward_dtype, "both")
    def as_row(s):  # [1, n] with strides (n, 1), as CPU's _scaled_mm insists
        return s.reshape(-1).contiguous().unsqueeze(0)

    def as_col(s):  # [n, 1] with strides (1, 1)
        return s.reshape(-1).contiguous().unsqueeze(1)

    want_out = torch._scaled_mm(xr, wr.t(), xs, as_row(ws), out_dtype=torch.bfloat16,
                                bias=lin.bias, use_fast_accum=True)
    assert torch.equal(out.reshape(32, 48), want_out)
    want_gx = torch._scaled_mm(gr, wc, gs, wcs, out_dtype=torch.bfloat16)
    assert torch.equal(x.grad.reshape(32, 64), want_gx)
    if recipe != "rowwise_with_gw_hp":
        want_gw = torch._scaled_mm(gc.t(), xc, as_col(gcs), xcs, out_dtype=torch.bfloat16)
    else:
        want_gw = g2.t() @ x2
    assert torch.equal(f8.weight.grad, want_gw)
    if bias:
        assert torch.equal(f8.bias.grad, g2.sum(0))


@pytest.mark.parametrize("save_fp8", [True, False])
def test_saving_high_precision_input_gives_the_same_bits(save_fp8):
    lin = nn.Linear(64, 32, bias=False, device=DEVICE, dtype=torch.bfloat16)
    ref, f8 = fp8_layer(lin, "rowwise"), fp8_layer(lin, "rowwise")
    f8.config = f8.config.replace(save_fp8_for_backward=save_fp8)
    x = torch.randn(48, 64, device=DEVICE, dtype=torch.bfloat16)
    results = []
    for mod in (ref, f8):
        xi = x.clone().requires_grad_()
        mod(xi).float().square().sum().backward()
        results.append((xi.grad, mod.weight.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_shared_input_is_quantized_once(monkeypatch):
    """q, k and v read one x: its rows are cast once, its column-major copy made once."""
    import f8tensor.core.linear_rowwise as lr

    calls, saved_x_cols = [], []
    real, real_cols = lr.quantize_rows, lr.quantize_cols
    monkeypatch.setattr(lr, "quantize_rows", lambda t, *a, **k: calls.append(t.shape) or real(t, *a, **k))

    def cols(t, *a, **k):
        out = real_cols(t, *a, **k)
        if t.shape == (16, 64):
            saved_x_cols.append(out[0])
        return out
    monkeypatch.setattr(lr, "quantize_cols", cols)
    config = Float8Config.from_recipe_name("rowwise")
    qkv = [Float8Linear(64, 32, bias=False, device=DEVICE, dtype=torch.bfloat16, config=config) for _ in range(3)]
    x = torch.randn(16, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    sum(m(x).float().sum() for m in qkv).backward()
    forward_x_casts = [s for s in calls if s == (16, 64)]
    assert len(forward_x_casts) == 1  # the three weights are [32, 64]; g is [16, 32]
    # and one column-major copy of x, saved by all three
    assert len(saved_x_cols) == 1


def outlier_case(outliers: bool, seed=0):
    """A K = 1024 layer: 0.4 % of input rows and 0.8 % of weight (output) channels scaled by 1e4."""
    g = torch.Generator().manual_seed(seed)
    M, K, N = 1024, 1024, 1024
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    rows = torch.randperm(M, generator=g)[: M * 4 // 1000]
    chans = torch.randperm(N, generator=g)[: N * 8 // 1000]
    if outliers:
        x[rows] *= 1e4
        w[chans] *= 1e4
    keep_m = torch.ones(M, dtype=torch.bool)
    keep_m[rows] = False
    keep_n = torch.ones(N, dtype=torch.bool)
    keep_n[chans] = False
    return x.to(torch.bfloat16), w.to(torch.bfloat16), keep_m, keep_n


def output_sqnr(recipe, x, w, keep_m, keep_n):
    lin = nn.Linear(x.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16, device=DEVICE)
    with torch.no_grad():
        lin.weight.copy_(w)
    f8 = fp8_layer(lin, recipe)
    if not ON_GPU:  # CPU's _scaled_mm takes seconds here: the same quantized operands, multiplied in fp32
        f8.config = f8.config.replace(emulate=True)
    with torch.no_grad():
        xd = x.to(DEVICE)
        ref = xd.double() @ w.to(DEVICE).double().t()
        out = f8(xd)
    sel = (keep_m.to(DEVICE)[:, None] & keep_n.to(DEVICE)[None, :])
    return sqnr(ref[sel], out.double()[sel])


def test_rowwise_recipes_keep_ordinary_rows_accurate_beside_outliers():
    """Issue 20's acceptance: with outlier rows and channels, the output's ordinary rows and
    channels are >= 5 dB better under rowwise than under tensorwise (ideal: +6.0 dB); on gaussian
    data no recipe is below tensorwise."""
    case = outlier_case(True)
    tensorwise = output_sqnr("tensorwise", *case)
    for recipe in ("rowwise", "rowwise_with_gw_hp"):
        assert output_sqnr(recipe, *case) >= tensorwise + 5, (recipe, tensorwise)
    plain = outlier_case(False)
    tensorwise = output_sqnr("tensorwise", *plain)
    for recipe in ("rowwise", "rowwise_with_gw_hp"):
        assert output_sqnr(recipe, *plain) >= tensorwise


def test_compiled_rowwise_layer_equals_eager():
    lin = nn.Linear(64, 48, bias=True, device=DEVICE, dtype=torch.bfloat16)
    eager, compiled = fp8_layer(lin, "rowwise"), fp8_layer(lin, "rowwise")
    compiled = torch.compile(compiled, fullgraph=True)
    x = torch.randn(32, 64, device=DEVICE, dtype=torch.bfloat16)
    results = []
    for mod in (eager, compiled):
        xi = x.clone().requires_grad_()
        out = mod(xi)
        out.float().square().sum().backward()
        params = mod.parameters()
        results.append([out, xi.grad] + [p.grad for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_config_errors():
    e4m3 = dict(scaling_granularity="rowwise", backward_dtype=E4M3)
    with pytest.raises(ValueError, match="keep_fp8_weight is built for tensorwise"):
        Float8Config(**e4m3, keep_fp8_weight=True)
    with pytest.raises(ValueError, match="fsdp_float8_all_gather is built for tensorwise"):
        Float8Config(**e4m3, fsdp_float8_all_gather=True)
    with pytest.raises(ValueError, match="grad_weight_high_precision is a rowwise and blockwise option"):
        Float8Config(grad_weight_high_precision=True)
    with pytest.raises(ValueError, match="scaling_granularity must be one of"):
        Float8Config(scaling_granularity="columnwise")


def test_gemm_rules():
    """CUDA's rowwise rules, checked on every device: a bf16 output, e4m3 operands, scale shapes."""
    from f8tensor.core.ops import scaled_mm_data

    config = Float8Config.from_recipe_name("rowwise")
    a = torch.randn(32, 64, device=DEVICE).to(E4M3)
    b = torch.randn(48, 64, device=DEVICE).to(E4M3).t()
    sa, sb = torch.ones(32, 1, device=DEVICE), torch.ones(1, 48, device=DEVICE)
    with pytest.raises(TypeError, match="e5m2 x float8_e5m2"):
        scaled_mm_data(a.to(torch.float8_e5m2), sa, b.to(torch.float8_e5m2), sb, torch.bfloat16, False, config)
    # e4m3 x e5m2 and an fp32 output: as CUDA's rowwise GEMM takes them
    e5m2_b = b.float().to(torch.float8_e5m2)
    assert scaled_mm_data(a, sa, e5m2_b, sb, torch.float32, False, config).dtype == torch.float32
    with pytest.raises(ValueError, match=r"needs scale_a \[32, 1\]"):
        scaled_mm_data(a, sa.t(), b, sb, torch.bfloat16, False, config)
    # a tensorwise scale beside a rowwise one is broadcast (the same values)
    one = torch.ones((), device=DEVICE)
    assert torch.equal(scaled_mm_data(a, one, b, sb, torch.bfloat16, False, config),
                       scaled_mm_data(a, sa, b, sb, torch.bfloat16, False, config))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_and_fp32_layers(dtype):
    """CUDA's rowwise GEMM writes fp16 and fp32 too (checked on the H200): such layers train, their
    results as close to their own dtype's layer as a bf16 one's."""
    lin = nn.Linear(64, 32, bias=True, device=DEVICE, dtype=dtype)
    f8 = fp8_layer(lin, "rowwise")
    x = torch.randn(16, 64, device=DEVICE, dtype=dtype)
    want, got = train_step(lin, x), train_step(f8, x)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and sqnr(w, g) > 20


def test_float8_gathered_input_is_refused():
    from f8tensor import to_float8

    config = Float8Config.from_recipe_name("rowwise")
    f8 = Float8Linear(64, 32, bias=False, device=DEVICE, dtype=torch.bfloat16, config=config)
    with pytest.raises(TypeError, match="tensorwise recipes only"):
        f8(to_float8(torch.randn(16, 64, device=DEVICE, dtype=torch.bfloat16)))


# Float8Tensor with rowwise scales.

def test_float8_tensor_carries_rowwise_scales_through_views():
    from f8tensor import to_float8

    x = torch.randn(2, 4, 32, device=DEVICE, dtype=torch.bfloat16)
    row, col = to_float8(x, layout="both", granularity="rowwise")
    assert row.granularity == "per row" and row._scale.shape == (2, 4, 1)
    assert col.granularity == "per column" and col._scale.shape == (1, 1, 32)
    assert "scale=per row [2, 4, 1]" in repr(row)
    ref_row, ref_row_scale, ref_col, ref_col_scale = quantize_rowwise_ref(x.reshape(8, 32), E4M3, "both")
    same_fp8(row._data.reshape(8, 32), ref_row)
    assert torch.equal(row._scale.reshape(8, 1), ref_row_scale) and torch.equal(col._scale.reshape(1, 32), ref_col_scale)
    # views keep one scale per row / column and dequantize to the same values
    for view in (lambda t: t.reshape(8, 32), lambda t: t.reshape(8, 32).t(), lambda t: t[1], lambda t: t[:, 1:3],
                 lambda t: t.unsqueeze(0), lambda t: t.detach()):
        for t in (row, col):
            assert torch.equal(view(t).dequantize(), view(t.dequantize()))
    with pytest.raises(NotImplementedError, match="no single scale per row or per column"):
        row.reshape(2, 128)
    with pytest.raises(NotImplementedError, match="rowwise scales"):
        torch.cat([row, row])


def test_float8_tensor_mm_with_rowwise_scales_is_a_rowwise_gemm():
    from f8tensor import to_float8

    x = torch.randn(32, 64, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(48, 64, device=DEVICE, dtype=torch.bfloat16)
    a, b = to_float8(x, granularity="rowwise"), to_float8(w, granularity="rowwise")
    xr, xs, _, _ = quantize_rowwise_ref(x, E4M3, "row")
    wr, ws, _, _ = quantize_rowwise_ref(w, E4M3, "row")
    want = torch._scaled_mm(xr, wr.t(), xs, ws.reshape(1, 48).contiguous(), out_dtype=torch.bfloat16)
    assert torch.equal(torch.mm(a, b.t()), want)
    # a plain operand is quantized with the other's kind of scale: rowwise here
    assert torch.equal(torch.mm(x, b.t()), want)
    with pytest.raises(ValueError, match=r"needs scale_a \[32, 1\]"):  # per-column scales on the first operand
        torch.mm(to_float8(x, layout="col", granularity="rowwise").contiguous(), b.t())


def test_tensorwise_layer_refuses_a_rowwise_float8_input():
    from f8tensor import to_float8

    f8 = Float8Linear(64, 32, bias=False, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="scaled tensorwise"):
        f8(to_float8(torch.randn(16, 64, device=DEVICE, dtype=torch.bfloat16), granularity="rowwise"))


def tp_rank(rank, world, store, results, recipe="rowwise", emulate=False):
    """One of 2 CPU ranks: a column-parallel then row-parallel pair of Float8Linear layers of `recipe`."""
    import torch.distributed as dist
    from f8utils import join_process_group

    join_process_group(rank, world, store)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        model = tp_model(recipe, emulate)
        parallelize_module(model, init_device_mesh("cpu", (world,)), {"0": ColwiseParallel(), "2": RowwiseParallel()})
        with Float8Gemms() as gemms:
            step = tp_step(model)
        results[rank] = ([t.full_tensor() if hasattr(t, "full_tensor") else t for t in step], gemms.log)
    finally:
        dist.destroy_process_group()


class Float8Gemms(TorchDispatchMode):
    """The float8 GEMMs a rank runs on its local shards: _scaled_mm's scale shapes, or, where the
    GEMMs are emulated, the float8 operands widened to float32 (two per GEMM)."""

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_mm.default:
            self.log.append(("_scaled_mm", tuple(args[2].shape), tuple(args[3].shape)))
        elif (func is torch.ops.aten._to_copy.default and args[0].dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
              and (kwargs or {}).get("dtype") == torch.float32):
            self.log.append(("widened", tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


def tp_model(recipe, emulate=False):
    from f8tensor import convert_to_float8_training

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).bfloat16()
    if recipe is None:
        return model
    return convert_to_float8_training(model, config=Float8Config.from_recipe_name(recipe).replace(emulate=emulate),
                                      module_filter_fn=lambda mod, fqn: True)


def tp_step(model):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
    out = model(x)
    out.float().square().mean().backward()
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()]


def test_cpu_gemm_without_rowwise_names_the_way_out(monkeypatch):
    """A CPU _scaled_mm without rowwise scales (torch 2.11's): the error names emulate. On a torch
    whose CPU GEMM takes them (2.13), a stand-in that refuses them as 2.11's does."""
    if cpu_rowwise_gemm():
        real = torch._scaled_mm

        def tensorwise_only(a, b, scale_a, scale_b, **kwargs):
            if scale_a.numel() > 1 or scale_b.numel() > 1:
                raise RuntimeError("Invalid scaling configuration (torch 2.11's CPU _scaled_mm: tensorwise only)")
            return real(a, b, scale_a, scale_b, **kwargs)
        monkeypatch.setattr(torch, "_scaled_mm", tensorwise_only)
    f8 = Float8Linear(64, 32, bias=False, dtype=torch.bfloat16, config=Float8Config.from_recipe_name("rowwise"))
    with pytest.raises(NotImplementedError, match=r"emulate=True"):
        f8(torch.randn(16, 64, dtype=torch.bfloat16))
    f8.config = f8.config.replace(emulate=True)
    assert f8(torch.randn(16, 64, dtype=torch.bfloat16)).shape == (16, 32)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_tensor_parallel_rowwise_is_as_close_to_bf16_as_one_device(tmp_path):
    """Each rank scales its own shards' rows (a row-parallel layer's rows span its K shard only:
    never coarser than one device's); results as close to bf16 as one device's rowwise layer."""
    import torch.multiprocessing as mp

    if not cpu_rowwise_gemm():  # the ranks are CPU processes (gloo)
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm takes tensorwise scales only")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(tp_rank, args=(2, str(tmp_path / "store"), results), nprocs=2)
        results = dict(results)
    bf16 = tp_step(tp_model(None))
    one = tp_step(tp_model("rowwise"))
    for rank in (0, 1):
        got_all, gemms = results[rank]
        # float8 ran on the shards: each layer's three GEMMs, rowwise ([M, 1] and [1, N] scales)
        assert len(gemms) == 6 and all(a[1] == 1 and b[0] == 1 and a[0] > 1 and b[1] > 1 for _, a, b in gemms), gemms
        for got, want, ref in zip(got_all, one, bf16):
            # as far from bf16 as one device's rowwise layer (not closer: bf16 itself would pass a
            # lower bound alone), and close to that layer
            assert abs(sqnr(ref, got) - sqnr(ref, want)) < 1.5, (sqnr(ref, got), sqnr(ref, want))
            assert sqnr(want, got) > 20


@pytest.mark.parametrize("K", [64, 256])
def test_rowwise_operands_whose_n_is_not_a_multiple_of_16_get_the_rowwise_rule_at_any_k(K):
    """Over a K of one 128 block, [M, 1] / [1, N] scales also fit the blockwise shapes; rowwise
    operands still get the rowwise rule (N divisible by 16), not a blockwise error, and blockwise
    operands of the same shapes still run (padded)."""
    from f8tensor import to_float8

    a = torch.randn(32, K, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(24, K, device=DEVICE, dtype=torch.bfloat16)
    config = Float8Config.from_recipe_name("rowwise").replace(emulate=True)
    A, W = (to_float8(t, granularity="rowwise", config=config) for t in (a, w))
    with pytest.raises(ValueError, match="N divisible by 16"):
        torch.mm(A, W.t())
    config = Float8Config.from_recipe_name("blockwise").replace(emulate=True)
    A, W = (to_float8(t, granularity="blockwise", config=config) for t in (a, w))
    assert sqnr(a.float() @ w.float().t(), torch.mm(A, W.t()).float()) > 20
