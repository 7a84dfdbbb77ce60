"""f8tensor: eager-mode float8 training for PyTorch with handwritten Triton kernels."""

from . import ops  # noqa: F401  (fills Float8Tensor's op table)
from .config import Float8Config
from .convert import conversion_summary, convert_to_float8_training
from .linear import Float8Linear
from .ops import scaled_mm
from .rms_norm import RMSNorm
from .rope import rope
from .swiglu import swiglu
from .tensor import Float8Tensor, GemmRole, to_float8
from .weight_cache import forget_fp8_weights

__all__ = [
    "Float8Config", "Float8Linear", "Float8Tensor", "GemmRole", "RMSNorm", "conversion_summary",
    "convert_to_float8_training", "forget_fp8_weights", "rope", "scaled_mm", "swiglu", "to_float8",
]
__version__ = "0.1.0"
