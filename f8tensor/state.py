"""Every cache and registry f8tensor keeps between calls, and `reset_state()`, which clears them.

| store | where | holds | reset_state |
|---|---|---|---|
| op table | core/tensor.OPS | aten op -> handler, filled once at import by core/ops.py | kept (static) |
| fallback warnings | core/tensor.warned_fallback_ops | ops outside the table already warned about | cleared |
| shared input | core/tensor_cache.shared_input | the last layer input's float8 copies, per thread | cleared |
| produced amax | core/tensor_cache.produced_amax | amax records the fused ops measured, per thread | cleared |
| kept weights | core/weight_cache.ENTRIES | float8 copies of weights (keep_fp8_weight), each on its weight, held here weakly | emptied |
| optimizer hook | core/weight_cache.OPTIMIZER_HOOK | the hook that drops kept weights at each step | kept (registered once) |
| precomputed-amax generation | distributed/fsdp_float8.GENERATION | a counter that forget_precomputed_scales moves on (after each CUDA graph replay): precomputed amaxes of older generations are not used; steps and loads drop only their own weights' amaxes | kept (the amaxes still valid stay valid) |
| all-gather optimizer hook | distributed/fsdp_float8.OPTIMIZER_HOOK | the hook that drops, before a step, the amaxes of the weights that optimizer holds | kept (registered once) |
| saved-tensor names | torch_internals.SAVED_NAMES | autograd node type -> its _saved_* attribute names | cleared |
| fused classes | fusion/fused_class.FUSED_CLASSES | (class, mixin) -> the fused subclass | cleared (fused modules keep theirs) |
| swapped classes | core/class_swap.SWAPPED_CLASSES | (f8tensor's layer, class) -> the converted subclass | cleared (converted modules keep theirs) |
| activation proofs | fusion/gate_proof.ACTIVATION_PROOFS | activation classes proven (or not) to be silu or GELU's tanh form | cleared (fused modules keep theirs) |
| rotary proofs | fusion/rope_proof.PROOFS | functions proven (or not) to be RoPE; a complex-form proof holds its per-signature plans | cleared |
| complex RoPE warnings | fusion/rope_complex.warned | (function, reason) pairs already warned about | cleared |
| Python warning | fusion/python_versions.warned | whether the unsupported-Python warning was given | cleared |
| launch plans | kernels/quantize.PLANS | recorded quantization launches | cleared |
| relaunch cases | kernels/launch.RELAUNCHES | recorded launches of the fused ops' kernels | cleared |
| Triton warning | kernels/launch.warned | whether the unchecked-Triton warning was given | cleared |
| device capability | kernels.device_capability | per-device functools cache | cleared |
| SM counts | kernels/quantize.num_sms | per-device functools cache | cleared |

Not a store: each weight's amax from its latest forward cast (read by a checkpoint's
recomputation) lives on the weight tensor itself (core/weight_amax.py), freed with it and used only
while the weight is unchanged; `reset_state()` does not reach it.

Clearing costs only time: the next call proves, records or casts again. A fused module keeps its
class and proof (clearing does not unfuse a model), and the kept weights are dropped as
`forget_fp8_weights()` drops them.
"""

from dataclasses import dataclass
from typing import Callable

from . import kernels, torch_internals
from .core import class_swap, tensor, tensor_cache, weight_cache
from .distributed import fsdp_float8
from .fusion import fused_class, gate_proof, python_versions, rope_complex, rope_proof

try:
    from .kernels import launch, quantize
except ImportError:  # no triton: no Triton launches to remember
    launch = quantize = None


@dataclass(frozen=True)
class Store:
    """One cache or registry: its name, the objects that hold it, and how to clear it (None: static)."""
    name: str
    objects: tuple
    clear: Callable[[], None] | None


def _clear_flag(flag: list) -> Callable[[], None]:
    def clear():
        flag[0] = False
    return clear


STORES = (
    Store("op table", (tensor.OPS,), None),
    Store("fallback warnings", (tensor.warned_fallback_ops,), tensor.warned_fallback_ops.clear),
    Store("shared input", (tensor_cache.shared_input,), tensor_cache.shared_input.clear),
    Store("produced amax", (tensor_cache.produced_amax,), tensor_cache.produced_amax.clear),
    Store("kept weights", (weight_cache.ENTRIES,), weight_cache.forget_fp8_weights),
    Store("optimizer hook", (weight_cache.OPTIMIZER_HOOK,), None),
    Store("precomputed-amax generation", (fsdp_float8.GENERATION,), None),
    Store("all-gather optimizer hook", (fsdp_float8.OPTIMIZER_HOOK,), None),
    Store("saved-tensor names", (torch_internals.SAVED_NAMES,), torch_internals.SAVED_NAMES.clear),
    Store("fused classes", (fused_class.FUSED_CLASSES,), fused_class.FUSED_CLASSES.clear),
    Store("swapped classes", (class_swap.SWAPPED_CLASSES,), class_swap.SWAPPED_CLASSES.clear),
    Store("activation proofs", (gate_proof.ACTIVATION_PROOFS,), gate_proof.ACTIVATION_PROOFS.clear),
    Store("rotary proofs", (rope_proof.PROOFS,), rope_proof.PROOFS.clear),
    Store("complex RoPE warnings", (rope_complex.warned,), rope_complex.warned.clear),
    Store("Python warning", (python_versions.warned,), _clear_flag(python_versions.warned)),
    Store("device capability", (kernels.device_capability,), kernels.device_capability.cache_clear),
)
if launch is not None:
    STORES += (
        Store("launch plans", (quantize.PLANS,), quantize.PLANS.clear),
        Store("relaunch cases", (launch.RELAUNCHES,), launch.RELAUNCHES.clear),
        Store("Triton warning", (launch.warned,), _clear_flag(launch.warned)),
        Store("SM counts", (quantize.num_sms,), quantize.num_sms.cache_clear),
    )


def reset_state() -> None:
    """Clear every cache and registry that is not static (the table above); the next calls fill
    them again. For tests, and for a process that wants f8tensor as if freshly imported."""
    for store in STORES:
        if store.clear is not None:
            store.clear()
