"""FSDP2 float8 all-gather: Float8Linear weights all-gathered as float8 (half the bytes of bf16), each
rank casting its own shard with the weight's global scale before the all-gather.

    model = convert_to_float8_training(model, config=Float8Config(fsdp_float8_all_gather=True))
    for block in model.layers: fully_shard(block)
    fully_shard(model)
    ...
    loss.backward(); optimizer.step()
    precompute_float8_scales(model)     # optional: every weight's amax in one all-reduce

With the switch on, conversion makes each Float8Linear's weight a `Float8AllGatherWeight`: a tensor
subclass that holds the high-precision parameter and behaves as it in every op (the optimizer,
state_dict, checkpoint, init see the high-precision values; ops that make views or copies of it,
as fully_shard's sharding does, keep the subclass), and that implements FSDP2's all-gather
extension (`fsdp_pre_all_gather`, `fsdp_post_all_gather`):

- before the all-gather, each rank quantizes its shard with the scale of the whole weight: the
  global amax is the precomputed one (`precompute_float8_scales`, while it holds: see there) or,
  otherwise, max(|shard|) all-reduced (MAX) over the shard's process group, one small all-reduce
  per weight and all-gather. The float8 data is all-gathered as bytes (uint8, which every backend
  moves), padded to FSDP2's padded shard size where the weight does not divide evenly;
- after the all-gather, the gathered bytes are the float8 weight [out, in], row-major, with that
  scale: a Float8Tensor, which Float8Linear's forward GEMM reads as is and its backward GEMM reads
  transposed (a float8 copy into column-major, no cast);
- state dicts (and so checkpoints, torch.distributed.checkpoint) hold the plain high-precision
  weight, as without the switch; loading one writes into the subclass's values, and loading with
  assign=True (set_model_state_dict into a meta-initialised model) wraps the tensor it assigns.

Quantizing a shard with the global amax gives exactly the bits quantizing the whole weight gives
(the cast is elementwise with one multiplier). So where FSDP2's averaged gradient is the
single-process one (the same batch on every rank, a world size whose average is exact), training
with the float8 all-gather reproduces single-process float8 training bit for bit
(tests/test_fsdp_float8.py, gloo CPU ranks). Under a mixed-precision policy (fp32 parameters,
param_dtype bf16) the shard is cast to float8 from fp32, where gathering in bf16 casts the
bf16-rounded weight: the two differ by that rounding.

Refused with the reason: keep_fp8_weight together with the switch (the gathered weight is already
float8), and a shard_placement_fn other than dim 0. FSDP2 has no all-gather extension for
resharding to a smaller mesh after forward (`reshard_after_forward` as an int) and fails there with
its own error. Tested on gloo CPU ranks: eager, with and without resharding after forward, with
activation checkpointing, under torch.compile of the sharded model and of each layer (fullgraph,
before sharding), a torch.distributed.checkpoint
save and load, and FSDP2 over tensor parallelism on a (dp, tp) mesh (each tp shard gathered with its own scale over dp, as tensor
parallelism alone scales it); with NCCL at world size 1 on one GPU. Not yet run: several GPUs, any
speed measurement: the switch is off by default until measured faster.
"""

import math
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._pytree import tree_map

from ..core.config import Float8Config
from ..core.tensor import Float8Tensor, GemmRole
from ..kernels import quantize_with_amax
from ..torch_internals import is_mutating, shard_placements, written_arguments
from .global_amax import global_amax

_aten = torch.ops.aten
# Ops whose result is the weight itself or a view / copy of it (fully_shard's sharding, padding,
# moving; the optimizer's in-place updates): the result keeps the subclass.
_PRESERVE = frozenset({
    _aten.empty_like.default, _aten.new_zeros.default, _aten.new_empty.default, _aten.slice.Tensor,
    _aten.copy_.default, _aten.view.default, _aten.as_strided.default, _aten._to_copy.default,
    _aten._pin_memory.default, _aten.split.Tensor, _aten.chunk.default, _aten.clone.default,
    _aten.detach.default, _aten.alias.default, _aten.narrow.default})


