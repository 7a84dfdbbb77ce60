"""Relaunch a kernel that Triton has compiled and launched once, through its C launcher directly.

Every `kernel[grid](...)` in Triton pays, in Python, for binding and specializing each argument, a
string cache key, device and stream lookups, launch metadata and two (empty) hook calls: more host
time than our kernels take on the GPU for small tensors (docs/design.md, "Kernel launches"). The
kernels' entry points (quantize.py and the fused ops) therefore launch each case once the normal
way, keep the `CompiledKernel` Triton chose (`Relaunch.capture`), and from then on make only the
final call Triton itself makes: the compiled module's C `launch` function.

That call passes Triton's internals positionally (the grid, stream, function, scratch buffers,
metadata and hooks `CudaLauncher.__call__` passes), so it is made only on the Triton versions in
CHECKED_TRITON, whose launcher tests/test_launch.py checks bit for bit against Triton's own launch
on the GPU. Any other Triton launches every call through Triton's own path (correct, more host
time), with one warning.

The caller owns the cache key and must make it at least as fine as Triton's specialization, or a
relaunch would run a binary compiled for other arguments. Triton 3.6 (`native_specialize_impl`,
`compute_cache_key`) specializes on: for a tensor, its dtype and data_ptr() % 16 == 0; for an int,
== 1, % 16 == 0 and its i32/i64 range; for bool and float, the type; constexprs and options
(num_warps, ...) by value; the `debug` and `instrumentation_mode` knobs; the current device.
`specialization_key` gives the process-wide part of that (device, knobs); quantize.py adds every
int argument by value and the alignment of the one tensor it does not allocate itself.
"""

import warnings

import torch
import triton
from triton import knobs
from triton.knobs import HookChain

from ..torch_internals import current_raw_stream, raw_stream_available
from .scale import INTERPRETING

# major.minor of the Triton releases whose C launcher the direct relaunch was checked against.
CHECKED_TRITON = ("3.6",)
# Whether this process warned that its Triton is not checked (state.py lists it).
warned = [False]


def triton_checked(version: str = triton.__version__) -> bool:
    """Whether the direct relaunch was checked against this Triton version."""
    return ".".join(version.split(".")[:2]) in CHECKED_TRITON


def _warn_unchecked() -> None:
    if not warned[0]:
        warned[0] = True
        warnings.warn(
            f"f8tensor: Triton {triton.__version__} is installed; its kernel launcher was not checked "
            f"(checked: Triton {', '.join(CHECKED_TRITON)}), so every kernel launches through Triton's own "
            f"launch path: correct, with more host time per call. Install triton=={CHECKED_TRITON[-1]}.* "
            "for the direct launch.", stacklevel=3)


def _idle(hook) -> bool:
    # 3.6's default hooks are empty HookChains, which the C launcher would call to no effect.
    return hook is None or (type(hook) is HookChain and not hook.calls)


_TRITON_CHECKED = triton_checked()


def relaunch_possible() -> bool:
    """False where Triton's own launch path must run: the interpreter, a Triton version the direct
    launch was not checked against (with one warning), or launch hooks installed (a profiler or a
    user hook must see Triton's launch metadata)."""
    if INTERPRETING or not raw_stream_available():
        return False
    if not _TRITON_CHECKED:
        _warn_unchecked()
        return False
    rt = knobs.runtime
    return _idle(rt.launch_enter_hook) and _idle(rt.launch_exit_hook)


def specialization_key() -> tuple:
    """What, besides the arguments, selects the compiled binary: current device and two knobs."""
    return torch.cuda.current_device(), knobs.runtime.debug, knobs.compilation.instrumentation_mode


class Relaunch:
    """One compiled kernel on one grid. `self(stream, *args)` takes every parameter of the kernel
    in signature order, constexprs included (the 3.6 launcher parses and drops them)."""

    __slots__ = ("launch", "function", "metadata", "grid", "flags")

    def __init__(self, launch, function, metadata, grid, flags):
        self.launch, self.function, self.metadata, self.grid, self.flags = launch, function, metadata, grid, flags

    @classmethod
    def capture(cls, kernel, grid: tuple) -> "Relaunch | None":
        """From what `jit_fn[grid](...)` returned; None when it cannot be relaunched directly."""
        launcher = getattr(kernel, "run", None)
        if getattr(kernel, "function", None) is None or launcher is None:
            return None  # not a loaded CompiledKernel (a jit_cache_hook, an async compile)
        # Kernels that need per-launch scratch memory or tensor descriptors take the slow path.
        if (getattr(launcher, "global_scratch_size", 1) or getattr(launcher, "profile_scratch_size", 1)
                or not callable(getattr(launcher, "launch", None))
                or getattr(launcher.launch, "__name__", "") == "inner"):
            return None
        grid = tuple(grid) + (1,) * (3 - len(grid))
        flags = (launcher.launch_cooperative_grid, launcher.launch_pdl)
        return cls(launcher.launch, kernel.function, kernel.packed_metadata, grid, flags)

    def __call__(self, stream, *args):
        g0, g1, g2 = self.grid
        # grid, stream, function, cooperative, pdl, global scratch, profile scratch, packed
        # metadata, launch metadata, enter hook, exit hook: what CudaLauncher.__call__ passes.
        self.launch(g0, g1, g2, stream, self.function, *self.flags, None, None, self.metadata,
                    None, None, None, *args)


# (kernel, grid, arguments' specialization) -> Relaunch (state.py lists it).
RELAUNCHES: dict = {}
MAX_RELAUNCHES = 1024  # a case is a few hundred bytes; re-recording one costs one Triton launch path


def _arg_key(arg):
    # What Triton specializes an argument on, or finer: tensors by dtype and 16-byte alignment,
    # everything else by type and value.
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    return type(arg), arg


def launch_kernel(kernel, grid: tuple, args: tuple, num_warps: int, *, maxnreg: int | None = None, **constexprs):
    """`kernel[grid](*args, num_warps=num_warps, **constexprs)`: the first time for each case
    through Triton, later through the recorded C launcher (a `Relaunch`). The key holds the kernel,
    grid, knobs, current device and every argument (ints by value), so it is at least as fine as
    Triton's specialization. The constexprs must be the kernel's last parameters, in this order.
    maxnreg: Triton's compile option capping registers per thread (None: ptxas chooses)."""
    key = None
    if relaunch_possible():
        key = (kernel, grid, num_warps, maxnreg, *constexprs.items(), *specialization_key(), *map(_arg_key, args))
        relaunch = RELAUNCHES.get(key)
        if relaunch is not None:
            relaunch(current_raw_stream(torch.cuda.current_device()), *args,
                     *constexprs.values())
            return
    options = {} if maxnreg is None else dict(maxnreg=maxnreg)
    compiled = kernel[grid](*args, num_warps=num_warps, **options, **constexprs)
    if key is not None:
        relaunch = Relaunch.capture(compiled, grid)
        if relaunch is not None:
            if len(RELAUNCHES) >= MAX_RELAUNCHES:
                RELAUNCHES.clear()
            RELAUNCHES[key] = relaunch
