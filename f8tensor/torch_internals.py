"""Every private PyTorch interface f8tensor reads, in one place, each guarded.

A private interface can change in any PyTorch release. Each one here is used because it buys
something measured or required (docs/design.md, "Private PyTorch state"), reads as a plain function
to the rest of the package, and has a test in tests/test_torch_internals.py that fails when the
installed PyTorch no longer provides it, so an upgrade cannot switch a gain off without a sign.

Read through functions below:
- `torch._C._autograd._top_saved_tensors_default_hooks`, an autograd node's `_saved_*`
  attributes and `UntypedStorage._cdata`: whether autograd already keeps a tensor's storage for backward
  (`saved_by_producer`; Float8Linear then saves that input instead of a float8 copy of it), and
  whether saved-tensor hooks are active (`saved_tensors_hooks_active`; Float8Linear then runs its
  forward GEMM after its saves, core/saves_first.py);
- torch.utils.checkpoint's saved-tensor hook functions, by name (`checkpoint_phase`: in a
  checkpoint's first forward Float8Linear casts only what its forward GEMM reads, in its
  recomputation it casts the weight in both layouts with the first forward's amax, core/linear.py)
  and `torch._C._current_graph_task_id` (`inside_backward`: a reentrant checkpoint's recomputation
  reuses that amax too, core/weight_amax.py); the recomputation hook's closure and frame
  (`recomputation_saves_complete`: with early stop off, a layer whose saves are the checkpoint's
  last skips its forward GEMM in the recomputation, core/saves_first.py); none of them while
  selective checkpointing's dispatch modes (`torch.utils.checkpoint._CachingTorchDispatchMode` and
  `_CachedTorchDispatchMode`, found on `torch.utils._python_dispatch._get_current_dispatch_mode_stack()`)
  see the ops (`selective_checkpointing_active`: they replay op outputs by call order, so both
  passes must run the same ops);
- `torch._C._functorch.is_functorch_wrapped_tensor` (`is_functorch_wrapped`);
- `torch.fx._symbolic_trace.is_fx_symbolic_tracing` (`fx_tracing`);
- `torch._subclasses.fake_tensor.is_fake` and `FakeTensor` (`is_fake`, `is_fake_tensor`);
- `torch._C._cuda_getCurrentRawStream` (`current_raw_stream`: the stream handle Triton's own
  launcher passes, for the kernels' direct relaunch);
- the hook dictionaries of nn.Module (`module_hook_attributes`, `has_hooks`);
- an aten op's schema (`is_mutating`: Float8Tensor refuses ops that write in place;
  `written_arguments`: what FSDP2's float8 all-gather weight sees written);
- `torch.distributed.tensor.placement_types._StridedShard` (`shard_placements`: FSDP2's placement
  over tensor parallelism, which distributed/fsdp_float8.py finds to know which group it gathers over);
- `torch.fx.experimental.proxy_tensor.make_fx` (public in name, documented as a prototype: the
  complex RoPE fusion traces with it, fusion/rope_complex.py);
- `torch.utils._python_dispatch._disable_current_modes` (`dispatch_modes_disabled`: that trace runs
  without the caller's dispatch modes, fusion/rope_complex.py).
- `torch.multiprocessing.reductions.StorageWeakRef` and `UntypedStorage._cdata` (`storage_ref`,
  `same_storage`: the storage object a weight's remembered amax was taken on, held by a weak
  reference of PyTorch's own that keeps the object, not its memory; FSDP2 frees a gathered weight's
  memory after forward and gathers it again into the same storage object, core/weight_amax.py).

Used where they are, as PyTorch's own subclass and module code uses them: `Tensor._version` (the
version counter in-place writes bump), `Tensor._base` (a view's base),
`Tensor._make_wrapper_subclass`, `torch._C._disabled_torch_function_impl` and
`torch.utils._pytree.tree_map` (the wrapper-subclass recipe, core/tensor.py); and the ops
`torch._scaled_mm` (the float8 GEMM, core/ops.py) and `aten._unsafe_view` (an output that is not a
view, as matmul's, core/linear.py), which the tests call on every device.
"""

import inspect

import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn

_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
try:
    from torch._C._functorch import is_functorch_wrapped_tensor as _is_functorch_wrapped
except ImportError:  # pragma: no cover (every supported torch has it; the test says so)
    _is_functorch_wrapped = None
try:
    from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # pragma: no cover
    _is_fake = _FakeTensor = None
try:
    from torch.utils._python_dispatch import _disable_current_modes
except ImportError:  # pragma: no cover (every supported torch has it; the test says so)
    _disable_current_modes = None
