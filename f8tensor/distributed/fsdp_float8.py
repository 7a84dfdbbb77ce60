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
  global amax is the precomputed one (`precompute_float8_scales`: valid until the next optimizer
  step or load_state_dict, events every rank sees alike) or, otherwise,
  max(|shard|) all-reduced (MAX) over the shard's process group, one small all-reduce per weight
  and all-gather. The float8 data is all-gathered as bytes (uint8, which every backend moves),
  padded to FSDP2's padded shard size where the weight does not divide evenly;
- after the all-gather, the gathered bytes are the float8 weight [out, in], row-major, with that
  scale: a Float8Tensor, which Float8Linear's forward GEMM reads as is and its backward GEMM reads
  transposed (a float8 copy into column-major, no cast);
- state dicts (and so checkpoints, torch.distributed.checkpoint) hold the plain high-precision
  weight, as without the switch; loading one writes into the subclass's values.

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

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._pytree import tree_map

from ..core.config import Float8Config
from ..core.tensor import Float8Tensor, GemmRole
from ..kernels import quantize_with_amax
from ..torch_internals import shard_placements
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
    """The global amax precompute_float8_scales found for one weight, and the generation it was
    found in. Shared by every tensor made from the weight (views, and the copies FSDP2 pads its
    shards with), so all of them read it; valid while GENERATION has not moved on."""

    __slots__ = ("amax", "generation")

    def __init__(self):
        self.amax, self.generation = None, -1


# Moves on at every torch.optim step and load_state_dict of a layer with the switch: events every
# rank sees alike, so the ranks agree whether a precomputed amax is still valid, and so whether an
# all-gather all-reduces first (state.py lists it and the hook).
GENERATION = [0]
OPTIMIZER_HOOK: list = []


def _next_generation(*args, **kwargs) -> None:
    GENERATION[0] += 1


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
                return t._tensor
            return t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))

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
        record = self._precomputed
        amax = record.amax if record.generation == GENERATION[0] else None
        if amax is None:  # none, or a step or load since (without precompute_float8_scales after it)
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
    """Make a Float8Linear's weight a Float8AllGatherWeight (conversion does this with the switch on)."""
    weight = linear.weight
    if isinstance(weight, Float8AllGatherWeight) or isinstance(getattr(weight, "_local_tensor", None),
                                                               Float8AllGatherWeight):
        return
    if type(weight.data) is not torch.Tensor:
        raise TypeError(f"fsdp_float8_all_gather needs a plain weight to wrap, got {type(weight.data).__name__} "
                        "(convert before fully_shard and before tensor parallelism)")
    linear.weight = nn.Parameter(Float8AllGatherWeight(weight.data, config), requires_grad=weight.requires_grad)
    linear._register_state_dict_hook(_plain_weight)
    linear._register_load_state_dict_pre_hook(_forget_precomputed, with_module=True)


def _forget_precomputed(module, *args):
    """Loading writes the weight: precomputed amaxes no longer hold (on every rank alike)."""
    _next_generation()


def _plain_weight(module, state_dict, prefix, local_metadata):
    """State dicts hold the high-precision weight as a plain tensor (a DTensor of one under FSDP2),
    as without the switch: checkpoints do not depend on f8tensor's subclass."""
    key = prefix + "weight"
    value = state_dict.get(key)
    local = _local(value) if value is not None else None
    if not isinstance(local, Float8AllGatherWeight):
        return
    if local is value:
        state_dict[key] = local._tensor
    else:
        from torch.distributed.tensor import DTensor

        state_dict[key] = DTensor.from_local(local._tensor, value.device_mesh, value.placements, run_check=False,
                                             shape=value.shape, stride=value.stride())


def _local(weight):
    return getattr(weight, "_local_tensor", weight)


@torch.no_grad()
def precompute_float8_scales(model: nn.Module) -> int:
    """Every float8 all-gather weight's global amax in one all-reduce for the whole model (one
    stacked amax per process group FSDP2 gathers over), used by the all-gathers until the next
    torch.optim step or load_state_dict; after those each all-gather all-reduces its own weight's
    amax again. Call it after each optimizer.step(), on every rank (it all-reduces). Writes into a
    weight outside an optimizer step or load_state_dict (`.data`, init, a custom kernel) are not
    seen: call it again after them, or the next gather casts with the old amax. Returns how many
    weights it computed. Without it each all-gather all-reduces its own weight's amax."""
    weights = [m.weight for m in model.modules() if isinstance(_local(getattr(m, "weight", None)),
                                                                 Float8AllGatherWeight)]
    if not weights:
        return 0
    if not OPTIMIZER_HOOK:
        # before each step (its weights change): a precompute in the step's post-hooks, as torchtitan
        # registers torchao's, is then of the new generation
        OPTIMIZER_HOOK.append(register_optimizer_step_pre_hook(_next_generation))
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
            record = _local(w)._precomputed
            record.amax, record.generation = amax, GENERATION[0]
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
