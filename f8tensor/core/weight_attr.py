"""Entries f8tensor keeps on a weight tensor itself, in its `__dict__` (weight_amax.py: the amax of
its latest forward cast; weight_cache.py: its kept float8 copies).

On the tensor, not in a registry keyed by weak references: an entry is freed with its weight, and
`torch.utils.swap_tensors` refuses a tensor that has a weak reference (PyTorch swaps parameters in
`Module.to()` and `load_state_dict()` under `torch.__future__.set_swap_module_params_on_conversion(True)`,
and in `Module.to()` always for a parameter that is a tensor subclass).

- Entries live on `tensor_cache.owner(w)`: w's base where w views all of it with the same shape,
  strides, offset and dtype (`DTensor.to_local()` hands out a new such view of the local shard on
  every call; the view shares its base's storage and version counter), else w.
- `Entry`: the base class of entries. A tensor's copies and pickles carry its `__dict__`
  (`Tensor.__deepcopy__`, `Parameter.__reduce_ex__`; `Parameter.__deepcopy__` does not): an Entry
  deep-copies as None and pickles as an empty `collections.OrderedDict`, which `torch.load`'s
  weights-only unpickler accepts. No f8tensor class, amax record or float8 copy goes into a file.
- `get(w, attr)`: the Entry under `attr` on w's owner, else None (nothing there, or what a copy or
  a pickle left); `put(w, attr, entry)` sets it.
- `trackable(w)`: whether w's values can be told apart from call to call, so that an entry can
  stand for them: not while torch.compile traces (traced tensors stand for every call's), not a fake
  or functorch-wrapped tensor, not an inference tensor (no version counter), not while a CUDA graph
  is being captured (the graph must contain the work, not a value computed before capture).
"""

import collections

import torch

from ..torch_internals import is_fake, is_functorch_wrapped
from .tensor_cache import owner


class Entry:
    """Base class of the entries kept on a weight (subclasses declare their own __slots__)."""

    __slots__ = ("__weakref__",)

    def __copy__(self):
        return None

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (collections.OrderedDict, ())


def get(w: torch.Tensor, attr: str):
    entry = owner(w).__dict__.get(attr)
    return entry if isinstance(entry, Entry) else None


def put(w: torch.Tensor, attr: str, entry: Entry) -> None:
    owner(w).__dict__[attr] = entry


def trackable(w: torch.Tensor) -> bool:
    return not (torch.compiler.is_compiling() or w.is_inference() or is_fake(w) or is_functorch_wrapped(w)
                or (w.is_cuda and torch.cuda.is_current_stream_capturing()))
