"""Which path a fused op takes: its Triton kernels, or its reference in plain PyTorch ops."""

import torch

from ..torch_internals import transformed


def kernels_can_run(*tensors: torch.Tensor) -> bool:
    """Whether a fused op's kernels, behind an autograd.Function with a backward and nothing more,
    may stand in for its reference in plain ops: not while torch.compile traces (inductor fuses the
    plain ops), not for tensor subclasses (DTensor, ...: no memory of their own for a kernel), not
    under torch.func transforms (wrapped tensors) nor for forward-mode AD (dual tensors), which
    need rules such a Function does not have. The reference serves all of these."""
    if torch.compiler.is_compiling() or transformed(*tensors):
        return False
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
