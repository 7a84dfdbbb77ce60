"""Float8Linear under tensor parallelism: DTensor weights, as ColwiseParallel and RowwiseParallel
(torch.distributed.tensor.parallel) leave them.

Each rank runs the layer's three float8 GEMMs on its local shards (the same autograd function as
without parallelism); the DTensor placements of the output and of x's gradient follow from how the
weight is sharded:

    weight      x                 output      x's gradient   weight's gradient
    Shard(0)    Replicate         Shard(-1)   Partial        Shard(0)     ColwiseParallel
    Shard(1)    Shard(-1)         Partial     Shard(-1)      Shard(1)     RowwiseParallel
    Replicate   Replicate         Replicate   Replicate      Replicate    a replicated layer
    Replicate   Shard(d), d < -1  Shard(d)    Shard(d)       Partial      tokens sharded

A Partial output (RowwiseParallel) gets the replicated bias in the first rank's partial sum only
(in its GEMM's epilogue; adding it on every rank would count it once per rank), so that one rank
of a mesh computes exactly what the layer computes on one device; every rank still computes the
bias's whole gradient (replicated, as nn.Linear's under DTensor). The style's output layout then
decides the collective (all-reduce, or reduce-scatter under sequence parallelism).

Scaling is per local shard, in the layer's recipe (one scale per shard under tensorwise; per row,
column or tile of the shard under rowwise and blockwise): each rank quantizes its own shard of the
weight (and, under RowwiseParallel, of x and, under ColwiseParallel, of grad_output) with that
shard's own amaxes. No
collective is needed for the scales, and a shard's scale is never coarser than one scale for the
whole tensor would be; results differ from one device's by float8 rounding, and are as close to
bf16's (tests/test_tensor_parallel.py).

Not covered: a weight on a mesh of more than one dimension (an error; FSDP2 + TP on a 2-D mesh
hands the layer its weight on the 1-D TP mesh: tests/test_tensor_parallel.py), shards whose sides
are not multiples of 16 (an error, but under the blockwise recipe, whose GEMMs are padded), and
keep_fp8_weight (Float8Linear
refuses it for DTensor weights). An input shared by several layers (q/k/v, w1/w3) is still cast
once: each layer's local view of it shares one base, which keys the cast (tensor_cache.py).
"""

import torch


def _last_dim_shard(p, ndim: int) -> bool:
    from torch.distributed.tensor import Shard

    return isinstance(p, Shard) and p.dim in (-1, ndim - 1)


def _placements(x, weight):
    """(output placement, placement of x's gradient, placement of the weight's and bias's
    gradients) for a 1-D mesh, or a NotImplementedError."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    xp, wp = x.placements[0], weight.placements[0]
    if isinstance(wp, Shard) and wp.dim in (0, -2) and isinstance(xp, Replicate):
        return Shard(x.ndim - 1), Partial(), wp
    if isinstance(wp, Shard) and wp.dim in (1, -1) and _last_dim_shard(xp, x.ndim):
        return Partial(), Shard(x.ndim - 1), wp
    if isinstance(wp, Replicate) and isinstance(xp, Replicate):
        return xp, xp, wp
    if isinstance(wp, Replicate) and isinstance(xp, Shard) and not _last_dim_shard(xp, x.ndim):
        # Each rank's tokens give part of the weight's gradient: the parts sum.
        return xp, xp, Partial()
    raise NotImplementedError(
        f"Float8Linear under tensor parallelism supports a weight sharded Shard(0) with a "
        f"replicated input (ColwiseParallel), Shard(1) with an input sharded on its last dimension "
        f"(RowwiseParallel), or a replicated weight with an input not sharded on its last "
        f"dimension; got weight {wp} and input {xp}. Redistribute the input (the parallel style's "
        f"input_layouts / desired_input_layouts), or keep this layer in high precision")


class _ZerosWithGradient(torch.autograd.Function):
    """Zeros in forward, the incoming gradient unchanged in backward: the row-parallel bias on the
    ranks that must not add it, whose gradient is still the bias's whole gradient."""

    @staticmethod
    def forward(ctx, b):
        return torch.zeros_like(b)

    @staticmethod
    def backward(ctx, g):
        return g


