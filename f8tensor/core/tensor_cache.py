"""Values remembered for a tensor while it lives and is not modified: weak, per thread, a few slots.

Two uses, both so that work on a tensor's values is not repeated:
- `shared_input`: the last quantized layer input (q/k/v, and w1/w3, read the same tensor and
  quantize it once);
- `produced_amax`: amax records that the kernel producing a tensor measured while writing it
  (`f8tensor.RMSNorm`'s output; `f8tensor.swiglu`'s output and its gradients): the Float8Linear
  reading that tensor, as input or as grad_output, skips its amax pass.

An entry matches only the same tensor object (a weak reference: the entry goes when the tensor is
freed) at the same version (an in-place write invalidates it), and the same extra key. A view of
all of a tensor (same shape, strides, offset and dtype: the same values) stands for its base:
under tensor parallelism each layer reads the shared input through its own `DTensor.to_local()`
view of one base, and q/k/v still cast it once. Not seen: writes that do not bump the version
counter, through `.data` (`y.data.mul_(4)`), DLPack or numpy views, or custom kernels: an entry
made before such a write goes stale (an amax record of the old values, a float8 copy of them);
write through the tensor itself, or call `clear()` after such a write. Nothing is
remembered for inference tensors (no version counter) nor while torch.compile traces (traced
tensors stand for every call's tensors: identity and version mean nothing there). Entries made
while a CUDA graph is being captured and entries made outside capture never match each other:
a value cast before capture is not in the graph, and would not be updated by its replays; a value
the graph made is only valid while the graph runs.
"""

import threading
import weakref

import torch


class _Slot:
    """One entry (a plain object, so a weakref callback from any thread finds it)."""

    __slots__ = ("ref", "key", "value", "drop", "__weakref__")

    def __init__(self):
        self.ref = self.key = self.value = None
        me = weakref.ref(self)  # weak: a strong one would make slot -> ref -> drop -> slot a cycle

        def drop(ref):
            """The callback of the entry's weak reference: forget the entry if it is still this one."""
            slot = me()
            if slot is not None and slot.ref is ref:
                slot.ref = slot.key = slot.value = None

        self.drop = drop


class _Slots(list):
    """One thread's slots: a list the registry can hold weakly (weakly referable, hashed and
    compared by identity)."""

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other


class TensorCache:
    """`size` entries per thread, the oldest replaced first. `clear()` empties every live thread's;
    a thread's entries go when the thread ends (no other thread can read them)."""

    def __init__(self, size: int):
        self.size = size
        self.local = threading.local()
        # Every live thread's slots, for clear(): held weakly, so a finished thread's go with it.
        self.every_thread = weakref.WeakSet()

    def _slots(self) -> list:
        local = self.local
        slots = getattr(local, "slots", None)
        if slots is None:
            slots = local.slots = _Slots(_Slot() for _ in range(self.size))
            local.next = 0
            self.every_thread.add(slots)
        return slots

    def get(self, t: torch.Tensor, key: tuple = ()):
        if _untracked(t):
            return None
        t = owner(t)
        for slot in self._slots():
            if slot.ref is not None and slot.ref() is t and slot.key == (t._version, _capturing(t), *key):
                return slot.value
        return None

    def put(self, t: torch.Tensor, value, key: tuple = ()):
        if _untracked(t):
            return
        t = owner(t)
        slots, local = self._slots(), self.local
        slot = slots[local.next]
        local.next = (local.next + 1) % len(slots)
        slot.ref, slot.key, slot.value = weakref.ref(t, slot.drop), (t._version, _capturing(t), *key), value

    def clear(self) -> None:
        """Forget every entry, in every thread: the values are freed at once (no reference is left)."""
        for slots in list(self.every_thread):
            for slot in slots:
                slot.ref = slot.key = slot.value = None

    def __len__(self) -> int:
        """Entries held by this thread."""
        return sum(slot.ref is not None for slot in self._slots())


def owner(t: torch.Tensor) -> torch.Tensor:
    """t's base where t views all of it with the same layout and dtype, else t."""
    base = t._base
    if (base is not None and base.dtype == t.dtype and base.shape == t.shape
            and base.stride() == t.stride() and base.storage_offset() == t.storage_offset()):
        return base
    return t


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _untracked(t: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or t.is_inference()


# One entry: its float8 copies are freed as soon as the next input replaces them.
shared_input = TensorCache(1)
# A few: a norm's or swiglu's output in forward, swiglu's two gradients in backward (records are a
# few hundred bytes).
produced_amax = TensorCache(4)
