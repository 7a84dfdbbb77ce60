"""Give a module whose forward a fusion proved a same-named subclass of its class: the machinery
the fusions by proof (gate_proof.py, rope_proof.py, norm_proof.py) share.

The subclass mixes in a FusedModule, whose forward runs the fused code where the proof still covers
the call and the class's own forward otherwise. As a class, not an instance attribute, it goes with
every copy (copy, deepcopy, pickle, torch.save) and makes no reference cycle; pickles (and
copy.copy) rebuild the fused class around the original and prove it again where they are loaded
(what was proven, held on the instance under the mixin's attribute, is not pickled); a deepcopy in
the same process keeps the proof. A proof traces with torch.fx, which patches nn.Module's call for
the whole process while it runs: fusing or loading a pickled fused model while another thread calls
modules can fail those calls.
"""

import builtins
import copy
import dis
import functools
import inspect
import operator
import types
import warnings

import torch
from torch import nn

from ..core.class_swap import QuietSubclasses
from ..torch_internals import fx_tracing
from . import python_versions

# The record of a module that the user's module_filter_fn left alone.
EXCLUDED = "excluded by module_filter_fn"

# What multiplies two tensors, in a traced graph.
MULS = frozenset({operator.mul, torch.mul})

# Opcodes that branch or loop: a proof's bytecode walk refuses them (tracing follows one arm).
JUMPS = frozenset(dis.hasjrel) | frozenset(dis.hasjabs) | frozenset(getattr(dis, "hasjump", ()))


def global_value(fn_globals: dict, name: str):
    """What a function with these globals reads for a global name (a builtin if the module lacks it)."""
    return fn_globals.get(name, getattr(builtins, name, None))


def globals_unchanged(fn_globals: dict, read) -> bool:
    """Whether each (name, value) a proof recorded as read is still what the name reads, and each
    (module, name, value) what the module's attribute is (F.silu)."""
    return all((global_value(fn_globals, r[0]) if len(r) == 2 else getattr(r[0], r[1], None)) is r[-1]
               for r in read)


def code_of(fn: types.FunctionType) -> tuple:
    """What a function runs: its code and defaults (edited in place, as IPython's autoreload does,
    they change while the function object stays)."""
    return fn.__code__, fn.__defaults__, fn.__kwdefaults__


def code_unchanged(fn: types.FunctionType, code: tuple) -> bool:
    """fn still runs the code and defaults code_of(fn) gave when it was proven."""
    return all(now is then for now, then in zip(code_of(fn), code))


def class_forward(cls: type):
    """The class's forward if it is a plain function, else None."""
    forward = inspect.getattr_static(cls, "forward", None)
    return forward if isinstance(forward, types.FunctionType) else None


def tracing() -> bool:
    """Under fx symbolic tracing, torch.compile or torch.jit tracing: fused classes then run their
    class's forward (compile fuses the written code itself; the others record it)."""
    return (fx_tracing() or torch.compiler.is_compiling()
            or torch.jit.is_tracing())