def _check_local_sizes(w_local, weight, config):
    n, k = w_local.shape
    if (n % 16 or k % 16) and config.scaling_granularity != "blockwise":  # blockwise GEMMs are padded
        raise ValueError(
            f"Float8Linear under tensor parallelism: this rank's weight shard is [{n}, {k}] (of "
            f"{list(weight.shape)}, placed {weight.placements[0]}); float8 GEMMs need both sides "
            f"of every rank's shard to be multiples of 16. Choose a mesh size that divides the "
            f"features into multiples of 16, use the blockwise recipe (padded GEMMs), or keep this layer "
            f"in high precision")


def dtensor_linear(fn, x, weight, bias, config, grad_enabled: bool):
    """fn (Float8Linear's autograd function) on the local shards; the output as a DTensor."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    if not isinstance(x, DTensor):
        raise TypeError(
            f"Float8Linear: the weight is a DTensor (tensor parallelism) but the input is a "
            f"{type(x).__name__}; pass a DTensor on the weight's mesh (parallelize_module's "
            f"ColwiseParallel / RowwiseParallel styles convert the input for you)")
    if bias is not None and not isinstance(bias, DTensor):
        raise TypeError(
            f"Float8Linear: the weight is a DTensor but the bias is a {type(bias).__name__}; "
            f"distribute both (parallelize_module's styles do)")
    mesh = weight.device_mesh
    if mesh.ndim != 1 or x.device_mesh != mesh:
        raise NotImplementedError(
            f"Float8Linear under tensor parallelism needs the weight and the input on one 1-D mesh; "
            f"got a {mesh.ndim}-D weight mesh"
            f"{'' if x.device_mesh == mesh else ' and another mesh for the input'}. Parallelize "
            f"the layer over one mesh dimension (mesh['tp']); FSDP2 over another dimension hands "
            f"the layer its weight on the remaining 1-D mesh")
    out_placement, x_grad_placement, param_grad_placement = _placements(x, weight)
    x_local = x.to_local(grad_placements=[x_grad_placement])
    w_local = weight.to_local(grad_placements=[param_grad_placement])
    _check_local_sizes(w_local, weight, config)
    local_bias = None
    if bias is not None and isinstance(out_placement, Partial):
        if bias.placements[0] != Replicate():
            raise NotImplementedError(
                f"Float8Linear under tensor parallelism: the output is a partial sum, the bias is "
                f"placed {bias.placements[0]}; it must be Replicate()")
        # The bias joins the first rank's partial sum, in its GEMM's epilogue; the others add zeros.
        # The gradient reaching a partial output is the whole one on every rank (DTensor keeps the
        # gradients of partial values replicated), so every rank computes the bias's whole
        # gradient, replicated like the bias: no collective for it.
        local_bias = bias.to_local()
        if mesh.get_local_rank() != 0:
            local_bias = _ZerosWithGradient.apply(local_bias)
    elif bias is not None:
        # The bias is added to the local output in the GEMM: sharded like the output's features.
        features_sharded = isinstance(out_placement, Shard) and out_placement.dim == x.ndim - 1
        want = Shard(0) if features_sharded else Replicate()
        if bias.placements[0] != want:
            raise NotImplementedError(
                f"Float8Linear under tensor parallelism: the bias is placed {bias.placements[0]}, "
                f"the output {out_placement}; the bias must be {want}")
        local_bias = bias.to_local(grad_placements=[param_grad_placement])
    out = fn(x_local, w_local, local_bias, config, grad_enabled)
    shape = (*x.shape[:-1], weight.shape[0])
    return DTensor.from_local(out, mesh, [out_placement], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())
