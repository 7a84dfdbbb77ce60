"""The amax of a tensor sharded over a 1-D device mesh: every float8 all-gather casts each shard with
the scale of the whole tensor, so that the gathered float8 data has the bits one device would cast."""

import torch
import torch.distributed as dist

from ..kernels import amax_of_bits


def global_amax(local: torch.Tensor, mesh) -> torch.Tensor:
    """max |x| over every rank's shard, as a 0-d fp32 tensor (a NaN anywhere gives NaN): this rank's
    from the bits (as the compiled cast takes it: a float max that inductor fused into the kernel
    producing x would be taken before x's rounding to bf16), then one all-reduce (MAX) over the mesh."""
    amax = amax_of_bits(local)
    if mesh.size() > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
    return amax
