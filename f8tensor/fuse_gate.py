"""Find SwiGLU feed-forward modules and run their gate as f8tensor.swiglu, without model changes.

A feed-forward written as

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

(torchtitan's FeedForward; Hugging Face's LlamaMLP, `down_proj(act_fn(gate_proj(x)) * up_proj(x))`
with an nn.SiLU child, is the same) computes its gate in three eager kernels each way, and the
float8 layers around it then read the gate's output and gradients again for their amax. Conversion
cannot swap that code as it swaps a module: the gate is a function call inside the user's forward.
Here conversion proves that a module's forward computes exactly down(silu(gate(x)) * up(x)) and
nothing else, and only then gives the module an instance-level forward that computes
down(swiglu(gate(x), up(x))): same parameters, state dict, hooks and module calls in the same order;
values within one unit in the last place (swiglu rounds once, eager rounds silu(a) first).

The proof, all of which must hold (otherwise the module is left alone, and why is recorded):
- the class's forward takes one positional argument, has no closure, no branch or loop, stores
  nothing but local variables, and makes exactly as many calls and binary operations as the
  traced graph has (so no call that tracing could not see, such as a print or a counter);
- torch.fx traces it (child modules as leaves) to exactly: two of its nn.Linear children on the
  input, silu of one of them (F.silu or an nn.SiLU child without hooks), its product with the
  other, the third nn.Linear child on the product, returned; each intermediate used once.
Only modules whose children are three nn.Linear and at most one nn.SiLU, and whose forward mentions
silu, are examined (tracing runs the forward once with placeholder values).
"""

import builtins
import dis
import operator
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import INPUT_DTYPES
from .swiglu import swiglu

# Set on a module whose gate was fused (a SwiGLUGate) or, for a candidate, why it was not (a str).
GATE_ATTR = "_f8tensor_swiglu"

_JUMPS = set(dis.hasjrel) | set(dis.hasjabs) | set(getattr(dis, "hasjump", ()))
_CALLS = {"CALL", "CALL_FUNCTION", "CALL_METHOD", "CALL_FUNCTION_KW", "CALL_FUNCTION_EX", "CALL_KW"}
_MULS = {operator.mul, torch.mul}


@dataclass(frozen=True)
class SwiGLUGate:
    """forward(x) = down(silu(gate(x)) * up(x)), child names; gate_first: gate(x) runs before up(x)."""
    gate: str
    up: str
    down: str
    gate_first: bool

    def __str__(self):
        return f"SwiGLU gate fused: {self.down}(silu({self.gate}) * {self.up})"


def _fused_forward(self, x):
    pattern = self.__dict__[GATE_ATTR]
    gate, up = getattr(self, pattern.gate), getattr(self, pattern.up)
    if pattern.gate_first:
        a = gate(x)
        b = up(x)
    else:
        b = up(x)
        a = gate(x)
    if a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.dtype in INPUT_DTYPES:
        h = swiglu(a, b)
    else:  # what swiglu does not take (broadcasting, mixed dtypes, ...): the module's own math
        h = F.silu(a) * b
    return getattr(self, pattern.down)(h)


def is_candidate(mod: nn.Module) -> bool:
    """Children: three nn.Linear and at most one nn.SiLU; the forward mentions silu; not yet fused."""
    children = list(mod.children())
    linears = sum(isinstance(c, nn.Linear) for c in children)
    silus = sum(type(c) is nn.SiLU for c in children)
    code = getattr(type(mod).forward, "__code__", None)
    return (linears == 3 and silus <= 1 and linears + silus == len(children) and code is not None
            and "forward" not in mod.__dict__ and (silus == 1 or "silu" in code.co_names))


def _code_reason(forward) -> str | None:
    """Why the forward's bytecode is not straight-line code of one argument that reads no global
    but torch, torch.nn, torch.nn.functional, F.silu and torch.mul (checked before tracing, which
    runs the code)."""
    code = forward.__code__
    if code.co_argcount != 2 or code.co_kwonlyargcount or code.co_flags & (0x04 | 0x08):  # *args, **kw
        return "forward does not take exactly one positional argument"
    if code.co_freevars:
        return "forward is a closure"
    for ins in dis.get_instructions(code):
        if ins.opcode in _JUMPS:
            return "forward has a branch or a loop"
        if ins.opname.startswith(("STORE_", "DELETE_", "IMPORT_")) and ins.opname != "STORE_FAST":
            return f"forward has a {ins.opname} ({ins.argval})"
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            value = forward.__globals__.get(ins.argval, getattr(builtins, ins.argval, None))
            if not any(value is ok for ok in (torch, nn, F, F.silu, torch.mul)):
                return f"forward reads the global {ins.argval!r}"
    return None


