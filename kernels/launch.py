"""Relaunch an already-compiled Triton kernel without `JITFunction.run`'s per-call host work.

Every `kernel[grid](...)` in Triton 3.6 pays, in Python, for binding and specializing each
argument, a string cache key, device and stream lookups, launch metadata and two (empty) hook
calls; our kernels are short enough that host time, not the GPU, bounds eager training.
`FastLauncher` keeps its own dict from a cheap tuple key to the `CompiledKernel` that
`JITFunction.run` chose, and on a hit makes the same final call `JITFunction.run` makes:
`kernel.run(grid, stream, function, packed_metadata, ..., *args)`.

The key must be at least as fine as Triton's own: a finer key only costs one more slow call (which
returns the kernel Triton already cached), a coarser one would launch the wrong binary. Triton 3.6
(`native_specialize_impl`, `compute_cache_key`) specializes on: for a tensor, its dtype and
data_ptr() % 16 == 0; for an int, == 1 (it becomes a constexpr), % 16 == 0, and i32/i64/u64 by
value; for bool and float, the type; None is a constexpr; constexpr and option kwargs (num_warps,
...) by value, plus the `debug` and `instrumentation_mode` knobs it folds into the options; and
the current device (one kernel cache per device).
"""

import torch
from triton import knobs
from triton.knobs import HookChain
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from .scale import INTERPRETING

_MISSING = object()


def _idle(hook) -> bool:
    # 3.6's default hooks are empty HookChains, which the C launcher would call to no effect.
    return hook is None or (type(hook) is HookChain and not hook.calls)


class FastLauncher:
    """`FastLauncher(jit_fn)[grid](*args, **constexpr_and_option_kwargs)`, as `jit_fn[grid](...)`."""

    def __init__(self, jit_fn):
        self.jit_fn = jit_fn
        # The interpreter's InterpretedFunction never yields a CompiledKernel: always the plain path.
        self.fast = not INTERPRETING and isinstance(jit_fn, JITFunction)
        self.names = [p.name for p in jit_fn.params] if self.fast else []
        self.constexprs = {p.name for p in jit_fn.params if p.is_constexpr} if self.fast else set()
        self.cache = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        rt, fn = knobs.runtime, self.jit_fn
        if not (self.fast and type(grid) is tuple and _idle(rt.launch_enter_hook)
                and _idle(rt.launch_exit_hook) and not fn.pre_run_hooks):
            return fn[grid](*args, **kwargs)  # hooks must see Triton's own launch metadata
        drv = driver.active  # device and stream exactly as JITFunction.run gets them
        device = drv.get_current_device()
        # kwarg types too: Triton's str() cache key tells True from 1 and 1.0, a dict key would not.
        key = [device, rt.debug, knobs.compilation.instrumentation_mode,
               tuple(kwargs.items()), tuple(map(type, kwargs.values()))]
        for a in args:  # inline, not a call per argument: this loop is most of the hit's cost
            t = type(a)  # exact types, as Triton's dispatch: a bool is not an int here
            if t is int and -0x8000000000000000 <= a <= 0x7FFFFFFFFFFFFFFF:  # else u64/overflow: slow
                key += (a == 1, (a & 15) == 0, -0x80000000 <= a <= 0x7FFFFFFF)  # 1 is a constexpr
            elif isinstance(a, torch.Tensor) and a.is_cuda:  # a CPU tensor: let Triton raise
                key += (a.dtype, (a.data_ptr() & 15) == 0)
            elif t is bool or t is float or a is None:
                key.append(t)
            else:
                return fn[grid](*args, **kwargs)
        # Flat but unambiguous: an int adds 3 bools, a tensor a dtype and a bool, the rest a type.
        key = tuple(key)
        try:
            entry = self.cache.get(key)
        except TypeError:  # an unhashable kwarg value
            return fn[grid](*args, **kwargs)
        if entry is None:
            kernel = fn[grid](*args, **kwargs)  # compiles if needed, launches, returns the kernel
            tail = self.names[len(args):]  # params passed by name
            # Cache only a loaded CompiledKernel (not a jit_cache_hook's None nor an async future),
            # and only if every param after the positional ones is a constexpr given by name: a
            # default would have to be bound, and a tensor kwarg would enter the key by identity.
            if getattr(kernel, "function", None) is not None and all(
                    n in kwargs and n in self.constexprs for n in tail):
                self.cache[key] = (kernel, kernel.run, kernel.function, kernel.packed_metadata, tail)
            return kernel
        kernel, run, function, packed_metadata, tail = entry
        # JITFunction.run raises if a global the kernel read at compile time has changed: let it.
        for (name, _), (val, globals_dict) in fn.used_global_vals.items():
            if globals_dict.get(name, _MISSING) != val:
                return fn[grid](*args, **kwargs)
        grid = grid + (1, 1)  # 1-D / 2-D grids: the missing dimensions are 1, as in JITFunction.run
        # Arguments as JITFunction.run passes them: all params in signature order, constexprs
        # included (the 3.6 launcher parses them as objects and drops them); launch_metadata and
        # both hooks None, which is what an empty hook chain amounts to.
        run(grid[0], grid[1], grid[2], drv.get_current_stream(device), function,
            packed_metadata, None, None, None, *args, *[kwargs[n] for n in tail])
        return kernel
