"""What the user chooses: one frozen dataclass, and named recipes."""

from dataclasses import dataclass, replace

import torch

from ..kernels import FLOAT8_DTYPES

GRANULARITIES = ("tensorwise", "rowwise", "blockwise")


@dataclass(frozen=True)
class Float8Config:
    """How Float8Linear quantizes and multiplies. Frozen: it rides on Float8Tensor as metadata.

    Dynamic scaling: each cast computes the max(|x|) its scales come from. Tensorwise (the
    default): one scale per tensor. Rowwise: one scale per row of each GEMM operand along K
    (per token, per output channel, per input channel), torch._scaled_mm's rowwise GEMMs.
    Blockwise: one scale per 1 x 128 strip of activations and gradients along K, one per
    128 x 128 tile of weights (DeepSeek-V3's recipe), torch._scaled_mm's blockwise GEMMs.
    """

    # "tensorwise", "rowwise" (linear_rowwise.py) or "blockwise" (linear_blockwise.py); the latter
    # two not with keep_fp8_weight nor the FSDP2 float8 all-gather yet.
    scaling_granularity: str = "tensorwise"
    # Rowwise and blockwise: the weight-gradient GEMM in the input's dtype on unquantized operands
    # (torchao's "rowwise_with_gw_hp": that GEMM's operands are scaled along the token axis, where
    # outliers sit).
    grad_weight_high_precision: bool = False

    # input and weight (forward GEMM operands)
    forward_dtype: torch.dtype = torch.float8_e4m3fn
    # grad_output (both backward GEMMs): e5m2 keeps the range gradients need
    backward_dtype: torch.dtype = torch.float8_e5m2
    # fast accumulation trades a little accuracy for speed; by default only in the output GEMM
    fast_accum_output: bool = True
    fast_accum_grad_input: bool = False
    fast_accum_grad_weight: bool = False
    # True: save the fp8 input for backward (less memory). False: save the high-precision input
    # and quantize it again in backward (friendlier to activation-checkpointing policies that
    # decide what to keep by dtype or identity). The weight is cast again in backward from the
    # parameter either way (unless keep_fp8_weight): a saved fp8 copy would add memory.
    save_fp8_for_backward: bool = True
    # Under non-reentrant activation checkpointing with early stop off (torchtitan's trainer's
    # default), a layer whose saves are the checkpoint's last (a Llama block's down projection)
    # skips its forward GEMM in the recomputation and passes zeros of the output's shape on:
    # nothing after those saves reaches backward (checkpointing refuses further saves; with early
    # stop on it stops there itself, core/saves_first.py). True runs that GEMM, for code after the
    # layer that reads the recomputed values for a side effect (a forward hook logging them).
    recompute_unread_gemm: bool = False
    # Keep each weight's float8 copies (both layouts, cast in one pass) while the weight is
    # unchanged: gradient-accumulation micro-batches and activation-checkpoint recomputation reuse
    # them. Dropped on in-place writes and on every torch.optim step; costs 2 bytes per parameter
    # until the next optimizer step. Plain-tensor weights only (not DTensor), not for FSDP2 (per
    # rank it would keep every unsharded weight); see weight_cache.py for the writes it cannot see
    # (.data, collectives or custom kernels writing into a parameter). Under torch.compile nothing
    # is kept across calls: each forward casts both layouts in one pass and saves the column-major
    # copy for its backward (1 byte per parameter from forward to backward).
    keep_fp8_weight: bool = False
    # FSDP2 all-gathers each Float8Linear weight in float8 (half the bytes), every rank casting its
    # shard with the weight's global scale first (distributed/fsdp_float8.py): conversion makes the
    # weights Float8AllGatherWeight parameters (new Parameter objects: build the optimizer after
    # conversion). Off by default until measured faster on GPUs; not with keep_fp8_weight.
    fsdp_float8_all_gather: bool = False
    # Round every scale down to a power of two (exact scaling, slightly less range used).
    power_of_2_scale: bool = False
    # Run the GEMMs in high precision on dequantized operands, for devices without fp8 GEMMs.
    emulate: bool = False

    def __post_init__(self):
        for name in ("forward_dtype", "backward_dtype"):
            if getattr(self, name) not in FLOAT8_DTYPES:
                raise ValueError(
                    f"Float8Config.{name} must be torch.float8_e4m3fn or torch.float8_e5m2, "
                    f"got {getattr(self, name)}"
                )
        if self.scaling_granularity not in GRANULARITIES:
            raise ValueError(f"Float8Config.scaling_granularity must be one of {GRANULARITIES}, got "
                             f"{self.scaling_granularity!r}")
        if self.scaling_granularity != "tensorwise":
            self._check_axiswise()
        elif self.grad_weight_high_precision:
            raise ValueError("Float8Config.grad_weight_high_precision is a rowwise and blockwise option; use "
                             "Float8Config.from_recipe_name('rowwise_with_gw_hp')")
        if self.fsdp_float8_all_gather and self.keep_fp8_weight:
            raise ValueError(
                "Float8Config: fsdp_float8_all_gather and keep_fp8_weight exclude each other: the weight "
                "FSDP2 gathers is already float8 (cast once per all-gather); set keep_fp8_weight=False")
        if self.forward_dtype == torch.float8_e5m2:
            raise ValueError(
                "Float8Config.forward_dtype is float8_e5m2: the forward GEMM multiplies the input by the "
                "weight, both cast to forward_dtype, and CUDA's _scaled_mm rejects e5m2 x e5m2; use "
                "forward_dtype=torch.float8_e4m3fn (backward_dtype may be e5m2, the gradients' usual format)"
            )

    def _check_axiswise(self):
        granularity = self.scaling_granularity
        for name in ("keep_fp8_weight", "fsdp_float8_all_gather"):
            if getattr(self, name):
                raise ValueError(f"Float8Config: {name} is built for tensorwise scaling only; with "
                                 f"scaling_granularity={granularity!r} set {name}=False")
        if granularity == "blockwise":
            for name in ("forward_dtype", "backward_dtype"):
                if getattr(self, name) != torch.float8_e4m3fn:
                    raise ValueError(
                        f"Float8Config: blockwise GEMMs multiply float8_e4m3fn operands only (cuBLAS refuses e5m2); "
                        f"set {name}=torch.float8_e4m3fn, or use Float8Config.from_recipe_name('blockwise')")
            for name in ("fast_accum_output", "fast_accum_grad_input", "fast_accum_grad_weight"):
                if getattr(self, name):
                    raise ValueError(
                        f"Float8Config: blockwise GEMMs have no fast accumulation (cuBLAS refuses it on Hopper); "
                        f"set {name}=False, or use Float8Config.from_recipe_name('blockwise')")

    @classmethod
    def from_recipe_name(cls, name: str) -> "Float8Config":
        """'tensorwise' (default), 'tensorwise_pow2' (power-of-two scales), 'tensorwise_e4m3'
        (e4m3 gradients too), 'rowwise' (one scale per row of every GEMM operand along K, e4m3
        everywhere), 'rowwise_with_gw_hp' (rowwise, the weight-gradient GEMM in high precision),
        'blockwise' (1 x 128 strips for activations and gradients, 128 x 128 tiles for weights, e4m3
        everywhere, no fast accumulation: DeepSeek-V3's recipe).
        torchao's recipes of those names also round scales to powers of two; these do not, as
        power-of-two scales leave rowwise a little below tensorwise on gaussian data (docs/design.md,
        "Rowwise scaling"); Float8Config.replace(power_of_2_scale=True) turns them on."""
        e4m3 = torch.float8_e4m3fn
        rowwise = dict(scaling_granularity="rowwise", backward_dtype=e4m3)
        recipes = {
            "tensorwise": cls(),
            "tensorwise_pow2": cls(power_of_2_scale=True),
            "tensorwise_e4m3": cls(backward_dtype=e4m3),
            "rowwise": cls(**rowwise),
            "rowwise_with_gw_hp": cls(**rowwise, grad_weight_high_precision=True),
            "blockwise": cls(scaling_granularity="blockwise", backward_dtype=e4m3, fast_accum_output=False),
        }
        if name not in recipes:
            raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(recipes)}")
        return recipes[name]

    def replace(self, **changes) -> "Float8Config":
        return replace(self, **changes)
