"""The gate fusion of fuse_model_ops (switch `swiglu`): find SwiGLU feed-forward modules and run their
gate as f8tensor.swiglu, without model changes.

A feed-forward written as

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

(torchtitan's FeedForward; Hugging Face's LlamaMLP, `down_proj(act_fn(gate_proj(x)) * up_proj(x))`
with an nn.SiLU or SiLUActivation child, is the same) computes its gate in three eager kernels each way, and the
float8 layers around it then read the gate's output and gradients again for their amax. That code
cannot be swapped as a module is: the gate is a function call inside the user's forward. Here
the fusion proves that a module's forward computes exactly down(silu(gate(x)) * up(x)) and
nothing else, and only then makes the module's class a subclass of its own (same name) whose
forward computes down(swiglu(gate(x), up(x))), as FSDP2's fully_shard does for its hooks: same
parameters, state dict, hooks, and calls of the three linears in the same order. Values:
swiglu's, one rounding where eager rounds silu(a) first (bf16/fp16 within one unit in the last
place of eager's; fp32 within fp32 arithmetic error).

The proof, all of which must hold (otherwise the module is left alone, and why is recorded):
- the module: no instance-level forward; its class (up to nn.Module) has no metaclass and defines
  no __init_subclass__, pickling (__reduce__, __reduce_ex__) or attribute hooks (__getattr__,
  __getattribute__, __setattr__), so a subclass of it is made without side effects and behaves
  as it does;
- the bytecode of the class's forward, instruction by instruction: one argument, no closure or
  super(), no try or with block, no branch or loop, and nothing but loads of locals, of
  `self.<child module>` (self used for nothing else: no helper method, property, alias), of torch /
  torch.nn / torch.nn.functional and their silu and mul, of a tensor's `.mul`, of True/False/None
  and keyword names, calls, `*`, stores to locals and the return (so tracing runs nothing of the
  user's and writes nothing);
- torch.fx traces it (child modules as leaves) to exactly: two of its nn.Linear children on the
  input, silu of one of them (F.silu not in place, or an activation child that is silu), its
  product with the other, the third nn.Linear child on the product, returned; each intermediate
  used once.
An activation child is silu if it is an nn.SiLU (not in place) or its class is proven to compute
exactly F.silu(input) by the same bytecode walk and trace (transformers 5's SiLUActivation), with
no forward of its own and no hooks. It is GELU in its tanh form (GeGLU's gate, Gemma's) if it is
an nn.GELU(approximate="tanh") or its class is proven to compute exactly F.gelu(input,
approximate="tanh") the same way, where the walk also lets its forward call an instance attribute
that is functools.partial(F.gelu, approximate="tanh") (transformers 5's GELUTanh); such a gate runs
as f8tensor.geglu. Only modules whose children are three nn.Linear and at most one
child without parameters, buffers or children, and whose class forward is a plain function that
names silu or that have that child, are examined.

The halves form (Phi-3's and GLM's feed-forward: one gate_up projection, its output chunked in two,
`gate, up = self.gate_up_proj(x).chunk(2, dim=-1); self.down_proj(up * self.act(gate))`) is proven
the same way: the walk also admits int constants, a tensor's chunk and torch.chunk, and unpacking a
call's values; the trace must be exactly: an nn.Linear child on the input, its chunk in two along
dim -1, the two halves (getitem 0 and 1, each used once), the activation of one, its product with
the other, the other nn.Linear child on the product, returned. Such a module has two nn.Linear
children and the activation child or silu, and a forward that names chunk; its gate runs as
f8tensor.swiglu_halves (geglu_halves) on the projection's output, which reads the halves in place
and gives the projection one gradient and one amax record.

At each call the fused forward runs the class's own forward instead wherever the proof no longer
covers the call: arguments other than the one input (by position, or by its name unless
positional-only), the class's forward or the globals it read rebound since, an activation child
that is no longer what was proven (replaced, also by the other activation, in place, its own
forward, its class's forward rebound, a partial attribute it calls rebound or shadowed, or hooks
of its own), or fx symbolic tracing or torch.jit tracing. Global module hooks do not change the
path (activation checkpointing must recompute what it saved, with or without a mode that hooks
every module), and do not see the activation child's call. Unpickled modules (and copy.copy) are
proven again where they are made; a deepcopy keeps the proof (fused_class.py).
"""

