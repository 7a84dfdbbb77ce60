"""The amax of each weight's latest forward cast, read by an activation-checkpoint recomputation.

Activation checkpointing runs a block's forward again in backward, on the weights the first
forward read: non-reentrant checkpointing (torchtitan, Hugging Face) checks that the recomputed
saved tensors match the first forward's, and its result is only right if they do. So a
Float8Linear forward that is such a recomputation (`torch_internals.checkpoint_phase`, or for a
reentrant checkpoint `inside_backward`; core/linear.py decides) casts its weight with the amax of
that weight's latest forward cast: one read of the weight instead of two, the same scale and the
same bits.

The entry lives on the weight tensor itself (weight_attr.py: on the local shard of a tensor-parallel
weight; never a weak reference to the weight; left out of copies and pickles): the amax record of
its latest cast outside a backward pass together with the version counter, storage object,
storage offset, dtype, shape and device it was taken at. It is used only while all six are
unchanged; every forward cast replaces it, so it is never older than the forward being recomputed.
The storage object, not its memory: FSDP2 (reshard after forward) frees a gathered weight's memory
after forward and gathers the same values into the same storage object again, its version counter
kept, for the recomputation, which then reuses the amax; a weight given other storage (`.data =`,
`Module.to()`, a copy) gets none. The entry holds a weak reference of PyTorch's own to that object
(torch_internals.storage_ref), so no other storage takes its address while the entry lives.
Writes that bypass the version counter (`.data`, DLPack, collectives into the parameter) between a
forward and its recomputation are not seen here; they break the checkpoint's recomputation itself,
whose saved tensors would no longer be the first forward's. Nothing is remembered where
`weight_attr.trackable` says no (while torch.compile traces: the compiled graph recomputes what its
partitioner chooses; fake and functorch-wrapped tensors; inference tensors; CUDA graph capture).
`reset_state()` does not reach the entries (nothing at module level holds them).

Memory: one amax record per weight that Float8Linear has cast (the Triton path's int32 partial
maxima, one per program of the amax pass: a few kilobytes; a 0-d tensor elsewhere).
"""

import torch

from ..torch_internals import same_storage, storage_ref
from . import weight_attr

# The attribute of a weight tensor holding its _Entry.
ATTR = "_f8tensor_latest_amax"


class _Entry(weight_attr.Entry):
    __slots__ = ("key", "storage", "amax")


def _key(w: torch.Tensor) -> tuple:
    return (w._version, w.storage_offset(), w.dtype, tuple(w.shape), w.device)


def remember(w: torch.Tensor, amax: torch.Tensor | None) -> None:
    """Record `amax` (the record `quantize_with_amax` returned) as the amax of w's current values."""
    if amax is None or not weight_attr.trackable(w):
        return
    entry = _Entry()
    entry.key, entry.storage, entry.amax = _key(w), storage_ref(w), amax
    weight_attr.put(w, ATTR, entry)


def latest(w: torch.Tensor) -> torch.Tensor | None:
    """The amax record of w's latest forward cast if w is unchanged since, else None."""
    if not weight_attr.trackable(w):
        return None
    entry = weight_attr.get(w, ATTR)
    if entry is None or entry.key != _key(w) or not same_storage(w, entry.storage):
        return None
    return entry.amax
