"""Float8 sequence-parallel all-gather: under sequence parallelism, the activation a block's column-
parallel layers read (q/k/v, w1/w3) is cast to float8 before the all-gather, not after it.

    from torch.distributed.tensor import Replicate, Shard
    from f8tensor.distributed.sequence_parallel import Float8PrepareModuleInput

    parallelize_module(block, tp_mesh, {
        "attention_norm": SequenceParallel(),
        "attention": Float8PrepareModuleInput(input_layouts=(Shard(1), None),
                                              desired_input_layouts=(Replicate(), None)),
        "attention.wq": ColwiseParallel(), ...                  # as without float8 gathering
    })

`Float8PrepareModuleInput` is PyTorch's `PrepareModuleInput` (same arguments, plus `config`: the
config the model was converted with), except that an input it redistributes from Shard(d) to
Replicate() is gathered in float8:

1. each rank takes max(|x|) of its own shard; one all-reduce (MAX) over the mesh gives the amax of
   the whole activation, so every rank casts with the one scale a single device would use;
2. each rank casts its shard to float8 (config.forward_dtype) with that scale;
3. DTensor redistributes the float8 shards (as bytes: uint8, which every backend moves) to
   Replicate(): the all-gather moves one byte per element instead of two;
4. the module receives a replicated DTensor whose local tensor is a Float8Tensor (row-major, that
   scale). Float8Linear reads it as its input without a cast, and the layers that read it share it;
   their backward GEMMs read it column-major (a float8 transpose, made once and shared by them).

In backward the gradient of the gathered activation (partial sums, one per rank, from the
column-parallel layers) is reduce-scattered back to Shard(d) in high precision, as PyTorch's
PrepareModuleInput does: float8 is only the forward all-gather's.

Because the cast is elementwise with the global scale, the gathered float8 activation is bit for bit
the cast a layer would make of the activation gathered in bf16; a model gathering in float8 trains
exactly as one gathering in bf16 (tests/test_sequence_parallel.py, gloo CPU ranks).

Only Float8Linear layers may read the gathered activation: anything else in the module that reads it
(a residual, a norm) would see a Float8Tensor, whose op table runs other ops on the dequantized
values with a warning. The module's code must hand the input straight to float8 layers, as
torchtitan's and Hugging Face's attention and feed-forward modules do.
"""

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput

from ..core.config import Float8Config
from ..core.linear import Float8Linear
from ..core.tensor import Float8Tensor, GemmRole
from ..kernels import quantize_with_amax
from .global_amax import global_amax


class _Float8Gather(torch.autograd.Function):
    """A Shard(d) DTensor -> a Replicate() DTensor of a Float8Tensor (forward); the gradient
    reduce-scattered (or, replicated, split) back to Shard(d) (backward)."""

    @staticmethod
    def forward(ctx, x: DTensor, config: Float8Config):
        mesh, placement = x.device_mesh, x.placements[0]
        local = x.to_local()
        amax = global_amax(local, mesh)
        data, _, scale, _ = quantize_with_amax(local.reshape(-1, local.shape[-1]), config.forward_dtype, "row",
                                               config.power_of_2_scale, amax=amax)
        shards = DTensor.from_local(data.view(torch.uint8).view(local.shape), mesh, [placement], run_check=False,
                                    shape=x.shape, stride=x.stride())
        gathered = shards.redistribute(mesh, [Replicate()]).to_local().view(config.forward_dtype)
        ctx.mesh, ctx.placement = mesh, placement
        f8 = Float8Tensor(gathered, scale, x.dtype, GemmRole.INPUT, config)
        return DTensor.from_local(f8, mesh, [Replicate()], run_check=False, shape=x.shape,
                                  stride=gathered.stride())

    @staticmethod
    def backward(ctx, grad):
        return grad.redistribute(ctx.mesh, [ctx.placement]), None


def float8_all_gather(x: DTensor, config: Float8Config | None = None) -> DTensor:
    """x (a DTensor Shard(d) on a 1-D mesh) gathered to Replicate() in float8: see the module's
    docstring. The result's local tensor is a Float8Tensor, for Float8Linear layers to read."""
    config = config or Float8Config()
    if not isinstance(x, DTensor):
        raise TypeError(f"float8_all_gather gathers a DTensor; got a {type(x).__name__}")
    if x.device_mesh.ndim != 1 or not isinstance(x.placements[0], Shard):
        raise ValueError(f"float8_all_gather gathers a DTensor sharded on a 1-D mesh; got placements "
                         f"{x.placements} on a {x.device_mesh.ndim}-D mesh")
    if not x.dtype.is_floating_point or x.dtype.itemsize == 1:
        raise TypeError(f"float8_all_gather casts a high-precision floating-point activation; got {x.dtype}")
    if x.placements[0].dim in (-1, x.ndim - 1):
        raise ValueError("float8_all_gather: the activation is sharded along its features (last dimension); "
                         "float8 gathering is for sequence (token) sharding, Shard(1) as SequenceParallel leaves it")
    return _Float8Gather.apply(x, config)


class Float8PrepareModuleInput(PrepareModuleInput):
    """PyTorch's PrepareModuleInput, gathering in float8 each input it redistributes from Shard(d) to
    Replicate() (positional and keyword alike); other inputs are prepared as PrepareModuleInput
    prepares them. `config`: the float8 format and scale rounding of the cast, which must be those
    of the Float8Linear layers reading the input: parallelize_module raises TypeError where a
    Float8Linear in the module has another forward_dtype or power_of_2_scale (checked when the
    style is applied; the layers check the format again at each forward)."""

    def __init__(self, *, input_layouts=None, desired_input_layouts=None, input_kwarg_layouts=None,
                 desired_input_kwarg_layouts=None, use_local_output: bool = False,
                 config: Float8Config | None = None):
        super().__init__(input_layouts=input_layouts, desired_input_layouts=desired_input_layouts,
                         input_kwarg_layouts=input_kwarg_layouts,
                         desired_input_kwarg_layouts=desired_input_kwarg_layouts,
                         use_local_output=use_local_output)
        self.config = config or Float8Config()

    def _prepare_input_arg(self, input, mesh, input_layout, desired_layout):
        if (isinstance(input_layout, Shard) and isinstance(desired_layout, Replicate)
                and isinstance(input, torch.Tensor) and input.is_floating_point()):
            x = input if isinstance(input, DTensor) else DTensor.from_local(input, mesh, (input_layout,),
                                                                           run_check=False)
            gathered = float8_all_gather(x, self.config)
            return gathered.to_local() if self.use_local_output else gathered
        return super()._prepare_input_arg(input, mesh, input_layout, desired_layout)

    def _apply(self, module, device_mesh):
        own = (self.config.forward_dtype, self.config.power_of_2_scale)
        for name, layer in module.named_modules():
            if isinstance(layer, Float8Linear) and (layer.config.forward_dtype, layer.config.power_of_2_scale) != own:
                raise TypeError(
                    f"Float8PrepareModuleInput casts with forward_dtype={own[0]}, power_of_2_scale={own[1]}; the "
                    f"Float8Linear {name or '(the module itself)'} it feeds casts with forward_dtype="
                    f"{layer.config.forward_dtype}, power_of_2_scale={layer.config.power_of_2_scale}: give it the "
                    "layers' config, Float8PrepareModuleInput(..., config=<the config the model was converted with>)")
        return super()._apply(module, device_mesh)
