"""Find the rotary-embedding functions a module's forward calls and run them as f8tensor.rope,
without model changes.

Hugging Face's Llama family rotates q and k with module-level functions that its attention forward
calls by their global names:

    def rotate_half(x):
        x1 = x[..., : x.shape[-1] // 2]
        x2 = x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        cos = cos.unsqueeze(unsqueeze_dim)
        sin = sin.unsqueeze(unsqueeze_dim)
        q_embed = (q * cos) + (rotate_half(q) * sin)
        k_embed = (k * cos) + (rotate_half(k) * sin)
        return q_embed, k_embed

(one tensor at a time, with x.chunk(2, dim=-1) for the halves, is the same). In eager mode that is
five strided kernels each way per tensor, the largest elementwise cost torch.compile removes from
such a model and eager float8 keeps (docs/benchmarks.md). Conversion proves that such a global
function computes nothing but rotations x * cos + rotate_half(x) * sin of its arguments and returns
them, and then gives each module whose class forward reads the function by its global name a
same-named subclass (fused_class.py) whose forward is the class's own code, run with a globals
mapping that reads through to the module's globals at each access except for that name, which it
binds to the function rewritten so that each rotation runs f8tensor.rope. The rest of the forward,
branches and all, runs as written.

The proof of a function, all of which must hold (otherwise nothing is changed, and modules that read
it record why):
- its bytecode, instruction by instruction: a plain function of positional-or-keyword arguments,
  no closure, no try or with block, no branch or loop, and nothing but loads of its arguments, locals
  and constants (numbers, None, Ellipsis, keyword names), of torch, of global functions proven
  safe by the same walk (rotate_half), of the attributes chunk, shape, unsqueeze, cat, neg, mul and
  add; slicing, subscripts, +, -, *, //, unary minus, tuples and lists, calls, stores to locals and
  the return (so tracing it runs nothing of the user's and writes nothing);
- torch.fx traces it to nothing but unsqueezes of arguments and rotations
  t * c + cat([-second_half(t), first_half(t)], dim=-1) * s of an argument t by tables c and s
  (arguments, or their unsqueezes), with the halves taken by t.chunk(2, dim=-1) or by slicing at
  t.shape[-1] // 2, each intermediate used only in its rotation, returned alone or as a tuple.
The module: its class passes fused_class.class_reason, and its forward (or, through decorators that
name it by __wrapped__ and keep it in a closure cell, the function they wrap), with its nested code,
neither writes nor deletes globals, nor names globals, exec or eval (it runs with a globals mapping
of its own).

At each call the module runs its class's own forward instead if that forward (its code, defaults)
was rebound since, or under fx symbolic tracing or torch.compile (which fuse the written code
themselves). The rebound name runs the module's current global instead if that is no longer the
function proven, or the function's code or a global it read (a helper, torch) changed. Each rotation
runs f8tensor.rope where it gives eager's shape and dtype (plain tensors of one floating dtype for
the tables that x's dtype does not promote, tables that broadcast to x and do not require grad)
and the written ops otherwise. Values: rope's, fp32 math and one rounding, where eager rounds each
of its five ops.
"""

import builtins
import dis
import inspect
import operator
import types
from dataclasses import dataclass

import torch
from torch import nn

from .fused_class import FusedModule, class_forward, class_reason, fuse, tracing
from .kernels import INPUT_DTYPES
from .rope import rope

# Set on a module whose forward reads a proven rotary function (a RoPECalls) or, where it reads one
# but cannot be fused, why not (a str).
ROPE_ATTR = "_f8tensor_rope"

_JUMPS = set(dis.hasjrel) | set(dis.hasjabs) | set(getattr(dis, "hasjump", ()))
_PLAIN_OPS = {
    "RESUME", "NOP", "CACHE", "PRECALL", "PUSH_NULL", "KW_NAMES", "LOAD_FAST", "LOAD_FAST_CHECK",
    "LOAD_FAST_LOAD_FAST", "STORE_FAST", "STORE_FAST_LOAD_FAST", "STORE_FAST_STORE_FAST", "RETURN_VALUE",
    "BINARY_SUBSCR", "BINARY_SLICE", "BUILD_SLICE", "BUILD_TUPLE", "BUILD_LIST", "UNARY_NEGATIVE",
    "UNPACK_SEQUENCE", "CALL", "CALL_KW", "CALL_FUNCTION", "CALL_FUNCTION_KW", "CALL_METHOD", "BINARY_ADD",
    "BINARY_SUBTRACT", "BINARY_MULTIPLY", "BINARY_FLOOR_DIVIDE"}