import functools
import operator
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..fused_ops.swiglu import geglu, geglu_halves, swiglu, swiglu_halves
from ..kernels import INPUT_DTYPES
from ..kernels.naive import halves
from ..torch_internals import fx_tracing, has_hooks
from ..core.class_swap import class_reason
from .forward_walk import Grammar, code_reason
from .fused_class import MULS, FusedModule, class_forward, code_of, code_unchanged, globals_unchanged

# Set on a module whose gate was fused (a SwiGLUGate) or, for a candidate, why it was not (a str);
# fusion_report reads it.
GATE_ATTR = "_f8tensor_swiglu"

_SILU_FORWARD, _GELU_FORWARD = nn.SiLU.forward, nn.GELU.forward
_F_SILU, _F_GELU = F.silu, F.gelu  # what they call
# The activations a gate may have: what the activation's trace must be (target, kwargs accepted).
_ACTIVATIONS = {"silu": (F.silu, ({}, {"inplace": False})), "gelu_tanh": (F.gelu, ({"approximate": "tanh"},))}


def _child_module(mod: nn.Module, cls: type, name: str) -> bool:
    return name in dict(mod.named_children()) and not hasattr(cls, name)


# What a gate's forward (and an activation's) may read and compute: its children, silu, chunk and *.
GRAMMAR = Grammar(does="call its children, silu, chunk and *", self_reads="a child module",
                  self_attribute=_child_module, torch_objects=(torch, nn, F, F.silu, torch.mul, torch.chunk),
                  tensor_attributes=frozenset({"mul", "chunk"}), constants=(bool, int, type(None)),
                  binary_ops=frozenset({"*"}))


def _exactly(value, want) -> bool:
    """value == want with value of want's very type (a str subclass may define == as it likes)."""
    return type(value) is type(want) and value == want


def _gelu_tanh_partial(value) -> bool:
    """value is functools.partial(F.gelu, approximate="tanh"), nothing else bound."""
    return (type(value) is functools.partial and value.func is F.gelu and not value.args
            and list(value.keywords) == ["approximate"] and _exactly(value.keywords["approximate"], "tanh"))


def _partial_attribute(mod: nn.Module, cls: type, name: str) -> bool:
    return not hasattr(cls, name) and _gelu_tanh_partial(mod.__dict__.get(name))


# An activation's forward: the gate's grammar, F.gelu too, and self read for an instance attribute
# that is GELU's tanh form as a functools.partial (transformers' GELUTanh).
ACT_GRAMMAR = Grammar(does="call silu or GELU", self_reads="a partial of GELU", self_attribute=_partial_attribute,
                      torch_objects=(torch, nn, F, F.silu, F.gelu), tensor_attributes=frozenset(),
                      constants=(bool, str, type(None)), binary_ops=frozenset())


@dataclass(frozen=True)
class SwiGLUGate:
    """forward(arg) = down(silu(gate(arg)) * up(arg)): child names; act: the activation child's name,
    if silu is one; gate_first: gate(arg) runs before up(arg); arg: the forward's parameter name;
    forward, globals, code: the function proven, what its global names were bound to and its code
    (code_of); act_proof: for an activation child of a class proven to be silu (not nn.SiLU),
    (class, its forward, the globals that forward read, the activation, its partial attributes,
    that forward's code). gate_half: the halves form, forward(arg) = down(silu(g) * u) with g, u the
    halves of gate(arg).chunk(2, dim=-1), g the first (0) or the second (1); up is then None."""
    gate: str
    up: str | None
    down: str
    gate_first: bool
    act: str | None
    arg: str | None  # None: positional-only
    forward: types.FunctionType  # the class forward proven, and the globals it read
    globals: tuple[tuple[str, object], ...]
    code: tuple  # code_of(forward) as proven
    act_proof: tuple | None = None
    activation: str = "silu"  # or "gelu_tanh": GeGLU's gate, run as f8tensor.geglu
    gate_half: int | None = None  # the halves form: which half of gate(arg) is the gate

    def __str__(self):
        act = "gelu_tanh" if self.activation == "gelu_tanh" else "silu"
        if self.gate_half is None:
            gate, up = self.gate, self.up
        else:
            gate, up = (f"{self.gate} half {i} of 2" for i in (self.gate_half, 1 - self.gate_half))
        return f"{'GeGLU' if act == 'gelu_tanh' else 'SwiGLU'} gate fused: {self.down}({act}({gate}) * {up})"


