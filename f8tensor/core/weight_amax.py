"""The amax of each weight's latest forward cast, read by an activation-checkpoint recomputation.

Activation checkpointing runs a block's forward again in backward, on the weights the first
forward read: non-reentrant checkpointing (torchtitan, Hugging Face) checks that the recomputed
saved tensors match the first forward's, and its result is only right if they do. So a
Float8Linear forward that is such a recomputation (`torch_internals.checkpoint_phase`, or for a
reentrant checkpoint `inside_backward`; core/linear.py decides) casts its weight with the amax of
that weight's latest forward cast: one read of the weight instead of two, the same scale and the
same bits.

An entry holds, per parameter object (a weak reference), the amax record of its latest cast
outside a backward pass together with the version counter, storage, dtype and shape it was taken
at. It is used only while all five are unchanged; every forward cast replaces it, so it is never
older than the forward being recomputed. Writes that bypass the version counter (`.data`, DLPack,
collectives into the parameter) between a forward and its recomputation are not seen here; they
break the checkpoint's recomputation itself, whose saved tensors would no longer be the first
forward's. Nothing is remembered while torch.compile traces (the compiled graph recomputes what
its partitioner chooses), while a CUDA graph is being captured, or for inference tensors.

Memory: one amax record per parameter that Float8Linear has cast (the Triton path's int32 partial
maxima, one per program of the amax pass: a few kilobytes; a 0-d tensor elsewhere).

One dict for every thread (on CUDA, autograd runs backward, and checkpoint recomputation, in its
own device thread), keyed on the parameter's id and checked by identity.
"""

import functools
import weakref

import torch

# Plain dict operations (atomic under the GIL): no lock, which a weakref callback run by the
# garbage collector in the middle of a locked section would deadlock on.
LATEST: dict[int, tuple] = {}


def _drop(ident: int, ref: weakref.ref, entries: dict = LATEST) -> None:
    """The parameter was freed: drop its entry (unless a newer one took its id)."""
    entry = entries.get(ident)
    if entry is not None and entry[0] is ref:
        entries.pop(ident, None)


def _rememberable(w: torch.Tensor) -> bool:
    return not (torch.compiler.is_compiling() or w.is_inference()
                or (w.is_cuda and torch.cuda.is_current_stream_capturing()))


def _key(w: torch.Tensor) -> tuple:
    return (w._version, w.data_ptr(), w.dtype, tuple(w.shape), w.device)


def remember(w: torch.Tensor, amax: torch.Tensor | None) -> None:
    """Record `amax` (the record `quantize_with_amax` returned) as the amax of w's current values."""
    if amax is None or not _rememberable(w):
        return
    ident = id(w)
    entry = LATEST.get(ident)
    ref = entry[0] if entry is not None and entry[0]() is w else weakref.ref(w, functools.partial(_drop, ident))
    LATEST[ident] = (ref, _key(w), amax)


def latest(w: torch.Tensor) -> torch.Tensor | None:
    """The amax record of w's latest forward cast if w is unchanged since, else None."""
    if not _rememberable(w):
        return None
    entry = LATEST.get(id(w))
    if entry is None or entry[0]() is not w or entry[1] != _key(w):
        return None
    return entry[2]


def forget() -> None:
    """Drop every remembered amax (state.reset_state)."""
    LATEST.clear()