class Precomputed:
    """The global amax precompute_float8_scales found for one weight, shared by every tensor made
    from the weight (views, and the copies FSDP2 pads its shards with), so all of them read it.
    `amax_for(shard)`: the amax while it holds (precompute_float8_scales says when), else None.

    Writes are seen by the version counter of the tensor the amax was found on (the weight's
    `_tensor`; a host-side int, no sync). Ops on the weight run on `_tensor` in __torch_dispatch__,
    below autograd, where nothing moves it: Float8AllGatherWeight moves it for each op that writes
    the weight, and state_dict() hands out views that share it (what dcp.load writes into)."""

    __slots__ = ("amax", "generation", "tensor", "version")

    def __init__(self):
        self.amax, self.generation, self.tensor, self.version = None, -1, None, -1

    def set(self, amax: torch.Tensor, tensor: torch.Tensor) -> None:
        self.amax, self.generation = amax, GENERATION[0]
        self.tensor, self.version = weakref.ref(tensor), tensor._version

    def forget(self) -> None:
        self.amax = None

    def check(self, tensor: torch.Tensor) -> None:
        """Forget the amax if `tensor` is the one it was found on and was written since: run on
        every op that reads the weight, so that copies made after a write (FSDP2's padding of a
        shard, its CPU offload's copy to the device) do not take the old amax along."""
        if self.amax is not None and self.tensor() is tensor and tensor._version != self.version:
            self.amax = None

    def amax_for(self, shard: torch.Tensor) -> torch.Tensor | None:
        self.check(shard)
        if self.amax is None or self.generation != GENERATION[0]:
            return None
        if self.tensor() is None:
            # gone, replaced by a copy (FSDP2's padded shard, made at lazy init on padded ranks only)
            # that check() saw made: follow the copy, whose later writes the other ranks see too
            self.tensor, self.version = weakref.ref(shard), shard._version
        return self.amax


# Moved on by forget_precomputed_scales (a CUDA graph replay calls it): records of older
# generations do not hold. Optimizer steps and loads drop the records of their own weights only.
GENERATION = [0]
OPTIMIZER_HOOK: list = []


def forget_precomputed_scales() -> None:
    """Drop every precomputed amax: the next all-gathers all-reduce their own (until the next
    precompute_float8_scales). Call it on every rank after writing weights in a way that neither
    their version counters nor an optimizer's hooks see: `.data`, DLPack, custom kernels, a CUDA
    graph replay (CapturedStep calls it after each)."""
    GENERATION[0] += 1