def _leaf_without_state(c: nn.Module) -> bool:
    # recurse=False: the same answer for a module without children, without walking named_modules
    # (this runs at every call of a fused gate).
    return next(c.children(), None) is None and next(c.parameters(recurse=False), None) is None and next(
        c.buffers(recurse=False), None) is None


def is_gate_candidate(mod: nn.Module) -> bool:
    """Children: three nn.Linear and at most one other, without parameters, buffers or children (an
    activation); a plain-function forward that names silu, or that activation child; not yet fused.
    Or the halves form: two nn.Linear (Phi-3's and GLM's one gate_up projection, and down), that
    child or silu, and a forward that names chunk."""
    children = list(mod.children())
    linears = sum(isinstance(c, nn.Linear) for c in children)
    others = [c for c in children if not isinstance(c, nn.Linear)]
    if linears not in (2, 3) or len(others) > 1 or not all(_leaf_without_state(c) for c in others) or isinstance(
            mod, FusedGateModule):
        return False
    forward = class_forward(type(mod))
    if forward is None:
        return False
    if linears == 2:
        return (len(others) == 1 or "silu" in forward.__code__.co_names) and "chunk" in forward.__code__.co_names
    return len(others) == 1 or "silu" in forward.__code__.co_names


# (activation class, its forward, the names of its GELU partial attributes) -> (class, forward,
# globals read, activation, those names) where proven to compute exactly F.silu(input) (transformers
# 5's SiLUActivation) or F.gelu(input, approximate="tanh") (its GELUTanh), else why not; proven
# once, when a module is fused (state.py lists it; a fused module holds its own proof).
ACTIVATION_PROOFS: dict[tuple, tuple | str] = {}


def _partial_names(act: nn.Module) -> tuple[str, ...]:
    """The instance attributes that are GELU's tanh form as a partial and that no class attribute
    (a property, say) shadows."""
    return tuple(sorted(name for name, value in act.__dict__.items()
                        if _gelu_tanh_partial(value) and not hasattr(type(act), name)))


# Methods through which a module's call reaches its forward: a class of its own that defines one may
# compute something else than its forward when called, which the fused gate, not calling it, would skip.
_CALL_METHODS = ("__call__", "_call_impl", "_wrapped_call_impl")


def _call_reason(cls: type) -> str | None:
    for c in cls.__mro__[:cls.__mro__.index(nn.Module)]:
        for name in _CALL_METHODS:
            if name in vars(c):
                return f"its class {c.__name__} defines {name}"
    return None


def _activation_proof(cls: type, act: nn.Module, forward) -> tuple | str:
    read_globals = []
    reason = (class_reason(act, cls) or _call_reason(cls)
              or code_reason(act, cls, forward, ACT_GRAMMAR, read_globals))
    if reason:
        return _named(cls, f"the activation child {cls.__name__}: {reason}")
    tracer = _LeafTracer()
    try:
        nodes = list(tracer.trace(act).nodes)
    except Exception as e:  # noqa: BLE001 (not provably the activation)
        return f"the activation child {cls.__name__} could not be traced ({type(e).__name__}: {e})"
    finally:
        tracer.__dict__.clear()
    if [n.op for n in nodes] == ["placeholder", "call_function", "output"] and nodes[1].args == (nodes[0],) and (
            nodes[2].args == (nodes[1],)):
        for kind, (target, kwargs) in _ACTIVATIONS.items():
            if nodes[1].target is target and any(
                    list(nodes[1].kwargs) == list(k) and all(_exactly(nodes[1].kwargs[n], v) for n, v in k.items())
                    for k in kwargs):
                return cls, forward, tuple(read_globals), kind, _partial_names(act), code_of(forward)
    return _named(cls, f"the activation child {cls.__name__} does not compute exactly silu(input) "
                       "or gelu(input, approximate='tanh')")