_is_fx_tracing = getattr(getattr(torch.fx, "_symbolic_trace", None), "is_fx_symbolic_tracing", None)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # CUDA builds only
try:
    from torch.multiprocessing.reductions import StorageWeakRef as _StorageWeakRef
except ImportError:  # pragma: no cover (every supported torch has it; the test says so)
    _StorageWeakRef = None
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as _dispatch_mode_stack
    from torch.utils.checkpoint import _CachedTorchDispatchMode, _CachingTorchDispatchMode
    _sac_modes = (_CachingTorchDispatchMode, _CachedTorchDispatchMode)
except ImportError:  # pragma: no cover (every supported torch has them; the test says so)
    _dispatch_mode_stack = _sac_modes = None

# Autograd node type -> the names of its saved-tensor attributes (state.py lists it).
SAVED_NAMES: dict = {}


def saved_tensors_hooks_active() -> bool | None:
    """Whether saved-tensor hooks (activation checkpointing, offloading) are active; None where
    this torch cannot tell."""
    if _top_saved_tensors_hooks is None:
        return None
    return _top_saved_tensors_hooks(False) is not None


def checkpoint_phase() -> str | None:
    """"forward" while torch.utils.checkpoint's non-reentrant first forward runs (its saved-tensor
    hooks keep nothing but shape, dtype and device: backward recomputes the tensors), "recompute"
    while its recomputation runs, None otherwise (also while other saved-tensor hooks are on top of
    checkpointing's). Recognized by the hook functions checkpoint.py defines."""
    return _checkpoint_pack_hook()[0]


_CHECKPOINT_PHASES = {"_checkpoint_hook": "forward", "_recomputation_hook": "recompute"}


def _checkpoint_pack_hook() -> tuple:
    """(phase, pack hook) of the saved-tensor hooks on top when torch.utils.checkpoint installed
    them, else (None, None)."""
    hooks = _top_saved_tensors_hooks(False) if _top_saved_tensors_hooks is not None else None
    if hooks is None or getattr(hooks[0], "__module__", None) != "torch.utils.checkpoint":
        return None, None
    phase = _CHECKPOINT_PHASES.get(getattr(hooks[0], "__qualname__", "").split(".")[0])
    return phase, hooks[0] if phase is not None else None


def recomputation_saves_complete() -> bool:
    """Whether torch.utils.checkpoint's non-reentrant recomputation is running, with early stop off
    and its first forward completed, and has recomputed every tensor that first forward saved: then
    nothing the rest of this recomputation computes can reach backward (one more save would raise
    CheckpointError; with early stop on, checkpointing itself stops right there). False otherwise.
    Read from the recomputation's pack hook: its closure's `target_frame_ref` and `gid`, and the
    frame's `early_stop`, `forward_completed`, `recomp_counter` and `weak_holders`, the fields
    checkpoint.py's own pack hook compares."""
    phase, pack = _checkpoint_pack_hook()
    if phase != "recompute":
        return False
    pack = inspect.unwrap(pack)  # torch 2.13 wraps it in dynamo.disable
    cells = dict(zip(pack.__code__.co_freevars, pack.__closure__ or ()))
    if "target_frame_ref" not in cells or "gid" not in cells:
        raise RuntimeError(
            f"torch {torch.__version__}'s checkpoint recomputation hook has no target_frame_ref and gid "
            "in its closure; f8tensor supports torch 2.11 to 2.13")
    frame, gid = cells["target_frame_ref"].cell_contents(), cells["gid"].cell_contents
    if frame is None or frame.early_stop or not frame.forward_completed:
        return False
    return frame.recomp_counter[gid] >= len(frame.weak_holders)


def selective_checkpointing_active() -> bool:
    """Whether selective activation checkpointing's dispatch mode (`create_selective_checkpoint_contexts`:
    it caches op outputs in the first forward and replays them by call order in the recomputation,
    or a subclass of it) sees the ops run."""
    if _dispatch_mode_stack is None or _sac_modes is None:
        raise RuntimeError("this torch has no torch.utils._python_dispatch._get_current_dispatch_mode_stack or "
                           "no selective-checkpointing modes in torch.utils.checkpoint; f8tensor supports torch >= 2.11")
    return any(isinstance(mode, _sac_modes) for mode in _dispatch_mode_stack())


