"""Float8 copies of a weight, kept while the weight is unchanged (`Float8Config.keep_fp8_weight`).

Gradient-accumulation micro-batches and activation-checkpoint recomputation run forward again on
the same weight values. With keep_fp8_weight the weight is cast once, in both layouts in one pass
(forward reads the row-major copy, backward the column-major one), and every later forward and
backward reuses the copies until the weight changes. No flag per micro-batch: a copy is used only
while all of these hold:

- the same parameter object (the copies are its attribute), storage (data_ptr), dtype and shape;
- the same version counter: every in-place write bumps it (optimizer updates, `copy_`,
  `load_state_dict`, `with torch.no_grad(): w.mul_(...)`);
- no `torch.optim` optimizer has stepped since: a global optimizer step hook drops every copy,
  which also frees their memory until the next forward.

The copies live on the weight tensor itself (weight_attr.py: on the local shard of a
tensor-parallel weight; never a weak reference to the weight; copies and pickles of the weight
carry none), freed with it; this module holds the entries weakly (ENTRIES), to empty them all at
a step.

Not seen: writes that bypass the version counter — through `.data`, through DLPack or numpy views,
by collectives or custom kernels writing into the parameter (`dist.broadcast(p)`), or FSDP2's
all-gather copy-out (it preserves the version) of shards changed other than by an optimizer step.
After such a write call `forget_fp8_weights()`. Any optimizer's step drops every kept copy, also
those of weights it does not update (frozen layers are cast again after each step).

Memory: two bytes per parameter (both float8 layouts) from the first forward after an optimizer
step until the next step. Under FSDP2 that is per unsharded parameter on every rank, and the
all-gather gives the unsharded parameter new storage (a new key), so copies are seldom reused
there: not an option for FSDP2. Eager only: under torch.compile the cast is part of the graph,
done per call (in both layouts, one pass, the column-major copy saved for backward: linear.py);
so is it for an inference tensor (no version counter), while a CUDA graph is being captured
(the graph must contain the cast) and for fake or functorch-wrapped weights (`weight_attr.trackable`).

One set of entries for every thread (on CUDA, autograd runs backward, and checkpoint
recomputation, in its own device thread), under a lock; the garbage collector's removals of freed
weights' entries take no lock (WeakSet defers them during iteration).
"""

import threading
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..kernels import quantize_with_amax
from . import weight_attr

# The attribute of a weight tensor holding its _Entry.
ATTR = "_f8tensor_fp8_weight"


class _Entry(weight_attr.Entry):
    """A weight's kept float8 copies and the key they were made under (key None: emptied)."""

    __slots__ = ("key", "row", "col", "scale")

    def __init__(self):
        self.key = self.row = self.col = self.scale = None

    def empty(self) -> None:
        self.key = None  # first: a reader that still sees the key read the copies before they went
        self.row = self.col = self.scale = None


# The entries of every live weight with kept copies, held weakly: an entry goes with its weight.
ENTRIES: "weakref.WeakSet[_Entry]" = weakref.WeakSet()
LOCK = threading.Lock()
OPTIMIZER_HOOK = []


def _on_optimizer_step(optimizer, args, kwargs):
    forget_fp8_weights()


def forget_fp8_weights() -> None:
    """Drop every kept float8 weight (its memory is freed at once): the next forward casts again.
    Called after every torch.optim optimizer step; call it after writing weights in a way that
    does not bump their version counter (see this module's docstring)."""
    with LOCK:
        entries = list(ENTRIES)
        ENTRIES.clear()
    for entry in entries:
        entry.empty()


def _key(w: torch.Tensor, config) -> tuple:
    return (w._version, w.data_ptr(), w.dtype, tuple(w.shape), w.device, config.forward_dtype,
            config.power_of_2_scale)


def _cast(w: torch.Tensor, config):
    if torch.is_inference_mode_enabled():
        # Copies made by an eval forward under torch.inference_mode must be normal tensors, which
        # a later training forward can save for backward. (Leaving inference mode turns grad mode
        # on: no_grad keeps the cast out of autograd, as everywhere else.)
        with torch.inference_mode(False), torch.no_grad():
            return _cast(w, config)
    return quantize_with_amax(w, config.forward_dtype, "both", config.power_of_2_scale)[:3]


def fp8_weight(w: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row-major, column-major, scale) of w in config.forward_dtype: the kept copies while w is
    unchanged, else a fresh cast in both layouts (then kept)."""
    # An inference tensor has no version counter to tell a change; a CUDA graph being captured
    # must contain the cast, or its replays would multiply by this step's copies forever; fake and
    # functorch-wrapped tensors hold no values of their own (weight_attr.trackable).
    if not weight_attr.trackable(w):
        return _cast(w, config)
    key = _key(w, config)
    entry = weight_attr.get(w, ATTR)
    if entry is not None:
        row, col, scale = entry.row, entry.col, entry.scale  # before the key: empty() clears the key first
        if entry.key == key and row is not None:
            return row, col, scale
    row, col, scale = _cast(w, config)
    entry = _Entry()
    entry.key, entry.row, entry.col, entry.scale = key, row, col, scale
    weight_attr.put(w, ATTR, entry)  # replaces (and so frees) an older entry's copies
    with LOCK:
        if not OPTIMIZER_HOOK:
            OPTIMIZER_HOOK.append(register_optimizer_step_post_hook(_on_optimizer_step))
        ENTRIES.add(entry)
    return row, col, scale


def kept_fp8_weights() -> int:
    """How many weights have float8 copies kept now (for tests and memory accounting)."""
    with LOCK:
        return sum(entry.key is not None for entry in list(ENTRIES))