def _instance_reason(act) -> str | None:
    """Why an activation child's call cannot be left out whatever its class: not a stateless leaf
    module, hooks or a forward of its own."""
    if not isinstance(act, nn.Module) or not _leaf_without_state(act):
        return f"the activation child is a {type(act).__name__}, not silu"
    if has_hooks(act):
        return f"the activation child {type(act).__name__} has hooks"
    if "forward" in act.__dict__:
        return f"the activation child {type(act).__name__} has a forward of its own"
    return None


def _nn_silu_reason(act: nn.SiLU) -> str | None:
    if act.inplace:
        return "the nn.SiLU child is in place (it writes into the gate's output)"
    if nn.SiLU.forward is not _SILU_FORWARD or F.silu is not _F_SILU:
        return "nn.SiLU's forward or F.silu, which it calls, was replaced"
    return None


def _nn_gelu_reason(act: nn.GELU) -> str | None:
    if not _exactly(act.approximate, "tanh"):
        return (f"the activation child GELU is exact (approximate={act.approximate!r}), not silu or GELU's "
                "tanh form: only SwiGLU and GeGLU (tanh) gates are fused")
    if nn.GELU.forward is not _GELU_FORWARD or F.gelu is not _F_GELU:
        return "nn.GELU's forward or F.gelu, which it calls, was replaced"
    return None


def _activation(act) -> tuple[str | None, tuple | None, str | None]:
    """(why an activation child cannot be fused away, or None; the proof of its class when that is
    not nn.SiLU / nn.GELU; "silu" or "gelu_tanh"): an nn.SiLU not in place, an
    nn.GELU(approximate="tanh"), or a class proven to compute F.silu(input) or
    F.gelu(input, approximate="tanh")."""
    reason = _instance_reason(act)
    if reason:
        return reason, None, None
    if type(act) is nn.SiLU:
        reason = _nn_silu_reason(act)
        return reason, None, None if reason else "silu"
    if type(act) is nn.GELU:
        reason = _nn_gelu_reason(act)
        return reason, None, None if reason else "gelu_tanh"
    cls, forward = type(act), class_forward(type(act))
    if forward is None:
        return _named(cls, f"the activation child {cls.__name__}'s forward is not a plain function"), None, None
    key = (cls, forward, forward.__code__, _partial_names(act))
    if key not in ACTIVATION_PROOFS:
        ACTIVATION_PROOFS[key] = _activation_proof(cls, act, forward)
    found = ACTIVATION_PROOFS[key]
    return (found, None, None) if isinstance(found, str) else (None, found, found[3])


_OTHER_ACTIVATIONS = {"gelu": "GELU", "relu": "ReLU", "tanh": "tanh", "sigmoid": "sigmoid"}


def _named(cls: type, reason: str) -> str:
    """reason, said plainly where the class is named as another activation (transformers' GELUActivation)."""
    other = next((v for k, v in _OTHER_ACTIVATIONS.items() if k in cls.__name__.lower()), None)
    if other is None:
        return reason
    return (f"the activation child {cls.__name__} is a {other} activation, not silu or GELU's tanh form: only "
            "SwiGLU and GeGLU (tanh) gates are fused")


def _still_act(act, proof: tuple | None, activation: str) -> bool:
    """At each call, without proving anything: the activation child is still what was proven, the
    same activation (a gate proven with silu must not run with a GELU child swapped in, or the reverse)."""
    if _instance_reason(act) is not None:
        return False
    if type(act) is nn.SiLU:
        return activation == "silu" and _nn_silu_reason(act) is None
    if type(act) is nn.GELU:
        return activation == "gelu_tanh" and _nn_gelu_reason(act) is None
    if proof is None:
        return False
    cls, forward, read_globals, kind, partials, code = proof
    # The proven forward reads no instance attribute but these partials (ACT_GRAMMAR): each must still
    # be one; an attribute added since is not read.
    return (kind == activation and type(act) is cls and cls.forward is forward and code_unchanged(forward, code)
            and globals_unchanged(forward.__globals__, read_globals)
            and all(_partial_attribute(act, cls, name) for name in partials))