def inside_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread (as during an
    activation checkpoint's recomputation; torch.utils.checkpoint asks the same)."""
    if _graph_task_id is None:
        raise RuntimeError("this torch has no torch._C._current_graph_task_id; f8tensor supports torch >= 2.11")
    return _graph_task_id() != -1


def saved_by_producer(x: torch.Tensor) -> bool:
    """Whether the autograd node that produced x (or x's base) saved a tensor sharing x's storage:
    autograd keeps that storage for backward anyway. False where it cannot tell (no such hooks
    interface, saved-tensor hooks active, a freed or packed saved tensor)."""
    if saved_tensors_hooks_active() is not False:
        return False
    base = x._base if x._base is not None else x
    node = base.grad_fn
    if node is None:
        return False
    names = SAVED_NAMES.get(type(node))
    if names is None:
        names = SAVED_NAMES[type(node)] = [n for n in dir(node) if n.startswith("_saved_")]
    storage = _storage_object(x)  # not its address: fake tensors have none
    for name in names:
        try:
            value = getattr(node, name)
        except RuntimeError:  # freed, or packed by a saved-tensor hook: unknown
            return False
        if isinstance(value, torch.Tensor) and _storage_object(value) == storage:
            return True
    return False


def is_functorch_wrapped(t: torch.Tensor) -> bool:
    """Whether t is wrapped by a torch.func transform (grad, vmap, ...)."""
    if _is_functorch_wrapped is None:
        raise RuntimeError("this torch has no torch._C._functorch.is_functorch_wrapped_tensor; "
                           "f8tensor supports torch >= 2.11")
    return _is_functorch_wrapped(t)


def transformed(*tensors: torch.Tensor) -> bool:
    """Whether any tensor is wrapped by a torch.func transform or carries a forward-mode tangent
    (eager only: call it outside torch.compile's tracing)."""
    return any(is_functorch_wrapped(t) or forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def dispatch_modes_disabled():
    """A context in which none of the active TorchDispatchModes (selective activation
    checkpointing's, FlopCounterMode, ...) sees the ops run; they are back on leaving it."""
    if _disable_current_modes is None:
        raise RuntimeError("this torch has no torch.utils._python_dispatch._disable_current_modes; "
                           "f8tensor supports torch >= 2.11")
    return _disable_current_modes()


def fx_tracing() -> bool:
    """Whether torch.fx symbolic tracing is running."""
    return _is_fx_tracing is not None and _is_fx_tracing()


def is_fake(t: torch.Tensor) -> bool:
    """Whether t is a fake tensor (torch.compile traces with them; they hold no values)."""
    return _is_fake is not None and _is_fake(t)


def is_fake_tensor(t: torch.Tensor) -> bool:
    """Whether t is itself a FakeTensor (FakeTensorMode outside torch.compile): `is_fake` without
    looking inside wrappers, at a tenth of its cost (the kernels' entry points ask on every call)."""
    return _FakeTensor is not None and isinstance(t, _FakeTensor)


def raw_stream_available() -> bool:
    """Whether this torch gives the raw stream handle (a CUDA build does)."""
    return _raw_stream is not None


def current_raw_stream(device_index: int) -> int:
    """The current CUDA stream's handle on a device, as Triton's launcher passes it."""
    return _raw_stream(device_index)


def _storage_object(t: torch.Tensor) -> int:
    """t's storage object (its StorageImpl's address): the same through `UntypedStorage.resize_`,
    another for other storage; fake tensors have one too."""
    return t.untyped_storage()._cdata


def storage_ref(t: torch.Tensor):
    """A weak reference to t's storage object (its StorageImpl): it keeps that object, so no other
    storage takes its address while the reference lives, and not its memory (not a Python weak
    reference to t: `torch.utils.swap_tensors` still swaps t)."""
    return _StorageWeakRef(t.untyped_storage())


def same_storage(t: torch.Tensor, ref) -> bool:
    """Whether t's storage object is the one `ref` (from `storage_ref`) refers to, its memory
    reallocated or not (`UntypedStorage.resize_` keeps the object)."""
    return ref.cdata == _storage_object(t)


def is_mutating(func) -> bool:
    """Whether an aten op writes into one of its arguments (its schema says so)."""
    return func._schema.is_mutable


def written_arguments(func, args: tuple, kwargs: dict):
    """The values of an aten op's arguments that its schema marks as written (each element of a
    list argument), in order."""
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            yield from value if isinstance(value, (list, tuple)) else (value,)


def shard_placements() -> tuple:
    """The DTensor placement types that shard a dim: Shard, and FSDP2's _StridedShard over tensor
    parallelism (private; not a subclass of Shard)."""
    from torch.distributed.tensor import Shard

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover (every supported torch has it; the test says so)
        return (Shard,)
    return (Shard, _StridedShard)


def module_hook_attributes() -> list[str]:
    """The names of nn.Module's hook dictionaries (and their flags) on an instance."""
    return [name for name in vars(nn.Module()) if "hook" in name]


def has_hooks(mod: nn.Module) -> bool:
    """Whether forward or backward hooks are registered on this module itself (global hooks aside)."""
    return bool(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
                or mod._backward_pre_hooks)