def _count(code) -> tuple[int, int]:
    calls = binops = 0
    for ins in dis.get_instructions(code):
        calls += ins.opname in _CALLS
        binops += ins.opname.startswith("BINARY_")
    return calls, binops


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return True


def find_gate(mod: nn.Module) -> SwiGLUGate | str:
    """The SwiGLU pattern of a candidate module's forward, or why it is not one."""
    code = type(mod).forward.__code__
    reason = _code_reason(type(mod).forward)
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
    if len(placeholders) != 1 or len(nodes) != 7:
        return f"forward is not down(silu(gate(x)) * up(x)): {len(nodes) - 2} operations"
    (x,) = placeholders
    children = dict(mod.named_children())

    def linear_call(n, arg) -> str | None:
        ok = (n.op == "call_module" and isinstance(children.get(n.target), nn.Linear)
              and n.args == (arg,) and not n.kwargs and len(n.users) == 1)
        return n.target if ok else None

    def silu_of(n):
        if len(n.users) != 1 or len(n.args) != 1:
            return None
        if n.op == "call_function" and n.target is F.silu and set(n.kwargs) <= {"inplace"}:
            return n.args[0]
        child = children.get(n.target) if n.op == "call_module" else None
        if type(child) is nn.SiLU and not n.kwargs and not (child._forward_hooks or child._forward_pre_hooks):
            return n.args[0]
        return None

    down_node = out.args[0] if len(out.args) == 1 else None
    down = isinstance(down_node, torch.fx.Node) and down_node.op == "call_module" and down_node.target
    product = down_node.args[0] if down and len(down_node.args) == 1 else None
    if not (isinstance(product, torch.fx.Node) and linear_call(down_node, product) and len(product.users) == 1
            and not product.kwargs and len(product.args) == 2
            and (product.op == "call_function" and product.target in _MULS
                 or product.op == "call_method" and product.target == "mul")):
        return "forward is not down(silu(gate(x)) * up(x)): no linear of a product returned"
    for act, other in (product.args, product.args[::-1]):
        gate_node = silu_of(act) if isinstance(act, torch.fx.Node) else None
        if gate_node is None or not isinstance(other, torch.fx.Node):
            continue
        gate, up = linear_call(gate_node, x), linear_call(other, x)
        if gate and up and len({gate, up, down}) == 3:
            calls, binops = _count(code)
            graph_calls = sum(n.op.startswith("call") for n in nodes) - (product.target is operator.mul)
            if (calls, binops) != (graph_calls, int(product.target is operator.mul)):
                return "forward makes calls or operations that tracing does not record"
            return SwiGLUGate(gate, up, down, gate_first=nodes.index(gate_node) < nodes.index(other))
    return "forward is not down(silu(gate(x)) * up(x)): the product is not silu(linear(x)) * linear(x)"


class FusedForward:
    """A fused module's instance-level forward. It holds the module weakly (a bound method would be
    a reference cycle: the module's memory would wait for Python's garbage collector after the last
    reference went), and pickles and deep-copies as the forward of the module's copy."""

    def __init__(self, module: nn.Module):
        self._module = weakref.ref(module)

    def __call__(self, x):
        return _fused_forward(self._module(), x)

    def __reduce__(self):
        return FusedForward, (self._module(),)

    def __repr__(self):
        return f"<fused SwiGLU forward of {type(self._module()).__name__}: {self._module().__dict__[GATE_ATTR]}>"


def fuse_gate(mod: nn.Module) -> SwiGLUGate | str:
    """Give a candidate module the fused forward if find_gate proves the pattern; record the result
    on the module (read by conversion_summary) and return it."""
    found = find_gate(mod)
    mod.__dict__[GATE_ATTR] = found
    if isinstance(found, SwiGLUGate):
        mod.forward = FusedForward(mod)
    return found
