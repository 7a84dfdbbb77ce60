"""The end-to-end benchmark script runs (tiny shapes on CPU): CI catches a broken benchmark before
a GPU session spends its time on it."""

import ast
import json
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch
import triton
from f8utils import saved_activations

from f8tensor.kernels.blockwise import PACKED_COLUMNS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test; the GPU runs the real benchmark")


def run_train(tmp_path, *flags, configs=("bf16", "f8tensor"), ablations=(), launcher=()) -> list[dict]:
    """benchmarks/train.py on a tiny model (interpreted kernels), run by `python *launcher`: its rows."""
    out = tmp_path / "train.jsonl"
    cmd = [sys.executable, *launcher, os.path.join(ROOT, "benchmarks", "train.py"), "--layers", "2",
           "--dim", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "128", "--vocab", "256", "--seq",
           "32", "--steps", "1", "--warmup", "1", "--configs", *configs, *flags, "--out", str(out)]
    if ablations:
        cmd += ["--ablations", *ablations]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@CPU_ONLY
def test_train_benchmark_runs_every_eager_config_and_ac_mode(tmp_path):
    rows = run_train(tmp_path, "--rounds", "2", "--ac-modes", "none", "every2", "full")
    assert [(r["ac"], r["config"]) for r in rows] == [
        (ac, c) for ac in ("none", "every2", "full") for c in ("bf16", "f8tensor")]
    for r in rows:
        assert r["status"] == "ok", r["status"]
        assert len(r["round_step_ms"]) == 2
        assert r["step_ms"] == pytest.approx(statistics.median(r["round_step_ms"]))
        assert r["fp8_linears"] == (14 if r["config"] == "f8tensor" else 0)
    # Same seed, same data: float8 training starts from the same loss as bf16 within fp8 noise.
    losses = {(r["ac"], r["config"]): r["loss"] for r in rows}
    for ac in ("none", "every2", "full"):
        assert abs(losses[(ac, "f8tensor")] - losses[(ac, "bf16")]) < 0.1


@CPU_ONLY
def test_train_benchmark_ac_early_stop_off_trains_alike(tmp_path):
    """--ac-early-stop off (torchtitan's trainer's default): the recomputation runs every op of a
    block again, the deferred GEMM too; the same losses, recorded in the rows."""
    on = run_train(tmp_path, "--rounds", "1", "--ac-modes", "full")
    (tmp_path / "train.jsonl").unlink()
    off = run_train(tmp_path, "--rounds", "1", "--ac-modes", "full", "--ac-early-stop", "off")
    assert [r["ac_early_stop"] for r in on + off] == ["on"] * 2 + ["off"] * 2
    assert all(r["status"] == "ok" for r in on + off)
    assert [r["loss"] for r in on] == [r["loss"] for r in off]


def test_checkpointed_blocks_under_the_recompute_everything_policy_compile_and_save_no_float8():
    """benchmarks/models.py's `--ac-compiled-policy recompute_everything`: a torchtitan block of
    Float8Linears, checkpointed under that policy and compiled (the min-cut partitioner inductor uses),
    saves no float8 activation and gives the uncheckpointed block's gradients (compiled configurations
    run on CUDA only in train.py; this is the wrapper they use). On torch < 2.12 the plain checkpoint
    fails the first check (docs/design.md); this one holds on every supported torch."""
    import types

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import models

    from f8tensor import convert_to_float8_training

    a = types.SimpleNamespace(layers=1, dim=64, heads=4, kv_heads=2, ffn=128, vocab=256, seq=32, batch=2, seed=0)
    torch.manual_seed(0)
    model, blocks = models.build("torchtitan", a)
    model = model.bfloat16()
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn != "output")
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq))

    def run():
        torch._dynamo.reset()
        block = next(iter(blocks.children()))
        block.forward = torch.compile(block.forward, backend="aot_eager_decomp_partition")
        saved, out = saved_activations(model.parameters(), lambda: model(tokens))
        saved = [dtype for _, dtype in saved]
        del block.forward
        model.zero_grad()
        out.float().square().mean().backward()
        return saved, [p.grad.clone() for p in model.parameters()]

    plain_saved, plain_grads = run()
    models.checkpoint_blocks(blocks, "full", models.recompute_everything)
    assert all(block.context == {"context_fn": models.recompute_everything} for block in blocks.children())
    saved, grads = run()
    assert any(d in (torch.float8_e4m3fn, torch.float8_e5m2) for d in plain_saved)
    assert not any(d in (torch.float8_e4m3fn, torch.float8_e5m2) for d in saved), saved
    for got, want in zip(grads, plain_grads):
        assert torch.equal(got, want)


