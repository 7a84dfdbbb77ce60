"""fuse_model_ops: run a model's own norm, gate and RoPE code as f8tensor's fused ops.

`convert_to_float8_training` converts linear layers and nothing else. This is the separate,
explicit call that changes the rest of a model, one switch per fusion:

    rms_norm  every nn.RMSNorm becomes f8tensor.RMSNorm in place            (norm_swap.py), and a
              norm module proven to compute Hugging Face's Llama-family RMSNorm (or OLMo 2's,
              the weight multiplied before the cast, or Gemma's, 1 + weight) runs it fused in
              that form                                                      (norm_proof.py)
    swiglu    a module whose forward is proven to compute down(silu(gate(x)) * up(x)) over
              three linear children runs its gate as f8tensor.swiglu (with GELU's tanh form
              instead of silu, Gemma's, as f8tensor.geglu)                  (gate_proof.py)
    rope      a module whose forward calls, by its global name, a function proven to compute
              rotate_half rotations runs that function as f8tensor.rope      (rope_proof.py)

Each changed module keeps its parameters, state dict and hooks; fused modules get a same-named
subclass of their class (fused_class.py). What every fusion did, and why it did not where it
examined a module and left it alone, is recorded on the module and returned as a FusionReport.
"""

import logging
from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import norm_swap
from .fused_class import fuse_candidates, report_row
from .gate_proof import FusedGateModule, is_gate_candidate
from .norm_proof import FusedNormModule, is_norm_candidate
from .python_versions import unsupported_reason, warn_once
from .rope_proof import FusedRoPEModule, is_rope_candidate

logger = logging.getLogger("f8tensor")

KINDS = ("rms_norm", "swiglu", "rope")
# The fusions by proof: kind -> (which modules they examine, the mixin of the fused class, the report's label).
_PROOFS = {"rms_norm": (is_norm_candidate, FusedNormModule, "RMSNorm"),
           "swiglu": (is_gate_candidate, FusedGateModule, "SwiGLU gate"),
           "rope": (is_rope_candidate, FusedRoPEModule, "RoPE")}
# What strict mode tells a user whose model has nothing a switch could fuse.
_NOTHING_FOUND = {
    "rms_norm": "the model has no nn.RMSNorm and no norm module with one weight and a forward naming rsqrt",
    "swiglu": "no module has three linear children and a forward naming silu or an activation child",
    "rope": "no module's forward calls a global function that is, or is named like, a rotary embedding",
}


class FusionError(RuntimeError):
    """fuse_model_ops(strict=True) found an expected fusion that did not happen."""


@dataclass(frozen=True)
class FusionRow:
    """One module a fusion examined: fused or not, with what was fused or why not."""
    fqn: str
    kind: str  # one of KINDS
    fused: bool
    detail: str
    excluded: bool = False  # left alone by the user's module_filter_fn


@dataclass(frozen=True)
class FusionReport:
    """What fuse_model_ops fused in a model and why not elsewhere; str() is a table."""
    rows: tuple[FusionRow, ...]

    def fused(self, kind: str | None = None) -> list[FusionRow]:
        return [r for r in self.rows if r.fused and kind in (None, r.kind)]

    def not_fused(self, kind: str | None = None) -> list[FusionRow]:
        return [r for r in self.rows if not r.fused and kind in (None, r.kind)]

    def __str__(self):
        counts = ", ".join(f"{kind} {len(self.fused(kind))} of {sum(r.kind == kind for r in self.rows)}"
                           for kind in KINDS if any(r.kind == kind for r in self.rows))
        width = max([len(r.fqn) for r in self.rows] + [5])
        lines = [f"f8tensor fusion: {counts or 'nothing examined'}"]
        lines += [f"  {r.fqn:<{width}}  {r.kind:<8}  {r.detail}" for r in self.rows]
        return "\n".join(lines)


