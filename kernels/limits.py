"""Sizes the Triton kernels take, importable without triton (the fused ops decide their path by them)."""

# The longest row rms_norm's kernels take (a row is held in registers); longer rows run PyTorch's
# own kernel (f8tensor/fused_ops/rms_norm.py).
RMS_NORM_MAX_D = 16384
