"""f8tensor: eager-mode float8 training for PyTorch with handwritten Triton kernels.

    convert_to_float8_training(model)   linear layers -> Float8Linear (core/)
    fuse_model_ops(model)               the model's norms, SwiGLU gate and RoPE -> fused ops (fusion/, fused_ops/)
    cross_entropy(logits, target)       the loss, written into the training step (fused_ops/)
"""

from .core import ops  # noqa: F401  (fills Float8Tensor's op table)
from .core.config import Float8Config
from .core.convert import conversion_summary, convert_to_float8_training
from .core.linear import Float8Linear
from .core.ops import scaled_mm
from .core.tensor import Float8Tensor, GemmRole, to_float8
from .core.weight_cache import forget_fp8_weights
from .distributed.fsdp_float8 import forget_precomputed_scales, precompute_float8_scales
from .fused_ops.cross_entropy import causal_lm_loss, cross_entropy
from .fused_ops.rms_norm import RMSNorm
from .fused_ops.rope import rope
from .fused_ops.swiglu import geglu, geglu_halves, swiglu, swiglu_halves
from .fusion.fuse import FusionError, FusionReport, fuse_model_ops, fusion_report
from .fusion.python_versions import FusionWarning
from .state import reset_state

__all__ = [
    "Float8Config", "Float8Linear", "Float8Tensor", "FusionError", "FusionReport", "FusionWarning", "GemmRole",
    "RMSNorm", "causal_lm_loss", "conversion_summary", "convert_to_float8_training", "cross_entropy", "forget_fp8_weights", "forget_precomputed_scales",
    "fuse_model_ops",
    "fusion_report", "geglu", "geglu_halves", "precompute_float8_scales", "reset_state", "rope", "scaled_mm", "swiglu",
    "swiglu_halves", "to_float8",
]
__version__ = "0.2.0"