@CPU_ONLY
def test_train_benchmark_rowwise_recipe(tmp_path):
    """--recipe rowwise: every float8 layer rowwise, the loss within fp8 noise of bf16's."""
    rows = run_train(tmp_path, "--recipe", "rowwise", "--ac-modes", "none", "full")
    for r in rows:
        assert r["status"] == "ok" and r["recipe"] == "rowwise", r["status"]
    losses = {(r["ac"], r["config"]): r["loss"] for r in rows}
    for ac in ("none", "full"):
        assert abs(losses[(ac, "f8tensor")] - losses[(ac, "bf16")]) < 0.1


@CPU_ONLY
def test_train_benchmark_blockwise_recipe(tmp_path):
    """--recipe blockwise: every float8 layer blockwise (GEMMs emulated: CPU's _scaled_mm has no blockwise)."""
    rows = run_train(tmp_path, "--recipe", "blockwise", "--emulate", "--ac-modes", "none")
    for r in rows:
        assert r["status"] == "ok" and r["recipe"] == "blockwise", r["status"]
    losses = {r["config"]: r["loss"] for r in rows}
    assert abs(losses["f8tensor"] - losses["bf16"]) < 0.1


@CPU_ONLY
def test_train_benchmark_runs_with_complex_rope(tmp_path):
    rows = run_train(tmp_path, "--rounds", "1", "--ac-modes", "none", "full", "--rope", "complex")
    assert [(r["ac"], r["config"], r["rope"], r["status"]) for r in rows] == [
        (ac, c, "complex", "ok") for ac in ("none", "full") for c in ("bf16", "f8tensor")]
    losses = {(r["ac"], r["config"]): r["loss"] for r in rows}
    assert abs(losses[("none", "f8tensor")] - losses[("none", "bf16")]) < 0.1
    assert losses[("full", "bf16")] == pytest.approx(losses[("none", "bf16")])  # recomputation: same math


@CPU_ONLY
def test_train_benchmark_runs_with_the_fused_gate_and_rope(tmp_path):
    rows = run_train(tmp_path, "--rounds", "1", "--ac-modes", "full",
                     ablations=("bf16_ops_in_code", "f8tensor_ops_in_code"))
    assert [(r["config"], r["status"], r["fp8_linears"]) for r in rows] == [
        ("bf16", "ok", 0), ("f8tensor", "ok", 14), ("f8tensor_ops_in_code", "ok", 14), ("bf16_ops_in_code", "ok", 0)]
    losses = {r["config"]: r["loss"] for r in rows}
    assert losses["bf16_ops_in_code"] == pytest.approx(losses["bf16"], abs=0.02)  # fewer roundings, same math
    assert losses["f8tensor_ops_in_code"] == pytest.approx(losses["bf16"], abs=0.1)