_BINARY_OPS = {"+", "-", "*", "//"}
_ATTRIBUTES = {"chunk", "shape", "unsqueeze", "cat", "neg", "mul", "add"}
_CONSTANTS = (int, float, bool, type(None), type(Ellipsis))
_WRITES_GLOBALS = {"STORE_GLOBAL", "DELETE_GLOBAL"}
_GLOBALS_BUILTINS = {"globals", "exec", "eval"}
_ADDS = {operator.add, torch.add}
_MULS = {operator.mul, torch.mul}
_NEGS = {operator.neg, torch.neg}


@dataclass(frozen=True)
class RotaryFunction:
    """A proven rotary function: fn, the code proven (its own and its helpers', each with the globals it
    read) and run, fn rewritten so that each rotation runs _rotate."""
    fn: types.FunctionType
    codes: tuple[tuple[types.FunctionType, types.CodeType, tuple[tuple[str, object], ...]], ...]
    run: object
    rotations: int


# (function, its code) -> RotaryFunction or why not; proven once.
_PROOFS: dict[tuple, "RotaryFunction | str"] = {}


def _constant_ok(value) -> bool:
    return type(value) in _CONSTANTS or type(value) is tuple and all(
        type(v) is str or type(v) in _CONSTANTS for v in value)


def _code_reason(fn: types.FunctionType, codes: list, depth: int = 0) -> str | None:
    """Why fn's bytecode is not the straight-line code of the module docstring; appends (fn, code,
    globals read) for fn and each helper it reads to codes."""
    code = fn.__code__
    if code.co_posonlyargcount or code.co_kwonlyargcount or code.co_flags & (
            inspect.CO_VARARGS | inspect.CO_VARKEYWORDS | inspect.CO_GENERATOR | inspect.CO_COROUTINE):
        return f"{fn.__name__} does not take plain arguments only"
    if code.co_freevars or code.co_cellvars or fn.__closure__:
        return f"{fn.__name__} has a closure"
    if getattr(code, "co_exceptiontable", b""):
        return f"{fn.__name__} has a try or with block"
    instructions = list(dis.get_instructions(code))
    if any(ins.opcode in _JUMPS for ins in instructions):
        return f"{fn.__name__} has a branch or a loop"
    read = []
    for ins in instructions:
        op = ins.opname
        if op == "LOAD_GLOBAL":
            name = ins.argval
            value = fn.__globals__[name] if name in fn.__globals__ else getattr(builtins, name, None)
            if value is not torch:
                if not isinstance(value, types.FunctionType) or depth >= 2:
                    return f"{fn.__name__} reads the global {name!r}"
                reason = None if any(f is value for f, _, _ in codes) else _code_reason(value, codes, depth + 1)
                if reason:
                    return reason
            read.append((name, value))
        elif op in ("LOAD_ATTR", "LOAD_METHOD"):
            if ins.argval not in _ATTRIBUTES:
                return f"{fn.__name__} reads .{ins.argval}"
        elif op in ("LOAD_CONST", "RETURN_CONST"):
            if not _constant_ok(ins.argval):
                return f"{fn.__name__} uses the constant {ins.argval!r}"
        elif op == "BINARY_OP":
            if ins.argrepr not in _BINARY_OPS:
                return f"{fn.__name__} computes {ins.argrepr}"
        elif op not in _PLAIN_OPS:
            return f"{fn.__name__} does more than rotate its arguments: {op} {ins.argrepr}".rstrip()
    codes.append((fn, code, tuple(read)))
    return None


def _is(n, targets, method) -> bool:
    return isinstance(n, torch.fx.Node) and (
        n.op == "call_function" and n.target in targets or n.op == "call_method" and n.target == method)