def _call_covered(mod: nn.Module, gate, args, kwargs) -> bool:
    """Whether this call is one the proof covers: a module fused by fuse_model_ops, called with its one
    input (by position, or by name unless positional-only), whose class forward and the globals it
    reads are those proven, with an activation child that is still silu if silu is one; not under
    fx symbolic tracing or torch.jit tracing."""
    if len(args) + len(kwargs) != 1 or (kwargs and (
            gate.arg is None or gate.arg not in kwargs)):
        return False
    if (mod._f8tensor_base.forward is not gate.forward or not code_unchanged(gate.forward, gate.code)
            or fx_tracing() or torch.jit.is_tracing()):
        return False
    if not globals_unchanged(gate.forward.__globals__, gate.globals):
        return False
    return gate.act is None or _still_act(getattr(mod, gate.act, None), gate.act_proof, gate.activation)


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return True


def find_gate(mod: nn.Module) -> SwiGLUGate | str:
    """The SwiGLU pattern of a candidate module's forward, or why it is not one."""
    cls = type(mod)
    forward = class_forward(cls)
    children = dict(mod.named_children())
    read_globals = []
    reason = class_reason(mod, cls) or code_reason(mod, cls, forward, GRAMMAR, read_globals)
    if reason:
        return reason
    acts = [name for name, c in children.items() if not isinstance(c, nn.Linear)]
    act_proof, activation = None, None
    if acts:
        reason, act_proof, activation = _activation(children[acts[0]])
        if reason:
            return reason
    tracer = _LeafTracer()
    try:
        graph = tracer.trace(mod)
    except Exception as e:  # noqa: BLE001 (any failure to trace means: not provably the pattern)
        return f"forward could not be traced ({type(e).__name__}: {e})"
    finally:  # the tracer and its graph reference each other and the module: without this the
        tracer.__dict__.clear()  # module's memory would wait for the garbage collector
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    (out,) = [n for n in nodes if n.op == "output"]
    if len(placeholders) != 1 or len(nodes) not in (7, 9):
        return f"forward is not down(silu(gate(x)) * up(x)) nor its halves form: {len(nodes) - 2} operations"
    (x,) = placeholders

    def linear_call(n, arg) -> str | None:
        ok = (n.op == "call_module" and isinstance(children.get(n.target), nn.Linear)
              and n.args == (arg,) and not n.kwargs and len(n.users) == 1)
        return n.target if ok else None

    def silu_of(n):  # (input node, the nn.SiLU child's name or None), or None
        if len(n.users) != 1 or len(n.args) != 1:
            return None
        if n.op == "call_function" and n.target is F.silu and n.kwargs in ({}, {"inplace": False}):
            return n.args[0], None
        if n.op == "call_module" and n.target in acts and not n.kwargs:
            return n.args[0], n.target
        return None

    def half_of(n):  # (the chunk node, which half) of a node taking one half of a chunk in two, or None
        if not (n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2 and not n.kwargs
                and isinstance(n.args[0], torch.fx.Node) and len(n.users) == 1):
            return None
        return (n.args[0], n.args[1]) if any(_exactly(n.args[1], i) for i in (0, 1)) else None

    def chunked_linear(c) -> str | None:  # the linear of x that c chunks in two along the last dim, or None
        in_two = (c.args[1:], c.kwargs) in (((2,), {"dim": -1}), ((2, -1), {})) and all(
            type(v) is int for v in (*c.args[1:], *c.kwargs.values()))
        ok = ((c.op == "call_method" and c.target == "chunk" or c.op == "call_function" and c.target is torch.chunk)
              and in_two and len(c.users) == 2 and isinstance(c.args[0], torch.fx.Node))
        return linear_call(c.args[0], x) if ok else None

    down_node = out.args[0] if len(out.args) == 1 else None
    down = isinstance(down_node, torch.fx.Node) and down_node.op == "call_module" and down_node.target
    product = down_node.args[0] if down and len(down_node.args) == 1 else None
    if not (isinstance(product, torch.fx.Node) and linear_call(down_node, product) and len(product.users) == 1
            and not product.kwargs and len(product.args) == 2
            and (product.op == "call_function" and product.target in MULS
                 or product.op == "call_method" and product.target == "mul")):
        return "forward is not down(silu(gate(x)) * up(x)): no linear of a product returned"
    for act, other in (product.args, product.args[::-1]):
        found = silu_of(act) if isinstance(act, torch.fx.Node) else None
        if found is None or not isinstance(other, torch.fx.Node):
            continue
        # what either form records of the forward and its activation
        proven = dict(act=found[1], arg=None if forward.__code__.co_posonlyargcount > 1 else x.target,
                      forward=forward, globals=tuple(read_globals), code=code_of(forward), act_proof=act_proof if found[1] else None,
                      activation=activation if found[1] else "silu")
        gate_half, up_half = half_of(found[0]), half_of(other)
        # Each form matches 7 or 9 distinct nodes (x and the output included): a graph of more also
        # computes something else (an extra operation on x, say one in place), which the fused forward would skip.
        if gate_half and up_half and gate_half[0] is up_half[0] and gate_half[1] != up_half[1]:
            gate_up = chunked_linear(gate_half[0])
            if gate_up and gate_up != down:
                if len(nodes) != 9:
                    return f"forward computes more than its halves form: {len(nodes) - 2} operations, not 7"
                return SwiGLUGate(gate_up, None, down, gate_first=True, gate_half=gate_half[1], **proven)
        gate, up = linear_call(found[0], x), linear_call(other, x)
        if gate and up and len({gate, up, down}) == 3:
            if len(nodes) != 7:
                return f"forward computes more than down(silu(gate(x)) * up(x)): {len(nodes) - 2} operations, not 5"
            return SwiGLUGate(gate, up, down, gate_first=nodes.index(found[0]) < nodes.index(other), **proven)
    if any(n.op == "call_function" and n.target is F.silu and n.kwargs.get("inplace") for n in nodes):
        return "silu is in place (it writes into the gate's output)"
    return ("forward is not down(silu(gate(x)) * up(x)): the product is not silu(linear(x)) * linear(x) nor "
            "silu(g) * u of the halves g, u of linear(x).chunk(2, dim=-1)")