@CPU_ONLY
def test_train_benchmark_fusion_ablations(tmp_path):
    """f8tensor (conversion + fuse_model_ops) fuses the 5 norms, the 2 feed-forward gates and the
    RoPE calls of the 2 attention modules of the model as written; each f8tensor_no_*_fusion
    ablation leaves one of them out, f8tensor_unfused all; f8tensor_ops_in_code (gate in model code)
    leaves fusion no gate to fuse; bf16_norm_fusion swaps only the norms. All run, and their losses
    agree to 0.02: a smoke check, too coarse to see a wrong fusion (a gate 25 % off moved the loss
    by 0.004); the fusions' values on this model: test_reference_models.py."""
    ablations = ("bf16_norm_fusion", "f8tensor_ops_in_code", "f8tensor_no_norm_fusion", "f8tensor_no_gate_fusion",
                 "f8tensor_no_rope_fusion", "f8tensor_unfused")
    rows = run_train(tmp_path, "--rounds", "1", ablations=ablations)
    assert [(r["config"], r["status"], r["fp8_linears"], r["fused_norms"], r["fused_gates"], r["fused_ropes"])
            for r in rows] == [
        ("bf16", "ok", 0, 0, 0, 0), ("f8tensor", "ok", 14, 5, 2, 2), ("f8tensor_unfused", "ok", 14, 0, 0, 0),
        ("f8tensor_no_norm_fusion", "ok", 14, 0, 2, 2), ("f8tensor_no_gate_fusion", "ok", 14, 5, 0, 2),
        ("f8tensor_no_rope_fusion", "ok", 14, 5, 2, 0), ("f8tensor_ops_in_code", "ok", 14, 5, 0, 2),
        ("bf16_norm_fusion", "ok", 0, 5, 0, 0)]
    losses = {r["config"]: r["loss"] for r in rows}
    assert losses["bf16_norm_fusion"] == pytest.approx(losses["bf16"], abs=0.02)
    for config in ("f8tensor", "f8tensor_no_norm_fusion", "f8tensor_no_gate_fusion", "f8tensor_no_rope_fusion",
                   "f8tensor_ops_in_code"):
        assert losses[config] == pytest.approx(losses["f8tensor_unfused"], abs=0.02)


@CPU_ONLY
def test_train_benchmark_fused_loss_ablations_train_as_the_written_loss(tmp_path):
    """bf16_fused_loss and f8tensor_fused_loss run the loss through f8tensor.cross_entropy: the same
    first loss as the written one of their configuration, to fp32 rounding. Kept float8 weights
    (f8tensor_keep_weight_fused_loss) are the same casts: the same loss exactly."""
    rows = run_train(tmp_path, "--rounds", "1",
                     ablations=("bf16_fused_loss", "f8tensor_fused_loss", "f8tensor_keep_weight_fused_loss"))
    losses = {r["config"]: r["loss"] for r in rows if r["status"] == "ok"}
    assert set(losses) == {"bf16", "bf16_fused_loss", "f8tensor", "f8tensor_fused_loss",
                           "f8tensor_keep_weight_fused_loss"}
    assert losses["bf16_fused_loss"] == pytest.approx(losses["bf16"], rel=1e-5)
    assert losses["f8tensor_fused_loss"] == pytest.approx(losses["f8tensor"], rel=1e-5)
    assert losses["f8tensor_keep_weight_fused_loss"] == losses["f8tensor_fused_loss"]
    # an ablation named in --configs runs alone (one configuration per process, for its peak)
    (tmp_path / "train.jsonl").unlink()
    alone = run_train(tmp_path, "--rounds", "1", configs=("f8tensor_fused_loss",))
    assert [r["config"] for r in alone] == ["f8tensor_fused_loss"]
    assert alone[0]["loss"] == pytest.approx(losses["f8tensor_fused_loss"], rel=1e-5)


@CPU_ONLY
def test_train_benchmark_fused_rope_in_the_complex_form(tmp_path):
    """--rope complex: the fused configurations rotate with f8tensor.rope's interleaved form, the
    same fp32 rotation as the complex multiply (one rounding each)."""
    rows = run_train(tmp_path, "--rounds", "1", "--rope", "complex",
                     ablations=("bf16_ops_in_code", "f8tensor_ops_in_code"))
    assert [(r["config"], r["status"]) for r in rows] == [
        ("bf16", "ok"), ("f8tensor", "ok"), ("f8tensor_ops_in_code", "ok"), ("bf16_ops_in_code", "ok")]
    losses = {r["config"]: r["loss"] for r in rows}
    assert losses["bf16_ops_in_code"] == pytest.approx(losses["bf16"], abs=0.02)
    assert losses["f8tensor_ops_in_code"] == pytest.approx(losses["bf16"], abs=0.1)


