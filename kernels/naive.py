"""Plain-PyTorch reference of dynamic tensorwise float8 quantization.

This file defines the semantics; every Triton kernel in this folder computes the same function and
is tested against it bit for bit. Read this first.

    amax       = max(|x|) over the whole tensor (NaN wins over everything, so it propagates)
    multiplier = fp8_max / max(amax, EPS)            (fp32, correctly rounded division)
                 optionally rounded down to a power of two
                 NaN when amax is inf or NaN        (a non-finite input poisons the whole tensor)
    scale      = 1 / multiplier                      (fp32, correctly rounded; the dequantization factor)
    data       = fp8(clamp(fp32(x) * multiplier, -fp8_max, fp8_max))   round to nearest even

so that hp ≈ data * scale, and `scale` is exactly what `torch._scaled_mm` takes as scale_a/scale_b.
"""

import math

import torch

# amax is clamped to EPS so an all-zero tensor gets a finite scale (its data is all zeros).
EPS = 1e-12

FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the kernels read
LAYOUTS = ("row", "col", "both")


def fp8_max(float8_dtype: torch.dtype) -> float:
    if float8_dtype not in FLOAT8_DTYPES:
        raise ValueError(
            f"float8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {float8_dtype}"
        )
    return torch.finfo(float8_dtype).max


def amax_ref(x: torch.Tensor) -> torch.Tensor:
    """max(|x|) as a 0-d fp32 tensor on x's device; 0 for an empty tensor, NaN if any NaN."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.abs().amax().float()


def scale_from_amax_ref(
    amax: torch.Tensor, float8_dtype: torch.dtype, power_of_2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one place scale edge cases are decided. Returns (multiplier, scale), fp32 of amax's
    shape (0-d for a tensor's amax; elementwise for rows' or columns' amaxes)."""
    amax = amax.float()
    # tensor / tensor: `float / tensor` would be reciprocal-then-multiply, two roundings.
    multiplier = amax.new_full((), fp8_max(float8_dtype)) / amax.clamp(min=EPS)
    if power_of_2:
        multiplier = (multiplier.view(torch.int32) & 0x7F800000).view(torch.float32)
    finite = amax <= torch.finfo(torch.float32).max  # False for inf and NaN
    multiplier = torch.where(finite, multiplier, torch.full_like(multiplier, float("nan")))
    return multiplier, multiplier.reciprocal()


def cast_ref(x: torch.Tensor, multiplier: torch.Tensor, float8_dtype: torch.dtype) -> torch.Tensor:
    """Saturating cast of x * multiplier; same shape and layout as x (made contiguous)."""
    m = fp8_max(float8_dtype)
    y = x.float() * multiplier
    out = torch.empty(x.shape, dtype=float8_dtype, device=x.device)
    return out.copy_(y.clamp(-m, m))


def to_col_major(data: torch.Tensor) -> torch.Tensor:
    """The same matrix [M, N] stored column-major: strides (1, M)."""
    M, N = data.shape
    return torch.empty_strided((M, N), (1, M), dtype=data.dtype, device=data.device).copy_(data)