def fusion_report(model: nn.Module) -> FusionReport:
    """The fusion records of every module in the model (what fuse_model_ops did to it)."""
    rows = []
    for fqn, mod in model.named_modules():
        fqn = fqn or "<root>"
        for kind, (fused, detail, excluded) in _rows(mod):
            rows.append(FusionRow(fqn, kind, fused, detail, excluded))
    rows += [FusionRow("<root>", kind, False, detail) for kind, detail in _unavailable(model)]
    return FusionReport(tuple(rows))


def _rows(mod: nn.Module):
    norm = norm_swap.report_row(mod)
    if norm is not None:
        yield "rms_norm", norm
    for kind, (_, mixin, label) in _PROOFS.items():
        row = report_row(mod, mixin, label)
        if row is not None:
            yield kind, row


# Set on the model when a fusion could not be attempted at all: {kind: reason}.
_MODEL_ATTR = "_f8tensor_fusion_unavailable"


def _unavailable(model: nn.Module):
    return model.__dict__.get(_MODEL_ATTR, {}).items()


def fuse_model_ops(
    model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True, rope: bool = True,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None, strict: bool = False,
) -> FusionReport:
    """Run the model's RMSNorm, SwiGLU gate and RoPE code as f8tensor's fused ops where each can be
    proven to compute exactly that (see this module's docstring); returns the FusionReport.

    The model code is not changed and the results are those of the fused ops (docs/design.md says
    how they round). Call it before or after convert_to_float8_training, before torch.compile and
    FSDP2's fully_shard. Calling it again fuses what is new and leaves fused modules as they are.
    module_filter_fn(module, fqn) returns False to leave that module alone; it is called with
    each module a fusion would change: an nn.RMSNorm, a feed-forward, a module calling a rotary
    function. A switch set to False leaves that fusion alone everywhere. The model itself is
    never replaced (an nn.RMSNorm passed as the model is reported, not swapped).
    strict: raise FusionError, after fusing what it could, if a module a switch examined was not
    fused for any reason other than module_filter_fn, or a switch that is on fused nothing (found
    nothing to examine, or the filter excluded all it found): for model code that must run fused
    (a benchmark, a production run), so that a new version of the model's library or of Python
    that stops fusion fails instead of running slower.
    """
    accept = module_filter_fn or (lambda mod, fqn: True)
    unavailable = model.__dict__.setdefault(_MODEL_ATTR, {})
    if rms_norm:
        norm_swap.swap_norms(model, accept)
    reason = unsupported_reason()
    for kind, on in zip(KINDS, (rms_norm, swiglu, rope)):
        if not on:
            continue
        is_candidate, mixin, _ = _PROOFS[kind]
        if reason is None:
            unavailable.pop(kind, None)
            fuse_candidates(model, accept, is_candidate, mixin)
        elif kind == "rms_norm":  # its candidates are found without reading bytecode: each says so
            if fuse_candidates(model, accept, is_candidate, mixin, not_attempted=f"not attempted: {reason}"):
                warn_once(reason)
        else:
            warn_once(reason)
            unavailable[kind] = f"not attempted: {reason}"
    if not unavailable:
        del model.__dict__[_MODEL_ATTR]
    report = fusion_report(model)
    for row in report.rows:
        logger.info("f8tensor: %s: %s", row.fqn, row.detail)
    if strict:
        _raise_unless_complete(report, [k for k, on in zip(KINDS, (rms_norm, swiglu, rope)) if on])
    return report


def _raise_unless_complete(report: FusionReport, kinds: list[str]) -> None:
    problems = [f"{r.fqn} ({r.kind}): {r.detail}" for r in report.not_fused() if r.kind in kinds and not r.excluded]
    for kind in kinds:
        if not any(r.kind == kind for r in report.rows):
            problems.append(f"{kind}: {_NOTHING_FOUND[kind]}")
        elif not report.fused(kind) and all(r.excluded for r in report.rows if r.kind == kind):
            problems.append(f"{kind}: module_filter_fn excluded every module this switch examined")
    if problems:
        raise FusionError(
            "fuse_model_ops(strict=True): expected fusions did not happen:\n  " + "\n  ".join(problems)
            + "\nPass rms_norm=False, swiglu=False or rope=False for a fusion this model cannot take, "
            "or a module_filter_fn that leaves those modules alone.")