def test_train_benchmark_rope_forms_rotate_alike():
    """--rope complex (Meta / torchtitan: adjacent pairs) is the rotate_half form (pairs i, i + D/2)
    with the head dimensions permuted: the two models differ in code, not in what they compute."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import train
    finally:
        sys.path.pop(0)
    seq, head_dim = 16, 8
    x = torch.randn(2, seq, 3, head_dim)
    cos, sin = train.rope_tables(seq, head_dim)
    half = train.apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)
    perm = torch.stack([torch.arange(head_dim // 2), torch.arange(head_dim // 2) + head_dim // 2], -1).flatten()
    pairs = train.apply_rope_complex(x[..., perm], train.rope_freqs_cis(seq, head_dim))
    torch.testing.assert_close(pairs, half[..., perm])
    assert not torch.allclose(half, x)  # it does rotate


@pytest.mark.parametrize("rope", ["rotate_half", "complex"])
def test_fused_rope_attention_computes_what_the_model_code_computes(rope):
    """The *_ops_in_code ablations' attention (f8tensor.rope; interleaved with --rope complex, on
    the tables the model registers) against the model's own RoPE code: same output and gradients
    (fp32 model: only rounding differs)."""
    from types import SimpleNamespace

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import train
    finally:
        sys.path.pop(0)
    a = SimpleNamespace(vocab=64, dim=64, layers=1, heads=4, kv_heads=2, ffn=128, seq=16, rope=rope)
    torch.manual_seed(0)
    model = train.Transformer(a)
    attention = model.layers[0].attention
    x = torch.randn(2, a.seq, a.dim)
    results = []
    for fused in (False, True):
        attention.fused_rope = fused
        xg = x.clone().requires_grad_()
        out = attention(xg, *model.rope())
        out.square().sum().backward()
        results.append([out, xg.grad] + [p.grad for p in attention.parameters()])
        attention.zero_grad()
    for got, want in zip(*results[::-1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_train_benchmark_default_configs_are_the_model_as_written():
    """Without --configs: the main configurations (the model as written, the README's calls), no
    ablation; on CPU no compiled configuration either."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import train
    finally:
        sys.path.pop(0)
    on_cpu = train.default_configs(torch.device("cpu"))
    assert {"bf16", "f8tensor"} <= set(on_cpu) <= {"bf16", "f8tensor", "torchao"}
    on_gpu = train.default_configs(torch.device("cuda"))
    assert {"bf16", "f8tensor", "f8tensor_compiled"} <= set(on_gpu) <= set(train.CONFIGS)
    assert not set(train.CONFIGS) & set(train.ABLATIONS) and "f8tensor_keep_weight_compiled" in train.ABLATIONS


def test_power_samples_parse_and_summarize_per_span():
    """--power's arithmetic: nvidia-smi lines parsed (unfilled ones left out), and only the samples
    inside a configuration's timed spans counted."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "tools"))
    try:
        import power
    finally:
        sys.path.pop(0)
    text = ("2026/11/29 04:14:32.100, 1980, 130.5, 0x0000000000000000\n"
            "2026/11/29 04:14:32.200, 1500, 690.0, 0x0000000000000004\n"
            "2026/11/29 04:14:32.300, [N/A], 695.0, 0x0000000000000004\n"
            "2026/11/29 04:14:32.400, 1600, 700.0, 0x0000000000000000\n"
            "garbage\n")
    samples = power.parse_samples(text)
    assert [(s[1], s[2], s[3]) for s in samples] == [(1980, 130.5, 0), (1500, 690.0, 4), (1600, 700.0, 0)]
    t0 = samples[0][0]
    assert samples[1][0] - t0 == pytest.approx(0.1, abs=1e-5)  # float seconds since 1970
    stats = power.summarize(samples, [(t0 + 0.05, t0 + 0.35)], step_s=0.2)
    assert stats == {"power_samples": 2, "sm_mhz_median": 1550, "power_w_mean": 695.0,
                     "energy_j_per_step": pytest.approx(139.0), "power_capped_frac": 0.5}
    assert power.summarize(samples, [(t0 + 5, t0 + 6)], step_s=0.2) == {"power_samples": 0}


def test_profile_classes_sum_to_the_profiled_busy_time():
    """benchmarks/tools/profile_classes.py (the docs' per-class table) loses no kernel row: per
    configuration its classes add up to the GPU busy time train.py --profile wrote."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "tools"))
    try:
        import profile_classes
    finally:
        sys.path.pop(0)
    with open(os.path.join(ROOT, "docs", "data", "train_steady_profile.txt")) as f:
        text = f.read()
    busy = [float(m) for m in re.findall(r"GPU busy ([\d.]+) ms per step", text)]
    found = list(profile_classes.sections(text))
    assert [label for label, _ in found] == [
        "bf16 ac=none", "f8tensor ac=none", "f8tensor_swiglu ac=none", "torchao_compiled ac=none"]
    for (label, classes), ms in zip(found, busy, strict=True):
        assert sum(t for t, _ in classes.values()) == pytest.approx(ms, abs=0.1), label
    assert found[2][1]["f8tensor: swiglu_kernel"][1] == 8  # one launch per layer


def test_host_overhead_cases_run():
    """benchmarks/host_overhead.py's fused-op cases (each fused op beside the PyTorch it replaces)
    and layer stacks run forward and backward, here on CPU; the GPU run times them."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import host_overhead
    finally:
        sys.path.pop(0)
    cases = host_overhead.fused_op_cases("cpu")
    assert len(cases) == 6
    stacks = host_overhead.stack_cases("cpu")
    assert list(stacks) == [f"Float8Linear x{host_overhead.STACK} fwd+bwd", f"nn.Linear x{host_overhead.STACK} fwd+bwd"]
    for fn in [*cases.values(), *stacks.values()]:
        fn()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the casts run in the interpreter on CPU")
def test_blockwise_sweep_configurations_are_accepted_and_give_the_default_bits():
    """benchmarks/kernels_blockwise.py --sweep: every configuration it times, for each cast it applies
    to, is a launch block_cast_triton accepts, with the default launch's bits (so a GPU run's time
    is not lost to a configuration error)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import kernels_blockwise as kb
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    for x in (torch.randn(256, 384, dtype=torch.bfloat16), torch.randn(130, 256, dtype=torch.bfloat16)):
        for mode in kb.MODES:
            check_sweep(kb, x, mode)
    assert not kb.applies(dict(packed=True), "act_both", 130) and kb.applies(dict(packed=False), "act_both", 130)
    assert kb.applies(dict(packed=True), "act_both", 128)


def check_sweep(kb, x, mode):
    want = kb.ours(x, mode)()
    for cfg in kb.SWEEP:
        if not kb.applies(cfg, mode, x.shape[0]):
            continue
        got = kb.ours(x, mode, **cfg)()
        assert all(a is None and b is None or torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                                                          b.view(torch.uint8) if b.dtype.itemsize == 1 else b)
                   for a, b in zip(got, want)), (mode, cfg, tuple(x.shape))


