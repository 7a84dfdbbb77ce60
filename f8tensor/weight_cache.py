"""Float8 copies of a weight, kept while the weight is unchanged (`Float8Config.keep_fp8_weight`).

Gradient-accumulation micro-batches and activation-checkpoint recomputation run forward again on
the same weight values. With keep_fp8_weight the weight is cast once, in both layouts in one pass
(forward reads the row-major copy, backward the column-major one), and every later forward and
backward reuses the copies until the weight changes. No flag per micro-batch: a copy is used only
while all of these hold:

- the same parameter object (a weak reference), storage (data_ptr), dtype and shape;
- the same version counter: every in-place write bumps it (optimizer updates, `copy_`,
  `load_state_dict`, `with torch.no_grad(): w.mul_(...)`);
- no `torch.optim` optimizer has stepped since: a global optimizer step hook drops every copy,
  which also frees their memory until the next forward.

Not seen: writes that bypass the version counter — through `.data`, or into parameters that FSDP2
all-gathers (its copy-out preserves the version) other than by an optimizer step. After such a
write call `forget_fp8_weights()`. Memory: two bytes per parameter (both float8 layouts) from the
first forward after an optimizer step until the next step. Eager only: under torch.compile the
cast is part of the graph, done per call; an inference tensor (no version counter) is cast per call.

The cache is one dict for every thread (on CUDA, autograd runs backward, and checkpoint
recomputation, in its own device thread), keyed on the parameter's id and checked by identity.
"""

import threading
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .kernels import quantize_with_amax


class _Entry:
    __slots__ = ("ref", "key", "row", "col", "scale")


_ENTRIES: dict[int, _Entry] = {}
_LOCK = threading.Lock()
_HOOK = None


def _on_optimizer_step(optimizer, args, kwargs):
    forget_fp8_weights()


def forget_fp8_weights() -> None:
    """Drop every kept float8 weight (and free its memory): the next forward casts again. Called
    after every torch.optim optimizer step; call it after writing weights through `.data` or into
    FSDP2-sharded parameters outside an optimizer step."""
    with _LOCK:
        _ENTRIES.clear()


def _key(w: torch.Tensor, config) -> tuple:
    return (w._version, w.data_ptr(), w.dtype, tuple(w.shape), w.device, config.forward_dtype,
            config.power_of_2_scale)


def fp8_weight(w: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row-major, column-major, scale) of w in config.forward_dtype: the kept copies while w is
    unchanged, else a fresh cast in both layouts (then kept)."""
    global _HOOK
    if w.is_inference():  # no version counter to tell a change: cast every time
        return quantize_with_amax(w, config.forward_dtype, "both", config.power_of_2_scale)[:3]
    key = _key(w, config)
    entry = _ENTRIES.get(id(w))
    if entry is not None and entry.ref() is w and entry.key == key:
        return entry.row, entry.col, entry.scale
    row, col, scale, _ = quantize_with_amax(w, config.forward_dtype, "both", config.power_of_2_scale)
    entry = _Entry()
    ident = id(w)

    def drop(ref):
        with _LOCK:
            if _ENTRIES.get(ident) is entry:
                del _ENTRIES[ident]

    entry.ref, entry.key, entry.row, entry.col, entry.scale = weakref.ref(w, drop), key, row, col, scale
    with _LOCK:
        if _HOOK is None:
            _HOOK = register_optimizer_step_post_hook(_on_optimizer_step)
        _ENTRIES[ident] = entry
    return row, col, scale


def kept_fp8_weights() -> int:
    """How many weights have float8 copies kept now (for tests and memory accounting)."""
    return len(_ENTRIES)
