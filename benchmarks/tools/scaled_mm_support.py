"""Which scaled-GEMM scalings the installed torch runs on this GPU, and whether each gives the right
product: the question the rowwise and blockwise recipes (issue 20) start from.

    python benchmarks/tools/scaled_mm_support.py            # one line per case: ok (max rel. error) or the error

Each case multiplies A [M, K] (row-major, float8 e4m3) by B [K, N] (column-major: the transpose of a
row-major [N, K] weight, as Float8Linear's forward reads it) with scales of one granularity per
operand, through `torch._scaled_mm` and, where this torch has it, `torch.nn.functional.scaled_mm`
with its ScalingType. Scales are dequantization multipliers (hp = fp8 * scale), random powers of two
so that the reference, the dequantized operands multiplied in fp64, is exact up to the GEMM's
accumulation. Blockwise scales are tried in both memory orders (the scale matrix row-major, and
"outer-dim-major": its transpose contiguous), since the kernels' requirements on them differ by
version; a case that raises prints the first line of its error.
"""

import torch
import torch.nn.functional as F

M, K, N = 256, 512, 384


def blocks(rows: int, cols: int, br: int, bc: int, gen) -> torch.Tensor:
    """A [rows / br, cols / bc] matrix of random powers of two (2^-4 .. 2^3)."""
    return torch.exp2(torch.randint(-4, 4, (rows // br, cols // bc), generator=gen).float())


def expand(scale: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    return scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)


def orders(scale: torch.Tensor) -> dict:
    """The same scale values in two memory orders."""
    return {"row-major": scale.contiguous(), "outer-dim-major": scale.t().contiguous().t()}


def scale_pairs(sa: torch.Tensor, sb: torch.Tensor) -> dict:
    """Blockwise scales of A (both orders) with B's scale indexed as B [K, N] is (both orders) or as
    the weight [N, K] is (row-major)."""
    b_forms = {f"B-indexed {o}": t for o, t in orders(sb.t()).items()}
    b_forms["w-indexed row-major"] = sb.contiguous()
    return {f"A {oa} / {ob}": (xa, xb) for oa, xa in orders(sa).items() for ob, xb in b_forms.items()}


def check(name, run, ref):
    try:
        out = run().double()
    except Exception as e:  # noqa: BLE001  (a probe: every failure is an answer)
        print(f"{name:<100} error: {type(e).__name__}: {str(e).strip().splitlines()[0][:150]}")
        return
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"{name:<100} {'ok' if err < 2e-2 else 'WRONG'} (max rel. error {err:.1e})")


def main():
    gen = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; "
          f"A [{M}, {K}] row-major, B [{K}, {N}] column-major, float8 e4m3, output bf16")
    a8 = (torch.randn(M, K, generator=gen) * 8).to(torch.float8_e4m3fn)
    w8 = (torch.randn(N, K, generator=gen) * 8).to(torch.float8_e4m3fn)  # B = w8.t()
    # (scale of A as [M, K] blocks (br, bc), scale of B as [N, K] blocks): the granularities tried
    granularities = {
        "tensorwise": ((M, K), (N, K)),
        "rowwise (A per row, B per column)": ((1, K), (1, K)),
        "1x128 x 128x128 (DeepSeek-V3 forward)": ((1, 128), (128, 128)),
        "1x128 x 1x128": ((1, 128), (1, 128)),
        "128x128 x 1x128": ((128, 128), (1, 128)),
    }
    recipes = {"tensorwise": "TensorWise", "rowwise (A per row, B per column)": "RowWise"}
    for name, ((abr, abc), (bbr, bbc)) in granularities.items():
        sa, sb = blocks(M, K, abr, abc, gen), blocks(N, K, bbr, bbc, gen)  # sb indexed like w [N, K]
        ref = (a8.double() * expand(sa, abr, abc).double()) @ (w8.double() * expand(sb, bbr, bbc).double()).t()
        a, b = a8.to(device), w8.to(device).t()
        ref = ref.to(device)
        if name == "tensorwise":
            sa_, sb_ = sa.reshape(()).to(device), sb.reshape(()).to(device)
            check(f"{name}: _scaled_mm", lambda: torch._scaled_mm(a, b, sa_, sb_, out_dtype=torch.bfloat16), ref)
        elif name.startswith("rowwise"):
            sa_, sb_ = sa.reshape(M, 1).to(device), sb.reshape(1, N).to(device)
            check(f"{name}: _scaled_mm", lambda: torch._scaled_mm(a, b, sa_, sb_, out_dtype=torch.bfloat16), ref)
            # The operand formats and output dtypes rowwise takes (f8tensor's routing allows e4m3 x
            # e4m3 with a bf16 output only).
            for fa, fb, out in [(torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16),
                                (torch.float8_e5m2, torch.float8_e4m3fn, torch.bfloat16),
                                (torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float16),
                                (torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float32)]:
                a2, b2 = a.float().to(fa), b.float().to(fb)  # reference from the converted values
                sa2 = sa_ / 256  # products within float16's range
                ref2 = (a2.double() * sa2.double()) @ (b2.double() * sb_.double())
                check(f"{name}: _scaled_mm {str(fa)[6:]} x {str(fb)[6:]} -> {str(out)[6:]}",
                      lambda: torch._scaled_mm(a2, b2, sa2, sb_, out_dtype=out), ref2)
        else:
            # A's scale [M, K/128] (1x128) or [M/128, K/128]; B's as B [K, N] indexes it: [K/bk, N/bn]
            for label, (sa_, sb_) in scale_pairs(sa.to(device), sb.to(device)).items():
                check(f"{name}: _scaled_mm, {label}",
                      lambda: torch._scaled_mm(a, b, sa_, sb_, out_dtype=torch.bfloat16), ref)
        if name.startswith("1x128 x 128x128"):
            blockwise_variants(a, b, sa.to(device), sb.to(device), ref, gen)
        if not hasattr(F, "scaled_mm"):
            continue
        kind = {(1, 128): "BlockWise1x128", (128, 128): "BlockWise128x128"}
        ra = recipes.get(name) or kind[(abr, abc)]
        rb = recipes.get(name) or kind[(bbr, bbc)]
        if name == "tensorwise":
            pairs = {"": (sa.reshape(()).to(device), sb.reshape(()).to(device))}
        elif name.startswith("rowwise"):
            pairs = {"": (sa.reshape(M, 1).to(device), sb.reshape(1, N).to(device))}
        else:
            pairs = {f", {label}": pair for label, pair in scale_pairs(sa.to(device), sb.to(device)).items()}
        for suffix, (xa, xb) in pairs.items():
            check(f"{name}: F.scaled_mm {ra} x {rb}{suffix}",
                  lambda: F.scaled_mm(a, b, xa, getattr(F.ScalingType, ra), xb, getattr(F.ScalingType, rb),
                                      output_dtype=torch.bfloat16), ref)


def blockwise_variants(a, b, sa, sb, ref, gen):
    """The forward blockwise GEMM (1x128 x 128x128, scales in the layouts that ran) with the options a
    recipe might want: other output dtypes, fast accumulation, e5m2 operands; and ragged shapes
    (tokens not a multiple of 4 or 128, features not of 128)."""
    def layouts(sa, sb):  # A's [M, K/128] with strides (1, M); B's [K/128, N/128] with strides (1, K/128)
        return sa.t().contiguous().t(), sb.t().contiguous().t()
    xa, xb = layouts(sa, sb)
    for out in (torch.float16, torch.float32):
        check(f"1x128 x 128x128: _scaled_mm -> {str(out)[6:]}",
              lambda: torch._scaled_mm(a, b, xa, xb, out_dtype=out), ref)
    check("1x128 x 128x128: _scaled_mm, use_fast_accum=True",
          lambda: torch._scaled_mm(a, b, xa, xb, out_dtype=torch.bfloat16, use_fast_accum=True), ref)
    for fa, fb in [(torch.float8_e5m2, torch.float8_e4m3fn), (torch.float8_e4m3fn, torch.float8_e5m2)]:
        a2, b2 = a.float().to(fa), b.float().to(fb)
        ref2 = (a2.double() * expand(sa, 1, 128).double()) @ (b2.double() * expand(sb, 128, 128).double().t())
        check(f"1x128 x 128x128: _scaled_mm {str(fa)[6:]} x {str(fb)[6:]}",
              lambda: torch._scaled_mm(a2, b2, xa, xb, out_dtype=torch.bfloat16), ref2)
    for m, k, n in [(256, 256, 384), (256, 512, 384), (200, 512, 384), (100, 512, 384), (130, 512, 384),
                    (256, 512, 144), (256, 640, 384), (256, 1024, 384), (256, 1536, 384)]:
        kb, nb = -(-k // 128), -(-n // 128)
        a3 = (torch.randn(m, k, generator=gen) * 8).to(torch.float8_e4m3fn).to(a.device)
        w3 = (torch.randn(n, k, generator=gen) * 8).to(torch.float8_e4m3fn).to(a.device)
        s3a = torch.exp2(torch.randint(-4, 4, (m, kb), generator=gen).float()).to(a.device)
        s3b = torch.exp2(torch.randint(-4, 4, (nb, kb), generator=gen).float()).to(a.device)
        ref3 = (a3.double() * s3a.repeat_interleave(128, 1)[:, :k].double()) @ (
            w3.double() * s3b.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k].double()).t()
        x3a, x3b = layouts(s3a, s3b.t())
        check(f"1x128 x 128x128: _scaled_mm [{m}, {k}] @ [{k}, {n}]",
              lambda: torch._scaled_mm(a3, w3.t(), x3a, x3b, out_dtype=torch.bfloat16), ref3)


if __name__ == "__main__":
    main()