def _half_length(n, t) -> bool:
    """n is t.shape[-1] // 2."""
    if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is operator.floordiv
            and n.args[1:] == (2,) and not n.kwargs):
        return False
    last = n.args[0]
    if not (isinstance(last, torch.fx.Node) and last.op == "call_function" and last.target is operator.getitem
            and last.args[1:] == (-1,)):
        return False
    shape = last.args[0]
    return (isinstance(shape, torch.fx.Node) and shape.op == "call_function" and shape.target is builtins.getattr
            and shape.args == (t, "shape"))


def _halves(first, second):
    """(t, "chunk" or "slice", the nodes that compute them) if first and second are the halves of t, else None."""
    if not all(isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is operator.getitem
               and len(n.args) == 2 and not n.kwargs for n in (first, second)):
        return None
    (src1, i1), (src2, i2) = first.args, second.args
    if (src1 is src2 and (i1, i2) == (0, 1) and _is(src1, {torch.chunk}, "chunk") and src1.args
            and (tuple(src1.args[1:]), src1.kwargs) in (((2,), {"dim": -1}), ((2, -1), {}))
            and set(src1.users) == {first, second}):
        return src1.args[0], "chunk", {src1}
    if src1 is src2 and type(i1) is tuple and type(i2) is tuple and len(i1) == len(i2) == 2 and (
            i1[0] is Ellipsis and i2[0] is Ellipsis):
        s1, s2 = i1[1], i2[1]
        if (isinstance(s1, slice) and isinstance(s2, slice) and s1.start is None and s1.step is None
                and s2.stop is None and s2.step is None and _half_length(s1.stop, src1)
                and _half_length(s2.start, src1)):
            lengths = {s1.stop, s2.start}
            nodes = set(lengths) | {a for n in lengths for a in (n.args[0], n.args[0].args[0])}
            return src1, "slice", nodes
    return None


def _rotation(add):
    """(t, c, s, halves form, the nodes of the rotation) if add is t * c + rotate_half(t) * s, else None."""
    if not (_is(add, _ADDS, "add") and len(add.args) == 2 and not add.kwargs):
        return None
    for m1, m2 in (add.args, add.args[::-1]):
        if not all(_is(m, _MULS, "mul") and len(m.args) == 2 and not m.kwargs for m in (m1, m2)):
            continue
        for cat, s in (m2.args, m2.args[::-1]):
            if not (_is(cat, {torch.cat}, "cat") and cat.op == "call_function" and len(cat.args) >= 1
                    and (cat.args[1:], cat.kwargs) in (((-1,), {}), ((), {"dim": -1}))):
                continue
            parts = cat.args[0]
            if not (isinstance(parts, (tuple, list)) and len(parts) == 2 and _is(parts[0], _NEGS, "neg")
                    and len(parts[0].args) == 1 and not parts[0].kwargs):
                continue
            found = _halves(parts[1], parts[0].args[0])
            if found is None:
                continue
            t, form, nodes = found
            for a, c in (m1.args, m1.args[::-1]):
                if a is t and c is not t:
                    return t, c, s, form, nodes | {m1, m2, cat, parts[0], parts[1], parts[0].args[0]}
    return None


def _table(n, placeholders) -> bool:
    return n in placeholders or (_is(n, {torch.unsqueeze}, "unsqueeze") and n.args and n.args[0] in placeholders
                                 and len(n.args) + len(n.kwargs) == 2)


def _rotate(x, cos, sin, halves: str):
    """x * cos + rotate_half(x) * sin as the proven function wrote it (halves: "chunk" or "slice"):
    f8tensor.rope where that gives eager's shape and dtype, the written ops otherwise."""
    if (type(x) is torch.Tensor and type(cos) is torch.Tensor and type(sin) is torch.Tensor
            and x.dtype in INPUT_DTYPES and cos.dtype == sin.dtype and cos.dtype in INPUT_DTYPES
            and torch.promote_types(x.dtype, cos.dtype) == x.dtype and 2 <= x.dim() <= 4 and x.shape[-1] % 2 == 0
            and cos.shape == sin.shape and cos.shape[-1] == x.shape[-1] and not (cos.requires_grad or sin.requires_grad)
            and cos.device == x.device == sin.device and cos.dim() <= x.dim()
            and all(c in (1, d) for c, d in zip(cos.shape[::-1], x.shape[::-1]))):
        return rope(x, cos, sin)
    if halves == "chunk":
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def prove_function(fn) -> RotaryFunction | str:
    """fn's proof (cached per function and code) as a RotaryFunction, or why it is not one."""
    key = (fn, fn.__code__)
    if key not in _PROOFS:
        _PROOFS[key] = _prove_function(fn)
    return _PROOFS[key]