@CPU_ONLY
def test_fusion_coverage_tool_reports_each_kind(tmp_path):
    """benchmarks/tools/fusion_coverage.py (docs/benchmarks.md's table of Hugging Face architectures):
    fused / examined per kind, and the first reason where a kind is not fused."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tools", "fusion_coverage.py"), "Llama",
                          "Cohere"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    lines = {line.split()[0]: line for line in run.stdout.splitlines()[1:]}
    assert lines["Llama"].split()[1:] == ["rms_norm", "3/3", "swiglu", "1/1", "rope", "1/1"]
    assert "rms_norm 0/2" in lines["Cohere"] and "rms_norm: RMSNorm not fused: forward does more" in lines["Cohere"]


SM90_PROBE = """
import sys, torch, triton, triton.language as tl
sys.path.insert(0, sys.argv[1])
from tools.sm90_compile import sm90_resources

@triton.jit
def scale_rows(x_ptr, y_ptr, N, PIPELINED: tl.constexpr):
    r, c = tl.arange(0, 16), tl.arange(0, 128)
    offs = r[:, None] * N + c[None, :]
    if PIPELINED:
        for i in tl.range(0, 8, num_stages=3):
            tl.store(y_ptr + i * 16 * N + offs, tl.load(x_ptr + i * 16 * N + offs) * 2)
    else:
        for i in tl.static_range(8):
            tl.store(y_ptr + i * 16 * N + offs, tl.load(x_ptr + i * 16 * N + offs) * 2)

