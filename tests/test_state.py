"""State in one place (f8tensor/state.py): reset_state clears every cache it lists, and no module
of the package keeps state that the list misses."""

import copy
import importlib
import pickle
import pkgutil
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from f8utils import DEVICE, SwiGLU, convert_and_fuse, train_step
from torch import nn

import f8tensor
from f8tensor import Float8Config, Float8Linear, reset_state, to_float8
from f8tensor.state import STORES


def _size(obj) -> int:
    if hasattr(obj, "cache_info"):  # a functools cache
        return obj.cache_info().currsize
    if isinstance(obj, list) and obj and isinstance(obj[0], bool):  # a once-flag
        return int(obj[0])
    return len(obj)


def rope_rotation(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Rotated(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("cos", torch.randn(16, 64))
        self.register_buffer("sin", torch.randn(16, 64))

    def forward(self, x):
        return rope_rotation(x, self.cos, self.sin)


class SiLUActivation(nn.Module):  # as transformers 5 writes it
    def forward(self, input):
        return F.silu(input)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(64, 128), nn.Linear(64, 128), nn.Linear(128, 64)
        self.act_fn = SiLUActivation()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _workload():
    """What a training run does on this device: conversion and fusion (norm, gates, RoPE), a step
    with kept weights, a quantization, a fallback op, a copy of a fused model."""
    model = nn.Sequential(nn.RMSNorm(64), SwiGLU(64, 128), MLP(), Rotated()).to(DEVICE, torch.bfloat16)
    convert_and_fuse(model)
    train_step(model, torch.randn(2, 16, 64, device=DEVICE, dtype=torch.bfloat16))
    layer = Float8Linear(64, 64, bias=False, device=DEVICE, dtype=torch.bfloat16, config=Float8Config(keep_fp8_weight=True))
    layer(torch.randn(16, 64, device=DEVICE, dtype=torch.bfloat16)).sum().backward()
    with pytest.warns(UserWarning, match="not in Float8Tensor's op table"):
        to_float8(torch.randn(16, 32, device=DEVICE)).cumsum(0)
    pickle.loads(pickle.dumps(copy.deepcopy(model)))
    return model, layer


def test_reset_state_clears_every_store_it_lists():
    from f8tensor.core.tensor_cache import produced_amax, shared_input

    model, layer = _workload()
    held = torch.randn(4, 4)  # entries live while their tensor does
    shared_input.put(held, "value")
    produced_amax.put(held, "record")
    filled = {s.name for s in STORES if s.clear is not None and any(_size(o) for o in s.objects)}
    assert {"fallback warnings", "shared input", "produced amax", "kept weights", "saved-tensor names",
            "fused classes", "activation proofs", "rotary proofs"} <= filled
    reset_state()
    for store in STORES:
        if store.clear is not None:
            assert not any(_size(o) for o in store.objects), store.name
    assert len(f8tensor.core.tensor.OPS) > 20  # the op table is static: kept
    assert shared_input.get(held) is None and produced_amax.get(held) is None


def _modules():
    import f8tensor.kernels

    for package in (f8tensor, f8tensor.kernels):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.startswith("f8tensor.demo"):
                yield importlib.import_module(info.name)


WEAK = (weakref.WeakSet, weakref.WeakKeyDictionary, weakref.WeakValueDictionary)


def _is_container(value) -> bool:
    return isinstance(value, (dict, set, list, threading.local) + WEAK) or hasattr(value, "cache_info")


def _containers():
    """Every dict, set, list, weak container, thread-local or functools cache held at module level
    or as a class attribute of the package's classes, once: {where: object}."""
    found, seen = {}, set()
    for module in _modules():
        for name, value in vars(module).items():
            places = [(f"{module.__name__}.{name}", value)]
            if isinstance(value, type) and value.__module__ == module.__name__:
                places += [(f"{module.__name__}.{name}.{attr}", v) for attr, v in vars(value).items()
                           if not attr.startswith("__")]
            for where, v in places:
                if where.endswith(".__all__") or id(v) in seen or not _is_container(v):
                    continue
                seen.add(id(v))
                found[where] = v
    return found


def _state(value):
    if hasattr(value, "cache_info"):
        return value.cache_info().currsize
    if isinstance(value, WEAK):  # their repr shows no entries
        return ("entries", len(value))
    if isinstance(value, threading.local):  # this thread's attributes
        return repr(vars(value))
    return repr(value)


def _snapshot(containers: dict, listed: set) -> dict:
    return {where: _state(value) for where, value in containers.items() if id(value) not in listed}


def test_no_module_keeps_state_the_list_misses():
    """Whatever a workload changes at module level must be a listed store: a cache added without
    being listed fails here."""
    listed = {id(o) for s in STORES for o in s.objects}
    before = _snapshot(_containers(), listed)
    alive = _workload()  # kept: a weak container's entries live while the workload's objects do
    after = _snapshot(_containers(), listed)
    del alive
    changed = sorted(where for where in before if after.get(where) != before[where])
    assert not changed, f"module-level state not listed in f8tensor/state.py: {changed}"
    assert len(before) > 10  # the scan sees the package's constants


def test_reset_frees_what_the_tensor_caches_hold_in_every_thread():
    """The float8 copies a cache holds go at reset, not at the next garbage collection, also those
    another thread (autograd's device thread, say) put there."""
    import gc
    import threading
    import weakref

    from f8tensor.core.tensor_cache import produced_amax, shared_input

    keys, values = [], []

    def put(cache):
        key, value = torch.randn(4), torch.randn(4)
        keys.append(key)
        values.append(weakref.ref(value))
        cache.put(key, value)

    put(shared_input)
    stored, release = threading.Event(), threading.Event()

    def work():  # stays alive until after the reset, as autograd's device threads do
        put(produced_amax)
        stored.set()
        release.wait()

    worker = threading.Thread(target=work)
    worker.start()
    stored.wait()
    assert all(v() is not None for v in values)
    gc.disable()
    try:
        reset_state()
        assert all(v() is None for v in values)
    finally:
        gc.enable()
        release.set()
        worker.join()


def test_a_finished_threads_cache_entries_go_with_it():
    """Entries only their own thread can read are freed when it ends, and threads that come and go
    leave nothing behind in the caches."""
    import threading
    import weakref

    from f8tensor.core.tensor_cache import shared_input

    keys, values = [], []

    def put():
        key, value = torch.randn(4), torch.randn(4)
        keys.append(key)  # the key outlives the thread: only the thread's end can free the value
        values.append(weakref.ref(value))
        shared_input.put(key, value)

    before = len(shared_input.every_thread)
    for _ in range(20):
        worker = threading.Thread(target=put)
        worker.start()
        worker.join()
    assert all(v() is None for v in values)
    assert len(shared_input.every_thread) <= before