def _prove_function(fn) -> RotaryFunction | str:
    codes = []
    reason = _code_reason(fn, codes)
    if reason:
        return reason
    tracer = torch.fx.Tracer()
    try:
        graph = tracer.trace(fn)
    except Exception as e:  # noqa: BLE001 (any failure to trace means: not provably rotations)
        return f"{fn.__name__} could not be traced ({type(e).__name__}: {e})"
    finally:
        tracer.__dict__.clear()
    nodes = list(graph.nodes)
    placeholders = {n for n in nodes if n.op == "placeholder"}
    (out,) = [n for n in nodes if n.op == "output"]
    returned = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    rotations, covered = [], set(placeholders) | {out}
    for add in returned:
        found = _rotation(add) if isinstance(add, torch.fx.Node) else None
        if found is None:
            return f"{fn.__name__} returns something other than rotations x * cos + rotate_half(x) * sin"
        t, c, s, form, inner = found
        if t not in placeholders or not (_table(c, placeholders) and _table(s, placeholders)) or t in (c, s):
            return f"{fn.__name__} rotates something other than an argument by tables"
        if any(u not in inner and u is not add for n in inner for u in n.users) or set(add.users) != {out}:
            return f"{fn.__name__} uses a rotation's intermediate values elsewhere"
        rotations.append((add, t, c, s, form))
        covered |= inner | {add} | {n for n in (c, s) if n not in placeholders}
    if set(nodes) - covered:
        return f"{fn.__name__} computes more than its rotations"
    for add, t, c, s, form in rotations:
        with graph.inserting_before(add):
            fused = graph.call_function(_rotate, (t, c, s, form))
        add.replace_all_uses_with(fused)
    graph.eliminate_dead_code()
    run = torch.fx.GraphModule(nn.Module(), graph).forward
    return RotaryFunction(fn, tuple(codes), run, len(rotations))


def _still_proven(fn: RotaryFunction) -> bool:
    return all(f.__code__ is code and all(
        f.__globals__.get(name, getattr(builtins, name, None)) is value for name, value in read)
        for f, code, read in fn.codes)


_UNBOUND = object()


class _FusedCall:
    """What a fused forward's global `name` is bound to: the rewritten function while the module's
    global is still the function proven and unchanged, the module's global otherwise."""

    def __init__(self, module_globals: dict, name: str, fn: RotaryFunction):
        self.module_globals, self.name, self.fn = module_globals, name, fn
        self.__wrapped__ = fn.fn  # inspect.signature, __name__ and the like read through
        self.__name__, self.__qualname__, self.__doc__ = fn.fn.__name__, fn.fn.__qualname__, fn.fn.__doc__

    def __call__(self, *args, **kwargs):
        current = self.module_globals.get(self.name, _UNBOUND)
        if current is _UNBOUND:
            raise NameError(f"name {self.name!r} is not defined")
        if current is self.fn.fn and _still_proven(self.fn):
            return self.fn.run(*args, **kwargs)
        return current(*args, **kwargs)


class _Globals(dict):
    """A fused forward's globals: its own entries (the fused names, __builtins__, __name__), and
    every other name read from the module's globals at each access."""

    def __init__(self, module_globals: dict, own: dict):
        super().__init__(own)
        self.module_globals = module_globals

    def __missing__(self, name):
        return self.module_globals[name]


@dataclass(frozen=True)
class RoPECalls:
    """A module whose class forward reads proven rotary functions by these global names: forward,
    the code proven; run, the same code run with _Globals (for decorated forwards, the decorator's
    function rebuilt around it)."""
    names: tuple[str, ...]
    forward: types.FunctionType
    code: types.CodeType
    run: types.FunctionType

    def __str__(self):
        return f"RoPE fused: {', '.join(self.names)} run as f8tensor.rope"


def _code_objects(code: types.CodeType):
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _code_objects(c)