x = torch.empty(128, 4096)
for pipelined in (False, True):
    print(sm90_resources(scale_rows, (x, x, 4096), 4, PIPELINED=pipelined))
"""


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                    "ptxas")), reason="triton without its CUDA backend")
def test_sm90_compile_reports_resources_without_a_gpu(tmp_path):
    """benchmarks/tools/sm90_compile.py compiles for sm_90 on a machine without a GPU (outside the
    interpreter): registers and programs per SM, and Triton's pipelining into shared memory seen
    where a tl.range loop asks for stages and not where the loop is unrolled."""
    probe = tmp_path / "probe.py"
    probe.write_text(SM90_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(probe), os.path.join(ROOT, "benchmarks")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    unrolled, pipelined = (ast.literal_eval(line) for line in run.stdout.splitlines())
    for res in (unrolled, pipelined):
        assert 0 < res["regs"] <= 255 and res["spill_bytes"] == 0
        assert res["instructions"] > 0 and res["rcp"] == 0  # a multiply, no division
        assert res["programs_per_sm"] == min(res["programs_by_regs"], res["programs_by_shared"], 64 // 4)
    assert unrolled["cp_async"] == 0 and pipelined["cp_async"] > 0
    assert pipelined["shared"] >= 2 * 16 * 128 * 4  # at least two stages of a 16 x 128 fp32 slice
    blockwise = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tools", "sm90_compile.py")],
                               capture_output=True, text=True, timeout=300, env=env)
    assert blockwise.returncode == 0, blockwise.stderr[-4000:]
    lines = blockwise.stdout.splitlines()
    other = "bytes" if PACKED_COLUMNS else "packed"  # the column store that is not the default
    assert [line.split(" warps ")[0].rsplit(maxsplit=1)[0] for line in lines] == [
        "act_both", "act_col", "weight_row", "weight_col", f"act_both {other}", f"act_col {other}",
        "act_col block_n=32", "act_col block_n=128"] + [
        f"act_both col_vec={vec}{' loads_ahead' if ahead else ''} w{warps}"
        for warps in (4, 8) for ahead in (False, True) for vec in (4, 2)] + [
        f"act_both loads_ahead w{warps} max_registers={cap}" for warps, cap in ((4, 128), (8, 80), (8, 64))]
    res = [ast.literal_eval(line.split(" warps ", 1)[1]) for line in lines]
    for r in res:
        assert 0 < r["regs"] <= 255 and r["spill_bytes"] == 0
    by_name = dict(zip((line.split(" warps ")[0].rsplit(maxsplit=1)[0] for line in lines), res))
    for warps, cap in ((4, 128), (8, 80), (8, 64)):  # the cap holds and leaves room for more programs per SM
        capped = by_name[f"act_both loads_ahead w{warps} max_registers={cap}"]
        assert capped["regs"] <= cap
        assert capped["programs_per_sm"] > by_name[f"act_both col_vec=4 loads_ahead w{warps}"]["programs_per_sm"]
    assert res[0]["cp_async"] == 0  # the both-layouts cast's slices are unrolled (tl.static_range): nothing pipelined
    assert res[0]["rcp"] > 0 and res[0]["instructions"] > res[1]["instructions"]  # its scales divide; per warp, the two layouts take more
    packed = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tools", "packed_store_compile.py")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert packed.returncode == 0, packed.stderr[-4000:]
    check_packed_store_compiles(packed.stdout.splitlines())


def check_packed_store_compiles(lines):
    """tools/packed_store_compile.py: the masked word stores the GPU found wrong (in the kernel
    before 7bf23ff) compile, with M's divisibility known, into a four-words-a-thread layout that
    `block_kernel_m_unaligned` (what kernels/blockwise.py launches for them) does not use; there it
    compiles as the exact 132 x 300 case does, and whole tiles keep their vector stores in
    `block_kernel`. (Since 7bf23ff the specialized compile reaches that layout through 4 ldmatrix
    instead of 9-10 in the two-layout cases; it is not launched for them.)"""
    rows = {}
    for line in lines:
        case, kernel = line.split(", ")[0], line.split(", ")[1].split(" ")[0]
        layouts = ast.literal_eval(line.split("sizePerThread ")[1].split("], ")[0] + "]")
        counts = ast.literal_eval(line[line.index("{"):])
        rows[case, kernel] = (layouts, counts, "block_kernel: wrong" in line)
    assert len(rows) == 12
    for (case, kernel), (layouts, counts, wrong) in rows.items():
        if kernel == "block_kernel_m_unaligned":
            assert "4, 1" not in layouts, case
        elif wrong:
            assert "4, 1" in layouts and counts["ldmatrix"] >= 4, case
    exact = rows["132 x 300 bfloat16 both", "block_kernel"]
    for case in ("256 x 300 bfloat16 both", "4096 x 4100 bfloat16 both"):
        assert rows[case, "block_kernel_m_unaligned"][:2] == exact[:2]
    assert rows["256 x 256 float32 col alone", "block_kernel"][1]["st.global.v4.b32"] > 0


@CPU_ONLY
def test_train_benchmark_grad_accum_with_kept_weights(tmp_path):
    """--grad-accum and the f8tensor_keep_weight ablation: kept float8 weights give the same
    training as casting every time (same loss bits), with and without recomputation."""
    rows = run_train(tmp_path, "--rounds", "1", "--grad-accum", "2", "--ac-modes", "none", "full",
                     ablations=("f8tensor_keep_weight",))
    assert [(r["ac"], r["config"], r["status"], r["grad_accum"]) for r in rows] == [
        (ac, c, "ok", 2) for ac in ("none", "full") for c in ("bf16", "f8tensor", "f8tensor_keep_weight")]
    losses = {(r["ac"], r["config"]): r["loss"] for r in rows}
    for ac in ("none", "full"):
        assert losses[(ac, "f8tensor_keep_weight")] == losses[(ac, "f8tensor")]
        assert abs(losses[(ac, "f8tensor")] - losses[(ac, "bf16")]) < 0.1


@CPU_ONLY
def test_train_benchmark_under_fsdp2(tmp_path):
    """--fsdp under torchrun (2 gloo ranks): every rank's tokens count, rank 0 writes the rows, and
    float8 starts from bf16's loss; without torchrun the flag says how to launch."""
    rows = run_train(tmp_path, "--fsdp", "--rounds", "1",
                     launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    assert [(r["config"], r["status"], r["fsdp"], r["world"], r["fp8_linears"]) for r in rows] == [
        ("bf16", "ok", True, 2, 0), ("f8tensor", "ok", True, 2, 14)]
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(2 * r["batch"] * r["seq"] / (r["step_ms"] / 1e3))
    assert abs(rows[1]["loss"] - rows[0]["loss"]) < 0.1
    alone = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train.py"), "--fsdp"],
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode != 0 and "runs under torchrun" in alone.stderr


@CPU_ONLY
def test_train_benchmark_under_tensor_parallelism(tmp_path):
    """--tp 2 under torchrun (2 gloo ranks): the ranks of the tp group train on the same tokens (counted
    once), and gathering the sequence-parallel inputs in float8 (f8tensor_sp8) gives the loss of
    gathering them in bf16 (f8tensor) exactly: the cast of the gathered input is the same."""
    rows = run_train(tmp_path, "--tp", "2", "--rounds", "1", ablations=("f8tensor_sp8",),
                     launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    assert [(r["config"], r["status"], r["tp"], r["world"], r["fp8_linears"]) for r in rows] == [
        ("bf16", "ok", 2, 2, 0), ("f8tensor", "ok", 2, 2, 14), ("f8tensor_sp8", "ok", 2, 2, 14)]
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq"] / (r["step_ms"] / 1e3))
    assert rows[2]["loss"] == rows[1]["loss"]
    assert abs(rows[1]["loss"] - rows[0]["loss"]) < 0.1
    alone = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train.py"), "--tp", "2"],
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode != 0 and "--tp 2 runs under torchrun" in alone.stderr


@CPU_ONLY
@pytest.mark.parametrize("model, fused", [("hf_llama", (5, 2, 2)), ("hf_qwen2", (5, 2, 2)), ("hf_olmo2", (9, 2, 2)),
                                          ("hf_gemma3", (13, 2, 2)), ("hf_phi3", (5, 2, 2)), ("torchtitan", (5, 2, 2))])
def test_train_benchmark_runs_model_code_written_elsewhere(tmp_path, model, fused):
    """--model: Hugging Face's Llama, Qwen2, OLMo 2, Gemma 3 and Phi-3 and torchtitan's Llama 3, converted
    (every linear but the output projection) and fused as far as fuse_model_ops proves their code
    (torchtitan's RoPE in the complex form; Phi-3's gate over its gate_up halves, its RoPE in the
    partial-rotary form), checkpointed every 2nd block; float8 starts from bf16's loss."""
    rows = run_train(tmp_path, "--model", model, "--rounds", "1", "--ac-modes", "none", "every2")
    assert [(r["ac"], r["config"], r["status"], r["model"]) for r in rows] == [
        (ac, c, "ok", model) for ac in ("none", "every2") for c in ("bf16", "f8tensor")]
    for r in rows:
        if r["config"] == "f8tensor":
            linears = 8 if model == "hf_phi3" else 14  # Phi-3: one qkv and one gate_up projection a layer
            assert (r["fp8_linears"], (r["fused_norms"], r["fused_gates"], r["fused_ropes"])) == (linears, fused)
    losses = {(r["ac"], r["config"]): r["loss"] for r in rows}
    for ac in ("none", "every2"):
        assert abs(losses[(ac, "f8tensor")] - losses[(ac, "bf16")]) < 0.1
    assert losses[("every2", "bf16")] == pytest.approx(losses[("none", "bf16")])  # recomputation: same math


def test_linear_and_host_benchmarks_give_the_layer_a_new_input_each_call(monkeypatch):
    """benchmarks/linear.py's step and host_overhead.py's leaf: each call's input is a new tensor,
    so Float8Linear casts it each call, as a new activation each training step (it reuses the cast
    of an input it has cast already, a full view of it included: timing that would leave the cast
    out of its time)."""
    import f8tensor.core.linear as linear_mod
    from f8tensor import Float8Linear

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import host_overhead
        import linear
    finally:
        sys.path.pop(0)
    casts = []
    real = linear_mod.quantize_with_amax
    monkeypatch.setattr(linear_mod, "quantize_with_amax",
                        lambda t, *a, **k: casts.append(tuple(t.shape)) or real(t, *a, **k))
    lin = Float8Linear(64, 32, dtype=torch.bfloat16)
    x = torch.randn(48, 64, dtype=torch.bfloat16)
    step = linear.fwd_bwd(lin, x.clone().requires_grad_(), torch.randn(48, 32, dtype=torch.bfloat16))
    for run in (step, lambda: lin(host_overhead.leaf(x)).sum().backward()):
        casts.clear()
        run()
        first = casts.count((48, 64))
        casts.clear()
        run()
        assert first >= 1 and casts.count((48, 64)) == first