def _fused_halves_forward(mod: nn.Module, gate: SwiGLUGate, x):
    y = getattr(mod, gate.gate)(x)
    gelu_tanh = gate.activation == "gelu_tanh"
    if y.dim() >= 1 and y.shape[-1] % 2 == 0 and y.dtype in INPUT_DTYPES:
        h = (geglu_halves if gelu_tanh else swiglu_halves)(y, gate.gate_half)
    else:  # what the fused gates do not take (an odd width: the written code's own error, ...): its math
        a, b = halves(y, gate.gate_half)
        h = (F.gelu(a, approximate="tanh") if gelu_tanh else F.silu(a)) * b
    return getattr(mod, gate.down)(h)


def _fused_forward(mod: nn.Module, gate: SwiGLUGate, x):
    if gate.gate_half is not None:
        return _fused_halves_forward(mod, gate, x)
    gate_layer, up_layer = getattr(mod, gate.gate), getattr(mod, gate.up)
    if gate.gate_first:
        a = gate_layer(x)
        b = up_layer(x)
    else:
        b = up_layer(x)
        a = gate_layer(x)
    gelu_tanh = gate.activation == "gelu_tanh"
    if a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.dtype in INPUT_DTYPES:
        h = geglu(a, b) if gelu_tanh else swiglu(a, b)
    else:  # what the fused gates do not take (broadcasting, mixed dtypes, ...): the module's own math
        h = (F.gelu(a, approximate="tanh") if gelu_tanh else F.silu(a)) * b
    return getattr(mod, gate.down)(h)


class FusedGateModule(FusedModule):
    """Mixed into a proven module's class (fused_class.make_fused_class): a forward that runs the gate as
    swiglu where _call_covered says the proof covers the call."""

    _f8tensor_attr, _f8tensor_proof = GATE_ATTR, SwiGLUGate

    @staticmethod
    def _f8tensor_prove(mod: nn.Module) -> SwiGLUGate | str:
        return find_gate(mod)

    def _f8tensor_fused_forward(self, gate: SwiGLUGate, args, kwargs):
        if not _call_covered(self, gate, args, kwargs):
            return NotImplemented
        return _fused_forward(self, gate, args[0] if args else kwargs[gate.arg])