def _inner_function(forward: types.FunctionType):
    """The function that holds the forward's code: forward, or what decorators that keep it in a
    closure cell and name it by __wrapped__ wrap (path of closure cell indices to it)."""
    fn, path = forward, []
    while isinstance(getattr(fn, "__wrapped__", None), types.FunctionType) and fn.__closure__:
        cells = [i for i, cell in enumerate(fn.__closure__) if cell.cell_contents is fn.__wrapped__]
        if len(cells) != 1:
            break
        path.append(cells[0])
        fn = fn.__wrapped__
    return fn, path


def _rebuild(fn: types.FunctionType, path: list, inner_globals: dict):
    """fn with the function at the end of path (closure cells) run with inner_globals."""
    if not path:
        new = types.FunctionType(fn.__code__, inner_globals, fn.__name__, fn.__defaults__, fn.__closure__)
    else:
        cells = list(fn.__closure__)
        cells[path[0]] = types.CellType(_rebuild(cells[path[0]].cell_contents, path[1:], inner_globals))
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__ = fn.__qualname__
    return new


def rotary_names(mod: nn.Module) -> dict:
    """Global names the module's class forward (through decorators that wrap it) reads that are bound
    to plain functions, and each one's proof or why not."""
    forward = class_forward(type(mod))
    if forward is None:
        return {}
    inner, _ = _inner_function(forward)
    names = {ins.argval for code in _code_objects(inner.__code__) for ins in dis.get_instructions(code)
             if ins.opname == "LOAD_GLOBAL"}
    module_globals = inner.__globals__
    return {name: prove_function(module_globals[name]) for name in sorted(names)
            if isinstance(module_globals.get(name), types.FunctionType)
            and module_globals[name].__code__ is not inner.__code__}


def is_candidate(mod: nn.Module) -> bool:
    """A module, not already fused, whose class forward reads a global function proven rotary."""
    if isinstance(mod, FusedModule):
        return False
    return any(isinstance(p, RotaryFunction) for p in rotary_names(mod).values())


def find_rope_calls(mod: nn.Module) -> RoPECalls | str:
    """The fused forward of a module whose class forward reads proven rotary functions, or why not."""
    cls = type(mod)
    reason = class_reason(mod, cls)
    if reason:
        return reason
    forward = class_forward(cls)
    proven = {name: p for name, p in rotary_names(mod).items() if isinstance(p, RotaryFunction)}
    if not proven:
        return "its forward reads no rotary function proven"
    inner, path = _inner_function(forward)
    for code in _code_objects(inner.__code__):
        for ins in dis.get_instructions(code):
            if ins.opname in _WRITES_GLOBALS or ins.opname == "LOAD_GLOBAL" and ins.argval in _GLOBALS_BUILTINS:
                return f"forward writes or reads its globals as a mapping ({ins.opname} {ins.argval})"
    module_globals = inner.__globals__
    own = {"__builtins__": module_globals.get("__builtins__", builtins), "__name__": module_globals.get("__name__")}
    own.update({name: _FusedCall(module_globals, name, p) for name, p in proven.items()})
    return RoPECalls(tuple(sorted(proven)), forward, forward.__code__,
                     _rebuild(forward, path, _Globals(module_globals, own)))


class FusedRoPEModule(FusedModule):
    """Mixed into a proven module's class (fused_class.fused_class): the class's forward code, run with
    the rotary functions it calls fused."""

    ATTR, PROOF = ROPE_ATTR, RoPECalls

    @staticmethod
    def prove(mod: nn.Module) -> RoPECalls | str:
        return find_rope_calls(mod)

    def fused_forward(self, calls: RoPECalls, args, kwargs):
        forward = self._f8tensor_base.forward
        if (forward is not calls.forward or forward.__code__ is not calls.code
                or forward.__defaults__ is not calls.run.__defaults__
                or forward.__kwdefaults__ is not calls.run.__kwdefaults__ or tracing()):
            return NotImplemented
        return calls.run(self, *args, **kwargs)


def fuse_rope(mod: nn.Module) -> RoPECalls | str:
    """Make a candidate module's class the fused one if find_rope_calls proves it; record the result
    on the module (read by conversion_summary) and return it."""
    return fuse(mod, FusedRoPEModule)
