"""The amax of each weight's latest forward cast, read by an activation-checkpoint recomputation.

Activation checkpointing runs a block's forward again in backward, on the weights the first
forward read: non-reentrant checkpointing (torchtitan, Hugging Face) checks that the recomputed
saved tensors match the first forward's, and its result is only right if they do. So a
Float8Linear forward that is such a recomputation (`torch_internals.checkpoint_phase`, or for a
reentrant checkpoint `inside_backward`; core/linear.py decides) casts its weight with the amax of
that weight's latest forward cast: one read of the weight instead of two, the same scale and the
same bits.

The entry lives on the weight tensor itself (its `__dict__`, under ATTR): the amax record of its
latest cast outside a backward pass together with the version counter, storage, dtype, shape and
device it was taken at. It is used only while all five are unchanged; every forward cast replaces
it, so it is never older than the forward being recomputed. Writes that bypass the version counter
(`.data`, DLPack, collectives into the parameter) between a forward and its recomputation are not
seen here; they break the checkpoint's recomputation itself, whose saved tensors would no longer
be the first forward's. Nothing is remembered while torch.compile traces (the compiled graph
recomputes what its partitioner chooses), while a CUDA graph is being captured, or for inference
tensors.

On the tensor, not in a registry keyed by weak references: a weak reference to a weight makes
`torch.utils.swap_tensors` refuse it, and PyTorch swaps parameters in `Module.to()` / `.float()` /
`.cuda()` and `load_state_dict()` under `torch.__future__.set_swap_module_params_on_conversion(True)`,
and in `Module.to()` always for a parameter that is a tensor subclass. An entry goes with its weight:
freed with it, copied by `copy.deepcopy` and pickled with the module object (its recorded storage
then differs, so the copy's entry is never used); `state_dict()` holds detached tensors and so no
entries. `reset_state()` does not reach them (nothing at module level holds them).

Memory: one amax record per weight that Float8Linear has cast (the Triton path's int32 partial
maxima, one per program of the amax pass: a few kilobytes; a 0-d tensor elsewhere).
"""

import torch

# The attribute of a weight tensor holding (key, amax record) of its latest forward cast.
ATTR = "_f8tensor_latest_amax"


def _rememberable(w: torch.Tensor) -> bool:
    return not (torch.compiler.is_compiling() or w.is_inference()
                or (w.is_cuda and torch.cuda.is_current_stream_capturing()))


def _key(w: torch.Tensor) -> tuple:
    return (w._version, w.data_ptr(), w.dtype, tuple(w.shape), w.device)


def remember(w: torch.Tensor, amax: torch.Tensor | None) -> None:
    """Record `amax` (the record `quantize_with_amax` returned) as the amax of w's current values."""
    if amax is None or not _rememberable(w):
        return
    w.__dict__[ATTR] = (_key(w), amax)


def latest(w: torch.Tensor) -> torch.Tensor | None:
    """The amax record of w's latest forward cast if w is unchanged since, else None."""
    if not _rememberable(w):
        return None
    entry = w.__dict__.get(ATTR)
    if entry is None or entry[0] != _key(w):
        return None
    return entry[1]