class FusedModule(QuietSubclasses):
    """Base of the mixins. Its members are prefixed _f8tensor_ so as not to hide the user's. A mixin
    sets _f8tensor_attr (the instance attribute holding what was proven, or why not, as a str),
    _f8tensor_proof (the type of a proof) and _f8tensor_prove(mod) (a proof of mod as its own class,
    or why not), and defines _f8tensor_fused_forward(self, proof, args, kwargs), which returns
    NotImplemented where the proof does not cover the call."""

    _f8tensor_attr: str
    _f8tensor_proof: type
    _f8tensor_base: type  # the module's own class
    _f8tensor_mixin: type

    @staticmethod
    def _f8tensor_prove(mod: nn.Module):
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        proof = self.__dict__.get(self._f8tensor_attr)
        if isinstance(proof, self._f8tensor_proof):
            out = self._f8tensor_fused_forward(proof, args, kwargs)
            if out is not NotImplemented:
                return out
        return self._f8tensor_base.forward(self, *args, **kwargs)  # the module's own forward and errors

    def __deepcopy__(self, memo):
        """A copy in this process holds the proof by reference (its class, code and globals are the
        original's, its children copies of the same classes, and each call checks the proof again):
        no re-proof, so no fx trace, which patches nn.Module's call for the whole process while it
        runs (a copy made in one thread, an EMA or evaluation copy, would break module calls in
        another). Pickles re-prove where they are loaded (__reduce_ex__)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        attr = self._f8tensor_attr
        for name, value in self.__dict__.items():
            new.__dict__[name] = value if name == attr else copy.deepcopy(value, memo)
        return new

    def __reduce_ex__(self, protocol):
        state = dict(self.__getstate__())
        state.pop(self._f8tensor_attr, None)  # holds the code proven: proven again where the copy is made
        cls = type(self)  # the fused class, or a subclass made of it later (as FSDP2's): kept by copies
        made_here = "_f8tensor_mixin" in vars(cls)  # made by fused_class: rebuilt where the copy is made
        return _new_fused, (self._f8tensor_base, self._f8tensor_mixin, None if made_here else cls), state

    def __setstate__(self, state):
        super().__setstate__(state)
        fused, self.__class__ = type(self), self._f8tensor_base  # proven as its own class, as when fused
        reason = python_versions.unsupported_reason()
        if reason is not None:  # a model fused on a checked Python, loaded on another one
            python_versions.warn_once(reason)
            found = f"not attempted: {reason}"
        else:
            found = fused._f8tensor_prove(self)
        # Where what was proven no longer holds here: the module's own class, or a class made of the
        # fused one later (FSDP2's) kept for its methods, whose forward runs as written (the reason
        # is recorded instead of a proof).
        if isinstance(found, fused._f8tensor_proof) or "_f8tensor_mixin" not in vars(fused):
            self.__class__ = fused
        self.__dict__[fused._f8tensor_attr] = found

    def __prepare_scriptable__(self):
        """torch.jit.script scripts a shallow copy of the module as its own class (the fused forward
        calls Triton kernels, which TorchScript cannot compile). TorchScript writes that copy into
        the parent's modules, so scripting a model that holds fused modules unfuses them in the
        eager model too: it warns (script copy.deepcopy(model) to keep the model fused)."""
        warnings.warn(
            f"torch.jit.script: the fused {type(self).__name__} is scripted as its own class; where it is a "
            "submodule of what is scripted, TorchScript puts that unfused copy in its parent, in the eager "
            "model too. Script copy.deepcopy(model) to keep the model fused", python_versions.FusionWarning,
            stacklevel=2)
        plain = self._f8tensor_base.__new__(self._f8tensor_base)
        plain.__dict__.update(self.__dict__)
        plain.__dict__.pop(self._f8tensor_attr, None)
        return plain


# (class, mixin) -> fused class, so that every fused module of a class shares one (state.py lists it).
FUSED_CLASSES: dict[tuple[type, type], type] = {}


def make_fused_class(base: type, mixin: type) -> type:
    """The class of base's modules fused by mixin: same name, base's behaviour but the forward, whose
    signature (inspect.signature) is base's."""
    if (base, mixin) not in FUSED_CLASSES:
        @functools.wraps(base.forward)
        def forward(self, *args, **kwargs):
            return mixin.forward(self, *args, **kwargs)

        FUSED_CLASSES[base, mixin] = type(base.__name__, (mixin, base), {
            "__module__": base.__module__, "__qualname__": base.__qualname__, "_f8tensor_base": base,
            "_f8tensor_mixin": mixin, "forward": forward}, _f8tensor_quiet=True)
    return FUSED_CLASSES[base, mixin]


def _new_fused(base: type, mixin: type, cls: type | None = None):
    """An empty fused module of base's class, or of cls (a subclass of the fused class made after
    fusion); unpickling and copies then set its state."""
    obj = base.__new__(base)
    obj.__class__ = cls or make_fused_class(base, mixin)
    return obj


def fuse_candidates(model: nn.Module, accept, is_candidate, mixin: type, not_attempted: str | None = None) -> int:
    """fuse_module every module of the model that is_candidate(module) picks and accept(module, fqn)
    accepts (or, given not_attempted, record that reason on it instead); record the others it picks
    as excluded. Returns how many it accepted."""
    accepted = 0
    for fqn, mod in model.named_modules():
        if is_candidate(mod):
            if accept(mod, fqn):
                accepted += 1
                if not_attempted is None:
                    fuse_module(mod, mixin)
                else:
                    mod.__dict__[mixin._f8tensor_attr] = not_attempted
            else:
                mod.__dict__[mixin._f8tensor_attr] = EXCLUDED
    return accepted


def report_row(mod: nn.Module, mixin: type, label: str) -> tuple[bool, str, bool] | None:
    """(fused, what or why not, excluded by the filter) for a module mixin's fusion examined, else None."""
    found = mod.__dict__.get(mixin._f8tensor_attr)
    if found is None:
        return None
    if isinstance(found, mixin._f8tensor_proof):
        return True, str(found), False
    return False, f"{label} not fused: {found}", found == EXCLUDED


def fuse_module(mod: nn.Module, mixin: type):
    """Make the module's class the fused one if mixin proves it; record the result on the module
    (read by fusion_report) and return it."""
    found = mixin._f8tensor_prove(mod)
    if isinstance(found, mixin._f8tensor_proof):
        try:
            mod.__class__ = make_fused_class(type(mod), mixin)
        except Exception as e:  # noqa: BLE001 (a class or instance that refuses: left as it is)
            found = f"its class cannot take a fused subclass ({type(e).__name__}: {e})"
    mod.__dict__[mixin._f8tensor_attr] = found
    return found