def quantize_ref(
    x: torch.Tensor, float8_dtype: torch.dtype, layout: str = "row", power_of_2: bool = False,
    amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Quantize a 2-D tensor. Returns (row_major_data | None, col_major_data | None, scale).

    amax: max(|x|) if already known (x quantized before with the same values); else computed.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_ref takes a 2-D tensor, got shape {tuple(x.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    multiplier, scale = scale_from_amax_ref(amax_ref(x) if amax is None else amax, float8_dtype, power_of_2)
    data = cast_ref(x, multiplier, float8_dtype)
    row = data if layout in ("row", "both") else None
    col = to_col_major(data) if layout in ("col", "both") else None
    return row, col, scale



# Rowwise scaling (rowwise.py): one scale per row of a row-major operand, one per column of a
# column-major one, each from that row's / column's own max(|x|) by the same policy as above
# (scale_from_amax_ref works elementwise). A non-finite value poisons only its own row / column.
# Scales are shaped to broadcast against x: [M, 1] per row, [1, N] per column, what
# torch._scaled_mm takes for rowwise scaling (scale_a [M, 1], scale_b [1, N]).

def axis_amax_ref(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max(|x|) along dim as fp32 with dim kept (size 1); 0 where the reduced axis is empty."""
    if x.shape[dim] == 0:
        shape = list(x.shape)
        shape[dim] = 1
        return torch.zeros(shape, dtype=torch.float32, device=x.device)
    return x.abs().amax(dim, keepdim=True).float()


def quantize_rowwise_ref(
    x: torch.Tensor, float8_dtype: torch.dtype, layout: str = "row", power_of_2: bool = False,
    col_amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Quantize a 2-D x [M, N] with per-row / per-column scales. Returns (row | None, row_scale
    [M, 1] | None, col | None, col_scale [1, N] | None): "row" is row-major data scaled per row,
    "col" column-major data (strides (1, M)) scaled per column, "both" the two.

    col_amax: the column amaxes [N] (fp32) if already known (x quantized before with the same values).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_rowwise_ref takes a 2-D tensor, got shape {tuple(x.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    row = row_scale = col = col_scale = None
    if layout in ("row", "both"):
        multiplier, row_scale = scale_from_amax_ref(axis_amax_ref(x, 1), float8_dtype, power_of_2)
        row = cast_ref(x, multiplier, float8_dtype)
    if layout in ("col", "both"):
        amax = axis_amax_ref(x, 0) if col_amax is None else col_amax.reshape(1, -1)
        multiplier, col_scale = scale_from_amax_ref(amax, float8_dtype, power_of_2)
        col = to_col_major(cast_ref(x, multiplier, float8_dtype))
    return row, row_scale, col, col_scale


# Blockwise scaling (blockwise.py; DeepSeek-V3's recipe): one scale per tile of a 2-D x [M, N],
# from that tile's own max(|x|) by the same policy as above. Tiles are BLOCKS: (1, 128) along a
# row, (128, 1) along a column, (128, 128) square; edge tiles hold what is left. Scales come as
# [ceil(M / bm), ceil(N / bn)] in row-major order; _scaled_mm's layouts are the caller's concern.

BLOCK = 128
BLOCKS = ((1, BLOCK), (BLOCK, 1), (BLOCK, BLOCK))


def block_amax_ref(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max(|x|) of each (bm, bn) tile of a 2-D x, fp32 [ceil(M / bm), ceil(N / bn)]; NaN where a
    tile holds a NaN."""
    bm, bn = block
    M, N = x.shape
    mb, nb = -(-M // bm), -(-N // bn)
    if x.numel() == 0:
        return torch.zeros((mb, nb), dtype=torch.float32, device=x.device)
    # Zero padding adds nothing to a max of magnitudes.
    padded = torch.nn.functional.pad(x.abs().float(), (0, nb * bn - N, 0, mb * bm - M))
    return padded.reshape(mb, bm, nb, bn).amax((1, 3))


def quantize_blockwise_ref(
    x: torch.Tensor, float8_dtype: torch.dtype, block: tuple[int, int], power_of_2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(data [M, N] row-major, scale [ceil(M / bm), ceil(N / bn)] row-major fp32) of a 2-D x
    quantized with one scale per (bm, bn) tile, block one of BLOCKS."""
    if x.dim() != 2:
        raise ValueError(f"quantize_blockwise_ref takes a 2-D tensor, got shape {tuple(x.shape)}")
    if tuple(block) not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    bm, bn = block
    M, N = x.shape
    multiplier, scale = scale_from_amax_ref(block_amax_ref(x, block), float8_dtype, power_of_2)
    per_element = multiplier.repeat_interleave(bm, 0)[:M].repeat_interleave(bn, 1)[:, :N]
    return cast_ref(x, per_element, float8_dtype), scale


# SwiGLU, fused with the amax of what it writes (swiglu.py). The math in fp32, one rounding to the
# output dtype; the record each kernel returns is amax_ref of its output.

def halves(y: torch.Tensor, gate_half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up): views of the two halves of y's last dim (a gate_up projection's output), the gate
    the first (gate_half 0) or the second (1)."""
    first, second = y.chunk(2, dim=-1)
    return (first, second) if gate_half == 0 else (second, first)


def swiglu_halves_ref(y: torch.Tensor, gate_half: int = 0, gelu_tanh: bool = False) -> torch.Tensor:
    """h = silu(gate) * up (gelu_tanh: GeGLU's gate) of the halves of y's last dim (`halves`)."""
    return (geglu_ref if gelu_tanh else swiglu_ref)(*halves(y, gate_half))


def swiglu_halves_backward_ref(g: torch.Tensor, y: torch.Tensor, gate_half: int = 0,
                               gelu_tanh: bool = False) -> torch.Tensor:
    """dy of h = swiglu_halves_ref(y) given dh = g: both halves' gradients in one tensor of y's shape."""
    grad_gate, grad_up = (geglu_backward_ref if gelu_tanh else swiglu_backward_ref)(g, *halves(y, gate_half))
    return torch.cat((grad_gate, grad_up) if gate_half == 0 else (grad_up, grad_gate), dim=-1)


def swiglu_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h = silu(a) * b = a * sigmoid(a) * b."""
    af = a.float()
    return (af * torch.sigmoid(af) * b.float()).to(a.dtype)


def swiglu_backward_ref(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh/da * g, dh/db * g): silu'(a) = s * (1 + a * (1 - s)) with s = sigmoid(a), as PyTorch's
    silu_backward."""
    gf, af, bf = g.float(), a.float(), b.float()
    s = torch.sigmoid(af)
    grad_a = gf * bf * (s * (1 + af * (1 - s)))
    grad_b = gf * (af * s)
    return grad_a.to(a.dtype), grad_b.to(b.dtype)


# GeGLU with the tanh approximation of GELU (Gemma's gate): h = gelu(a, approximate="tanh") * b, the
# same fusion. tanh(u) is computed as 2 sigmoid(2 u) - 1 (the kernels' form: Triton's interpreter has
# no tanh), which in fp32 saturates to -1 where tanhf does, give or take the last bits: against
# PyTorch's F.gelu(a, approximate="tanh") the activation differs by at most 2^-22 |a| everywhere:
# within 4 fp32 units in the last place of the value for a > -1, more units toward the saturated
# tail, where the value shrinks faster than |a| (and where PyTorch gives 0, by up to 2^-22 |a|).
GELU_TANH_BETA = math.sqrt(2.0 / math.pi)
GELU_TANH_KAPPA = 0.044715


def _gelu_tanh_t(af: torch.Tensor) -> torch.Tensor:
    """t = tanh(beta (a + kappa a^3)) of an fp32 a as the kernels compute it: 2 sigmoid(2 u) - 1."""
    return 2 * torch.sigmoid(2 * GELU_TANH_BETA * (af + GELU_TANH_KAPPA * af * af * af)) - 1


def gelu_tanh_ref(af: torch.Tensor) -> torch.Tensor:
    """gelu(a, approximate="tanh") of an fp32 a as the kernels compute it: 0.5 a (1 + t)."""
    return 0.5 * af * (1 + _gelu_tanh_t(af))


def geglu_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h = gelu(a, approximate="tanh") * b = 0.5 a (1 + tanh(beta (a + kappa a^3))) * b."""
    return (gelu_tanh_ref(a.float()) * b.float()).to(a.dtype)


def geglu_backward_ref(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh/da * g, dh/db * g), gelu_tanh'(a) as PyTorch's gelu_backward (approximate="tanh") writes it:
    0.5 (1 + t) + 0.5 a (1 - t^2) beta (1 + 3 kappa a^2), t = tanh(beta (a + kappa a^3))."""
    gf, af, bf = g.float(), a.float(), b.float()
    t = _gelu_tanh_t(af)
    derivative = 0.5 * (1 + t) + 0.5 * af * (1 - t * t) * GELU_TANH_BETA * (1 + 3 * GELU_TANH_KAPPA * af * af)
    grad_a = gf * bf * derivative
    grad_b = gf * (0.5 * af * (1 + t))
    return grad_a.to(a.dtype), grad_b.to(b.dtype)


# Rotary position embedding (rope.py). Each position's head vector is split into pairs (x1_j, x2_j),
# each rotated by its angle: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 (c, s: the tables' entries at
# the same places, cos and sin broadcast to x). The pairs are (j, j + D/2) in the rotate_half form
# (Hugging Face's Llama: x * cos + cat(-x2, x1) * sin) and (2j, 2j + 1) in the interleaved form
# (Meta's Llama / torchtitan's complex multiply). fp32 math, one rounding to x's dtype (eager
# rotate_half rounds each of its four steps; the complex form computes in fp32 too).

def _pairs(t: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (t[..., 0::2], t[..., 1::2]) if interleaved else t.chunk(2, dim=-1)


def _unpair(a: torch.Tensor, b: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return torch.stack([a, b], dim=-1).flatten(-2) if interleaved else torch.cat([a, b], dim=-1)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    (x1, x2), (c1, c2), (s1, s2) = (_pairs(t.float(), interleaved) for t in (x, cos, sin))
    return _unpair(x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, interleaved).to(x.dtype)


def rope_backward_ref(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """d rope / dx given dout = g: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1."""
    (g1, g2), (c1, c2), (s1, s2) = (_pairs(t.float(), interleaved) for t in (g, cos, sin))
    return _unpair(g1 * c1 + g2 * s2, g2 * c2 - g1 * s1, interleaved).to(g.dtype)


# RMSNorm over the last dim (rms_norm.py): y = x * rstd * weight with rstd = 1 / sqrt(mean(x^2) +
# eps) per row; fp32 math, one rounding to x's dtype (nn.RMSNorm's form). With cast_before_weight,
# Hugging Face's form: x * rstd rounded to x's dtype first, then times the weight and rounded again.
# The forward's record is amax_ref of y.

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                 cast_before_weight: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): rstd fp32 of x's shape without its last dim."""
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    y = xf * rstd.unsqueeze(-1)
    if cast_before_weight:
        y = y.to(x.dtype).float()
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype), rstd


def rms_norm_backward_ref(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
    cast_before_weight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dweight | None) given dy = g: with x_hat = x * rstd and gw = g * weight,
    dx = rstd * (gw - x_hat * mean(gw * x_hat)), dweight = sum over rows of g * x_hat. With
    cast_before_weight, as autograd differentiates Hugging Face's form: gw and each product g *
    x_hat rounded to x's dtype, x_hat rounded to it in the weight's gradient."""
    x_hat = x.float() * rstd.unsqueeze(-1)
    gf = g.float()
    gw = gf if weight is None else gf * weight.float()
    if cast_before_weight:
        gw = gw.to(x.dtype).float()
    dx = (gw - x_hat * (gw * x_hat).mean(-1, keepdim=True)) * rstd.unsqueeze(-1)
    if weight is None:
        return dx.to(x.dtype), None
    products = gf * (x_hat.to(x.dtype).float() if cast_before_weight else x_hat)
    if cast_before_weight:
        products = products.to(x.dtype).float()
    return dx.to(x.dtype), products.sum(tuple(range(x.dim() - 1))).to(weight.dtype)


# Cross-entropy of logits [N, V] against class indices (cross_entropy.py): PyTorch's own
# F.cross_entropy of the logits in fp32, per row, and its gradient rounded to the logits' dtype.

def cross_entropy_ref(logits: torch.Tensor, target: torch.Tensor, ignore_index: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss fp32 [N], lse fp32 [N]): F.cross_entropy(logits.float(), target, reduction="none")
    (0 where target is ignore_index) and the rows' logsumexp."""
    x = logits.float()
    loss = torch.nn.functional.cross_entropy(x, target, ignore_index=ignore_index, reduction="none")
    return loss, torch.logsumexp(x, dim=-1)


def cross_entropy_backward_ref(logits: torch.Tensor, target: torch.Tensor, g: torch.Tensor,
                               ignore_index: int) -> torch.Tensor:
    """The gradient of sum(loss * g) (g fp32 [N], or 0-d: one factor for every row) as autograd
    computes it through F.cross_entropy(logits.float(), ...), rounded to the logits' dtype."""
    with torch.enable_grad():
        x = logits.detach().float().requires_grad_()
        loss = torch.nn.functional.cross_entropy(x, target, ignore_index=ignore_index, reduction="none")
        (dx,) = torch.autograd.grad(loss, x, g.expand_as(loss))
    return dx.to(logits.dtype)
