"""Float8Linear under tensor parallelism: DTensor weights, as ColwiseParallel and RowwiseParallel
(torch.distributed.tensor.parallel) leave them.

Each rank runs the layer's three float8 GEMMs on its local shards (the same autograd function as
without parallelism); the DTensor placements of the output and of x's gradient follow from how the
weight is sharded:

    weight          x                  output            x's gradient
    Shard(0)        Replicate          Shard(-1)         Partial      ColwiseParallel
    Shard(1)        Shard(-1)          Partial           Shard(-1)    RowwiseParallel
    Replicate       Replicate / Shard(d < -1): as x                  a replicated layer

A Partial output (RowwiseParallel) gets the replicated bias in the first rank's partial sum only
(in its GEMM's epilogue; adding it on every rank would count it once per rank), so that one rank
of a mesh computes exactly what the layer computes on one device. The style's output layout then
decides the collective (all-reduce, or reduce-scatter under sequence parallelism).

Scaling is tensorwise per local shard: each rank quantizes its own shard of the weight (and, under
RowwiseParallel, of x and, under ColwiseParallel, of grad_output) with that shard's own amax. No
collective is needed for the scales, and a shard's scale is never coarser than one scale for the
whole tensor would be; results differ from one device's by float8 rounding, and are as close to
bf16's (tests/test_tensor_parallel.py).

Not covered: a weight on a mesh of more than one dimension (an error; FSDP2 + TP on a 2-D mesh was
not tried), keep_fp8_weight (Float8Linear refuses it for DTensor weights), and the cast-once
sharing of an input between layers (q/k/v, w1/w3): each layer reads its own local view of x and
casts it again.
"""

import sys

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    """Without importing DTensor (0.9 s): a DTensor exists only once its module was imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _last_dim_shard(p, ndim: int) -> bool:
    from torch.distributed.tensor import Shard

    return isinstance(p, Shard) and p.dim in (-1, ndim - 1)


def _placements(x, weight):
    """(output placement, placement of x's gradient) for a 1-D mesh, or a NotImplementedError."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    xp, wp = x.placements[0], weight.placements[0]
    if isinstance(wp, Shard) and wp.dim in (0, -2) and isinstance(xp, Replicate):
        return Shard(x.ndim - 1), Partial()
    if isinstance(wp, Shard) and wp.dim in (1, -1) and _last_dim_shard(xp, x.ndim):
        return Partial(), Shard(x.ndim - 1)
    if isinstance(wp, Replicate) and not _last_dim_shard(xp, x.ndim) and isinstance(xp, (Replicate, Shard)):
        return xp, xp
    raise NotImplementedError(
        f"Float8Linear under tensor parallelism supports a weight sharded Shard(0) with a "
        f"replicated input (ColwiseParallel), Shard(1) with an input sharded on its last dimension "
        f"(RowwiseParallel), or a replicated weight with an input not sharded on its last "
        f"dimension; got weight {wp} and input {xp}. Redistribute the input (the parallel style's "
        f"input_layouts / desired_input_layouts), or keep this layer in high precision")


def forward(fn, x, weight, bias, config, grad_enabled: bool):
    """fn (Float8Linear's autograd function) on the local shards; the output as a DTensor."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    if not is_dtensor(x):
        raise TypeError(
            f"Float8Linear: the weight is a DTensor (tensor parallelism) but the input is a "
            f"{type(x).__name__}; pass a DTensor on the weight's mesh (parallelize_module's "
            f"ColwiseParallel / RowwiseParallel styles convert the input for you)")
    mesh = weight.device_mesh
    if mesh.ndim != 1 or x.device_mesh != mesh:
        raise NotImplementedError(
            f"Float8Linear under tensor parallelism needs the weight and the input on one 1-D mesh; "
            f"got a {mesh.ndim}-D weight mesh{'' if x.device_mesh == mesh else ' and another mesh for the input'}")
    out_placement, x_grad_placement = _placements(x, weight)
    x_local = x.to_local(grad_placements=[x_grad_placement])
    w_local = weight.to_local()
    local_bias = None
    if bias is not None and isinstance(out_placement, Partial):
        if bias.placements[0] != Replicate():
            raise NotImplementedError(
                f"Float8Linear under tensor parallelism: the output is a partial sum, the bias is "
                f"placed {bias.placements[0]}; it must be Replicate()")
        # The bias joins one rank's partial sum, in that GEMM's epilogue; the other ranks add zeros,
        # so that every rank has a gradient for it (a partial one: only the first rank's counts).
        local = bias.to_local(grad_placements=[Partial()])
        local_bias = local if mesh.get_local_rank() == 0 else local * 0
    elif bias is not None:
        # The bias is added to the local output in the GEMM: sharded like the output's features.
        features_sharded = isinstance(out_placement, Shard) and out_placement.dim == x.ndim - 1
        want = Shard(0) if features_sharded else Replicate()
        if bias.placements[0] != want:
            raise NotImplementedError(
                f"Float8Linear under tensor parallelism: the bias is placed {bias.placements[0]}, "
                f"the output {out_placement}; the bias must be {want}")
        local_bias = bias.to_local()
    out = fn(x_local, w_local, local_bias, config, grad_enabled)
    shape = (*x.shape[:-1], weight.shape[0])  # global shapes: shards may be uneven
    return DTensor.from_local(out, mesh, [out_placement], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())