def _forget_stepped(optimizer, args, kwargs) -> None:
    """Before an optimizer step: the records of the weights it updates, and of no others (an
    optimizer that runs on some ranks only, a probe or an eval copy's, leaves the sharded model's
    records alone: the ranks still agree whether a gather all-reduces)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            local = _local(p)
            if isinstance(local, Float8AllGatherWeight):
                local._precomputed.forget()


class Float8AllGatherWeight(torch.Tensor):
    """A high-precision weight (`_tensor`) that FSDP2 all-gathers as float8 (module docstring)."""

    _tensor: torch.Tensor
    _config: Float8Config
    _precomputed: Precomputed

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, config: Float8Config, precomputed: Precomputed | None = None):
        if isinstance(tensor, Float8AllGatherWeight):
            raise TypeError("the tensor is already a Float8AllGatherWeight")
        self = torch.Tensor._make_wrapper_subclass(
            cls, tensor.shape, strides=tensor.stride(), storage_offset=tensor.storage_offset(),
            dtype=tensor.dtype, layout=tensor.layout, device=tensor.device, requires_grad=tensor.requires_grad)
        self._tensor, self._config = tensor, config
        self._precomputed = Precomputed() if precomputed is None else precomputed
        return self

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"Float8AllGatherWeight({self._tensor!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        source, wrappers = None, {}

        def unwrap(t):
            nonlocal source
            if isinstance(t, Float8AllGatherWeight):
                if source is None:
                    source = t
                wrappers[id(t._tensor)] = t
                t._precomputed.check(t._tensor)
                return t._tensor
            return t

        kwargs = kwargs or {}
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        written = [w._tensor for w in written_arguments(func, args, kwargs)
                   if isinstance(w, Float8AllGatherWeight)] if is_mutating(func) else ()
        if written:  # the version counter autograd would have moved, were `_tensor` written above it
            torch.autograd.graph.increment_version(written)

        def rewrap(t):
            if type(t) is not torch.Tensor:
                return t
            if id(t) in wrappers and wrappers[id(t)]._tensor is t:  # an in-place op returns its argument
                return wrappers[id(t)]
            if func in _PRESERVE:  # a view or copy of the weight: the weight's subclass and record
                return Float8AllGatherWeight(t, source._config, source._precomputed)
            return t

        return tree_map(rewrap, out)

    def __tensor_flatten__(self):
        return ["_tensor"], self._config

    @staticmethod
    def __tensor_unflatten__(inner, config, outer_size, outer_stride):
        return Float8AllGatherWeight(inner["_tensor"], config)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        config, shard = self._config, self._tensor
        if tuple(shard.shape[1:]) != tuple(outer_size[1:]):
            raise ValueError(
                f"fsdp_float8_all_gather gathers weights FSDP2 shards along dim 0 (its default placement); this "
                f"one is sharded otherwise ({tuple(shard.shape)} of {tuple(outer_size)}): leave shard_placement_fn "
                "at its default or turn the switch off")
        amax = self._precomputed.amax_for(shard)
        if amax is None:  # none, or dropped since (without precompute_float8_scales after it)
            amax = global_amax(shard, mesh)
        data, _, scale, _ = quantize_with_amax(shard, config.forward_dtype, "row", config.power_of_2_scale, amax=amax)
        data = data.view(torch.uint8)
        rows = math.ceil(outer_size[0] / mesh.size())  # FSDP2's padded shard: dim 0 split in equal chunks
        if data.shape[0] != rows:
            data = torch.cat([data, data.new_zeros(rows - data.shape[0], *data.shape[1:])])
        return (data,), (scale, config.forward_dtype)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (data,), (scale, float8_dtype) = all_gather_outputs, metadata
        data = data.view(float8_dtype)
        if out is not None:  # the same storage, gathered again: only the scale is new (the
            _local(out)._scale = scale  # Float8Tensor itself, or a DTensor's under tensor parallelism)
            return
        return Float8Tensor(data, scale, param_dtype, GemmRole.WEIGHT, self._config), (data,)


def wrap_weight(linear: nn.Module, config: Float8Config) -> None:
    """Make a Float8Linear's weight a Float8AllGatherWeight (a new Parameter, its values and
    requires_grad kept): what the switch does, in conversion, Float8Linear(...) and from_float."""
    weight = linear.weight
    if isinstance(weight, Float8AllGatherWeight) or isinstance(getattr(weight, "_local_tensor", None),
                                                               Float8AllGatherWeight):
        return
    if type(weight.data) is not torch.Tensor:
        raise TypeError(f"fsdp_float8_all_gather needs a plain weight to wrap, got {type(weight.data).__name__} "
                        "(convert before fully_shard and before tensor parallelism)")
    linear.weight = nn.Parameter(Float8AllGatherWeight(weight.data, config), requires_grad=weight.requires_grad)
    if not getattr(linear, _HOOKED, False):  # once per layer, however often its weight is wrapped
        linear._register_state_dict_hook(_plain_weight)
        linear._register_load_state_dict_pre_hook(_before_load, with_module=True)
        setattr(linear, _HOOKED, True)


# Set on a layer whose state-dict hooks `wrap_weight` registered.
_HOOKED = "_f8tensor_all_gather_hooks"


def _before_load(module, state_dict, prefix, local_metadata, *args):
    """Loading writes this layer's weight: its precomputed amax no longer holds (other modules'
    records stay: a load on some ranks only, into an eval copy, leaves the sharded model's alone).
    With assign=True the state dict's tensor replaces the weight: it is wrapped first, so that the
    layer keeps gathering in float8 (load_state_dict's state dict is its own copy)."""
    local = _local(module.weight)
    if isinstance(local, Float8AllGatherWeight):
        local._precomputed.forget()
        key = prefix + "weight"
        if local_metadata.get("assign_to_params_buffers") and key in state_dict:
            state_dict[key] = _wrapped(state_dict[key], local._config)


def _wrapped(value, config: Float8Config):
    """A state dict's weight (a tensor, or a DTensor of one) as a Float8AllGatherWeight."""
    local = _local(value)
    if isinstance(local, Float8AllGatherWeight) or not isinstance(local, torch.Tensor):
        return value
    if type(local.data) is not torch.Tensor:
        raise TypeError(f"fsdp_float8_all_gather: load_state_dict(assign=True) assigns a {type(local.data).__name__} "
                        "weight, which cannot be wrapped to gather in float8; load a plain tensor (or a DTensor of "
                        "one), or load without assign")
    wrapped = Float8AllGatherWeight(local.detach(), config)
    if local is value:
        return wrapped
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(wrapped, value.device_mesh, value.placements, run_check=False, shape=value.shape,
                              stride=value.stride())


def _plain_weight(module, state_dict, prefix, local_metadata):
    """State dicts hold the high-precision weight as a plain tensor (a DTensor of one under FSDP2),
    as without the switch: checkpoints do not depend on f8tensor's subclass. The tensor is a view
    of the weight's own `_tensor`, sharing its version counter: a write into it (dcp.load) drops
    the precomputed amax (Precomputed)."""
    key = prefix + "weight"
    value = state_dict.get(key)
    local = _local(value) if value is not None else None
    if not isinstance(local, Float8AllGatherWeight):
        return
    weight = _local(module.weight)
    inner = (weight if isinstance(weight, Float8AllGatherWeight) else local)._tensor.detach()
    if local is value:
        state_dict[key] = inner
    else:
        from torch.distributed.tensor import DTensor

        state_dict[key] = DTensor.from_local(inner, value.device_mesh, value.placements, run_check=False,
                                             shape=value.shape, stride=value.stride())


def _local(weight):
    return getattr(weight, "_local_tensor", weight)


@torch.no_grad()
def precompute_float8_scales(model: nn.Module) -> int:
    """Every float8 all-gather weight's global amax in one all-reduce for the whole model (one
    stacked amax per process group FSDP2 gathers over), used by the weight's all-gathers while it
    holds; a gather without one all-reduces its own weight's amax. Call it on every rank (it
    all-reduces) after each optimizer.step(), or in the step's post-hook. Returns how many weights
    it computed.

    A weight's amax holds until, for that weight: a torch.optim step of an optimizer holding it
    (dropped before the step); load_state_dict of its layer; an in-place write its version counter
    sees (dcp.load into the tensors state_dict() handed out, an nn.init function, `w.mul_()`: the
    counter is a host-side int, no sync); or forget_precomputed_scales(), for writes neither sees
    (`.data`, DLPack, custom kernels, CUDA graph replays). A rank whose amax was dropped
    all-reduces before its gather, so these must happen on every rank alike, as training, loading
    and checkpointing do; other models' and optimizers' steps and loads (a probe optimizer, an eval
    copy on rank 0) drop nothing here. state_dict() drops nothing either (one rank may call it
    alone): a write into what it handed out is seen by the version counter."""
    weights = [m.weight for m in model.modules() if isinstance(_local(getattr(m, "weight", None)),
                                                                 Float8AllGatherWeight)]
    if not weights:
        return 0
    if not OPTIMIZER_HOOK:
        # before each step (its weights change): a precompute in the step's post-hooks, as torchtitan
        # registers torchao's, then holds
        OPTIMIZER_HOOK.append(register_optimizer_step_pre_hook(_forget_stepped))
    groups: dict = {}
    for w in weights:
        groups.setdefault(_shard_group(w), []).append(w)
    for group, members in groups.items():
        # max |w| of every weight in one multi-tensor kernel (exact: a max; an empty shard's is 0,
        # which the infinity norm has no identity for), then one all-reduce
        locals_ = [_local(w)._tensor for w in members]
        full = [t for t in locals_ if t.numel()]
        norms = iter(torch._foreach_norm(full, float("inf")) if full else ())
        amaxes = torch.stack([next(norms).float() if t.numel() else t.new_zeros((), dtype=torch.float32)
                              for t in locals_])
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=group)
        for w, amax in zip(members, amaxes):
            _local(w)._precomputed.set(amax, _local(w)._tensor)
    return len(weights)


def _shard_group(weight):
    """The process group FSDP2 gathers this weight over: the mesh dim of its first Shard placement
    (FSDP2's; under HSDP the first dim replicates, under FSDP2 over tensor parallelism the tp shard
    comes after), or None for a weight that is not a DTensor."""
    mesh = getattr(weight, "device_mesh", None)
    if mesh is None:
        return None
    dims = [i for i, p in enumerate(weight.placements) if isinstance(p, shard_placements())]
    if not dims:
        return None
    return mesh.get_group(dims[0]) if mesh.ndim > 1 else mesh.get_group()
