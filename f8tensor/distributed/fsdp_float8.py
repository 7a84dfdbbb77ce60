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
  global amax is the precomputed one (`precompute_float8_scales`, valid until the weight changes)
  or, otherwise, max(|shard|) all-reduced (MAX) over the shard's process group, one small
  all-reduce per weight and all-gather. The float8 data is all-gathered as bytes (uint8, which
  every backend moves), padded to FSDP2's padded shard size where the weight does not divide evenly;
- state dicts (and so checkpoints, torch.distributed.checkpoint) hold the plain high-precision
  weight, as without the switch; loading one writes into the subclass's values;
- after the all-gather, the gathered bytes are the float8 weight [out, in], row-major, with that scale: a
  Float8Tensor, which Float8Linear's forward GEMM reads as is and its backward GEMM reads
  transposed (a float8 copy into column-major, no cast).

Quantizing a shard with the global amax gives exactly the bits quantizing the whole weight gives
(the cast is elementwise with one multiplier), so training with the float8 all-gather reproduces
single-process float8 training bit for bit (tests/test_fsdp_float8.py, gloo CPU ranks).

Not supported (clear errors): keep_fp8_weight together with the switch (the gathered weight is
already float8), and FSDP2's resharding to a smaller mesh after forward (`reshard_after_forward`
as an int: FSDP2 has no all-gather extension there). Tested on gloo CPU ranks: eager, with and
without resharding after forward, with activation checkpointing, and under torch.compile of the
sharded model, and FSDP2 over tensor parallelism on a (dp, tp) mesh (each tp shard gathered with
its own scale over dp, as tensor parallelism alone scales it). Not yet run: NCCL, any GPU
measurement: the switch is off by default until measured faster.
"""

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

from ..core.config import Float8Config
from ..core.tensor import Float8Tensor, GemmRole
from ..kernels import amax_ref, quantize_with_amax
from ..torch_internals import is_mutating

_aten = torch.ops.aten
# Ops whose result is the weight itself or a view / copy of it (fully_shard's sharding, padding,
# moving; the optimizer's in-place updates): the result keeps the subclass.
_PRESERVE = frozenset({
    _aten.empty_like.default, _aten.new_zeros.default, _aten.new_empty.default, _aten.slice.Tensor,
    _aten.copy_.default, _aten.view.default, _aten.as_strided.default, _aten._to_copy.default,
    _aten._pin_memory.default, _aten.split.Tensor, _aten.chunk.default, _aten.clone.default,
    _aten.detach.default, _aten.alias.default, _aten.narrow.default})


class Float8AllGatherWeight(torch.Tensor):
    """A high-precision weight (`_tensor`) that FSDP2 all-gathers as float8 (module docstring)."""

    _tensor: torch.Tensor
    _config: Float8Config
    _precomputed: torch.Tensor | None  # the global amax, until an in-place op writes the weight

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, config: Float8Config):
        if isinstance(tensor, Float8AllGatherWeight):
            raise TypeError("the tensor is already a Float8AllGatherWeight")
        self = torch.Tensor._make_wrapper_subclass(
            cls, tensor.shape, strides=tensor.stride(), storage_offset=tensor.storage_offset(),
            dtype=tensor.dtype, layout=tensor.layout, device=tensor.device, requires_grad=tensor.requires_grad)
        self._tensor, self._config, self._precomputed = tensor, config, None
        return self

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"Float8AllGatherWeight({self._tensor!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        config = None
        mutating = is_mutating(func)

        def unwrap(t):
            nonlocal config
            if isinstance(t, Float8AllGatherWeight):
                config = t._config
                if mutating:  # an optimizer step, a load: the precomputed amax no longer holds
                    t._precomputed = None
                return t._tensor
            return t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if func not in _PRESERVE:
            return out
        return tree_map(lambda t: Float8AllGatherWeight(t, config) if type(t) is torch.Tensor else t, out)

    def __tensor_flatten__(self):
        return ["_tensor"], self._config

    @staticmethod
    def __tensor_unflatten__(inner, config, outer_size, outer_stride):
        return Float8AllGatherWeight(inner["_tensor"], config)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        config, shard = self._config, self._tensor
        amax = self._precomputed
        if amax is None:  # none, or the weight was written since (a step without precompute_float8_scales)
            amax = amax_ref(shard).to(torch.float32)
            if mesh.size() > 1:
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
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
    stacked amax per process group: FSDP2's, the first dim of a (dp, tp) mesh), used by the all-gathers until an in-place op writes the weight
    (the next optimizer step; a weight written since all-reduces its own amax again): call it after
    each optimizer.step(). Returns how many weights it computed. Without it each all-gather
    all-reduces its own weight's amax."""
    weights = [m.weight for m in model.modules() if isinstance(_local(getattr(m, "weight", None)),
                                                                 Float8AllGatherWeight)]
    if not weights:
        return 0
    groups: dict = {}
    for w in weights:
        mesh = getattr(w, "device_mesh", None)
        # FSDP2's shard dim: the mesh's only dim, or its first (dp) on a (dp, tp) mesh of FSDP2 over
        # tensor parallelism, where each tp shard keeps a scale of its own as tensor parallelism does
        group = None if mesh is None else mesh.get_group(0) if mesh.ndim > 1 else mesh.get_group()
        groups.setdefault(group, []).append(w)
    for group, members in groups.items():
        amaxes = torch.stack([amax_ref(_local(w)._tensor).to(torch.float32) for w in members])
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=group)
        for w, amax in zip(members, amaxes):
            _local(w)._precomputed = amax
    return len(weights)
