"""The RoPE fusion of fuse_model_ops (switch `rope`): find the rotary-embedding functions a module's
forward calls and run them as f8tensor.rope, without model changes.

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
such a model and eager float8 keeps (docs/benchmarks.md). The fusion proves that such a global
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
  safe by the same walk (rotate_half), of the attributes chunk, shape, unsqueeze, cat, neg, mul,
  add, dtype, to, float, stack, flatten and repeat_interleave; slicing, subscripts, +, -, *, //,
  unary minus, tuples and lists, calls, stores to locals and the return (so tracing it runs nothing
  of the user's and writes nothing);
- torch.fx traces it to nothing but tables and rotations of its arguments, returned alone or as a
  tuple, each intermediate used only in its rotation. A rotation of an argument t by tables c, s:
    t * c + rotate_half(t) * s, rotate_half(t) = cat([-t2, t1], dim=-1), the halves t1, t2 by
      t.chunk(2, dim=-1) or by slicing at t.shape[-1] // 2 (Llama's);
    t * c + stack((-t[..., 1::2], t[..., 0::2]), dim=-1).flatten(-2) * s, the adjacent pairs
      (GLM's; rope's interleaved form);
    cat((t1 * c - t2 * s, t2 * c + t1 * s), dim=-1) by tables of half t's last dim (GPT-OSS's);
    the first two in fp32: of t.float() (Cohere's; ModernBERT's and ESM's cast t twice, once per
      term), or t.float() * c + rotate_half(t).float() * s (Ernie 4.5's); the sum's terms in either
      order (the rotated half's first: a contiguous result, as eager's);
  each as it is, or cast to an argument's dtype, .to(u.dtype) or .to(dtype=u.dtype), u.dtype read
  for such casts alone (OLMo 2's casts back to t's own; Cohere's and Ernie 4.5's cast k's to q's),
  or in the partial form cat([rotation of t[..., :R], t[..., R:]], dim=-1), R = c.shape[-1] or
  s.shape[-1] read for those slices alone (Phi-3's, GLM's), in t's own dtype. Tables: arguments,
  their unsqueezes, and either repeated per pair,
  table[..., : table.shape[-1] // 2].repeat_interleave(2, dim=-1) (GLM's, Ernie 4.5's).
Its arguments are plain (no *args, keyword-only or positional-only, none named self), with
defaults that are numbers, None or strings, and survive the rewrite with their names and defaults.
The module: its class passes core/class_swap.class_reason, and its forward (or, through decorators that
name it by __wrapped__ and keep it in a closure cell, the function they wrap), with its nested code,
neither writes nor deletes globals, names globals, exec or eval, nor defines a class (it runs with
a globals mapping of its own, which class bodies and those would bypass or expose). Modules whose
forward reads no proven function but one named like a rotary embedding (rotary, rope) are examined
too, so that the report says why they are not fused. A function that fails this proof and reads
view_as_complex (itself or in a helper) is examined in the complex form instead (rope_complex.py:
Meta's and torchtitan's apply_rotary_emb), proven per call signature.

At each call the module runs its class's own forward instead if that forward, or a function along
its __wrapped__ path, was rebound or given other code or defaults since, or under fx symbolic
tracing, torch.compile (which fuse the written code themselves) or torch.jit tracing;
torch.jit.script scripts the module as its own class. The proven name reads as the module's
current global where that is no longer the function proven (deleted: NameError, as unfused), and
runs the function as written where its code or defaults, or a helper's, or a global it read
(a helper, torch) changed. Within the forward the name reads as a stand-in for the function
(attributes read through, binds as a method, pickles as the function), not the function object:
forwards that compare it right where they read it (`is`, `==`, `in`) are left alone; an identity
test of a copy kept elsewhere would differ. Each rotation runs f8tensor.rope where it gives eager's
shape, dtype and layout (plain tensors of one floating dtype for the tables that x's dtype does not
promote, or any floating tables where the rotation, in x's dtype or in fp32, is cast to x's own
dtype; tables that broadcast to x and do not require grad, x with a contiguous last dim; an output
made contiguous where the written code's is a concatenation) and where it gains (x of at least
MIN_FUSED_NUMEL elements), and the written ops otherwise; in the partial form rope rotates the first
R dims and the concatenation runs as written, or, where R is the whole last dim, rope rotates x (no
concatenation). Values: rope's, fp32 math and one rounding, where eager rounds each of its five ops
(in fp32, or with fp32 tables cast back, eager rounds once too).
"""

import dis
import importlib
import inspect
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..fused_ops.rope import rope_checked
from ..kernels import INPUT_DTYPES
from ..core.class_swap import class_reason
from . import rope_complex
from . import rope_forms as forms
from .fused_class import (JUMPS, FusedModule, class_forward, code_of, code_unchanged, global_value,
                          globals_unchanged, tracing)

# Set on a module whose forward reads a proven rotary function (a RoPECalls) or, where it reads one
# but cannot be fused, why not (a str).
ROPE_ATTR = "_f8tensor_rope"

_PLAIN_OPS = frozenset({
    "RESUME", "NOP", "CACHE", "PRECALL", "PUSH_NULL", "KW_NAMES", "LOAD_FAST", "LOAD_FAST_CHECK",
    "LOAD_FAST_LOAD_FAST", "STORE_FAST", "STORE_FAST_LOAD_FAST", "STORE_FAST_STORE_FAST", "RETURN_VALUE",
    "BINARY_SUBSCR", "BINARY_SLICE", "BUILD_SLICE", "BUILD_TUPLE", "BUILD_LIST", "UNARY_NEGATIVE",
    "UNPACK_SEQUENCE", "CALL", "CALL_KW", "CALL_FUNCTION", "CALL_FUNCTION_KW", "CALL_METHOD", "BINARY_ADD",
    "BINARY_SUBTRACT", "BINARY_MULTIPLY", "BINARY_FLOOR_DIVIDE"})
_BINARY_OPS = frozenset({"+", "-", "*", "//"})
_ATTRIBUTES = frozenset({"chunk", "shape", "unsqueeze", "cat", "neg", "mul", "add", "dtype", "to", "float", "stack",
                         "flatten", "repeat_interleave"})
_CONSTANTS = (int, float, bool, type(None), type(Ellipsis))
_WRITES_GLOBALS = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL"})
_GLOBALS_BUILTINS = frozenset({"globals", "exec", "eval"})
_COMPARES = frozenset({"IS_OP", "COMPARE_OP", "CONTAINS_OP"})
# Below this many elements of x a rotation runs the written ops: there (decoding one token, say)
# the step is bound by host time, where rope's Triton launch gains nothing over eager's five
# kernels. At training shapes (millions of elements per q or k) the one pass saves GPU time. The
# bound is a choice between those two regimes, not a measured crossover.
MIN_FUSED_NUMEL = 1 << 20


@dataclass(frozen=True)
class RotaryFunction:
    """A proven rotary function: fn; codes, each function proven (fn and its helpers) with its code,
    defaults and the globals it read; run, fn rewritten so that each rotation runs _rotate."""
    fn: types.FunctionType
    codes: tuple[tuple[types.FunctionType, types.CodeType, tuple | None, tuple[tuple[str, object], ...]], ...]
    run: object
    rotations: int  # 0 for the complex form, whose rotations are proven per call signature


# (function, its code, its defaults) -> RotaryFunction or why not; proven once (again if a helper changed).
# state.py lists it.
PROOFS: dict[tuple, "RotaryFunction | str"] = {}


def _constant_ok(value) -> bool:
    return type(value) in _CONSTANTS or type(value) is str or type(value) is tuple and all(
        type(v) is str or type(v) in _CONSTANTS for v in value)


def _function_code_reason(fn: types.FunctionType, codes: list, depth: int = 0) -> str | None:
    """Why fn's bytecode is not the straight-line code of the module docstring; appends (fn, code,
    defaults, globals read) for fn and each helper it reads to codes."""
    code = fn.__code__
    if code.co_posonlyargcount or code.co_kwonlyargcount or code.co_flags & (
            inspect.CO_VARARGS | inspect.CO_VARKEYWORDS | inspect.CO_GENERATOR | inspect.CO_COROUTINE):
        return f"{fn.__name__} does not take plain arguments only"
    if "self" in code.co_varnames[:code.co_argcount]:  # the rewritten function's own first argument
        return f"{fn.__name__} has an argument named self"
    if not all(_constant_ok(d) for d in fn.__defaults__ or ()):
        return f"{fn.__name__} has a default other than a number, None or a string"
    if code.co_freevars or code.co_cellvars or fn.__closure__:
        return f"{fn.__name__} has a closure"
    if getattr(code, "co_exceptiontable", b""):
        return f"{fn.__name__} has a try or with block"
    instructions = list(dis.get_instructions(code))
    if any(ins.opcode in JUMPS for ins in instructions):
        return f"{fn.__name__} has a branch or a loop"
    read = []
    for ins in instructions:
        op = ins.opname
        if op == "LOAD_GLOBAL":
            name = ins.argval
            value = global_value(fn.__globals__, name)
            if value is not torch:
                if not isinstance(value, types.FunctionType) or depth >= 2:
                    return f"{fn.__name__} reads the global {name!r}"
                reason = None if any(f is value for f, *_ in codes) else _function_code_reason(value, codes, depth + 1)
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
    codes.append((fn, code, fn.__defaults__, tuple(read)))
    return None


def _rotate(x, cos, sin, halves: str, cast_to: torch.dtype | None = None, upcast: bool = False,
            x_first: bool = True):
    """x * cos + rotate_half(x) * sin as the proven function wrote it (halves: "chunk" or "slice",
    or "pairs": the adjacent pairs' form, rope's interleaved one; upcast: x in fp32 first; cast_to:
    followed by .to(cast_to); x_first: x's product is the sum's first term, as written, else the
    rotated half's, whose contiguous layout the sum then takes): f8tensor.rope where that gives
    eager's shape, dtype and layout and x is large enough to gain, the written ops otherwise. Cast back to x's own dtype, tables that
    promote x's dtype (fp32 tables for bf16 x) and an upcast x are rope's too: eager's fp32 math and
    one rounding (on the GPU the kernel may contract a product and a sum into one fused multiply-add
    where eager rounds the product: one unit in the last place of x's dtype, rarely). halves ending in
    "/half": tables of half x's last dim (GPT-OSS's cat((x1 * c - x2 * s, x2 * c + x1 * s))), each
    repeated over both halves for rope, whose output is then made contiguous as the concatenation is."""
    halves, _, half = halves.partition("/")
    if (half and type(cos) is torch.Tensor and type(sin) is torch.Tensor and cos.dim() and sin.dim()
            and type(x) is torch.Tensor and x.numel() >= MIN_FUSED_NUMEL):  # (else the written ops: no copies)
        cos, sin, written = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1), (cos, sin)
    elif half:
        written = (cos, sin)
    if (type(x) is torch.Tensor and x.numel() >= MIN_FUSED_NUMEL and type(cos) is torch.Tensor
            and type(sin) is torch.Tensor and x.dtype in INPUT_DTYPES and x.stride(-1) == 1
            and cos.dtype == sin.dtype and cos.dtype in INPUT_DTYPES
            and (cast_to == x.dtype if cast_to is not None else
                 not upcast and torch.promote_types(x.dtype, cos.dtype) == x.dtype)
            and 2 <= x.dim() <= 4 and x.shape[-1] % 2 == 0
            and cos.shape == sin.shape and 1 <= cos.dim() <= x.dim() and cos.shape[-1] == x.shape[-1]
            and not (cos.requires_grad or sin.requires_grad) and cos.device == x.device == sin.device
            and all(c in (1, d) for c, d in zip(cos.shape[::-1], x.shape[::-1]))):
        out = rope_checked(x, cos, sin, halves == "pairs")
        return out.contiguous() if half or not x_first else out  # the layout of the written cat or sum
    x = x.float() if upcast else x
    if half:  # as written: the halves by the half-width tables
        x1, x2 = x.chunk(2, dim=-1) if halves == "chunk" else (x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:])
        cos, sin = written
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(cast_to) if cast_to is not None else out
    if halves == "pairs":
        rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    else:
        if halves == "chunk":
            x1, x2 = x.chunk(2, dim=-1)
        else:
            x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        rotated = torch.cat((-x2, x1), dim=-1)
    out = x * cos + rotated * sin if x_first else rotated * sin + x * cos
    return out.to(cast_to) if cast_to is not None else out


def _broadcasts_to(shape, *tables) -> bool:
    """The tables broadcast to shape without widening it (else the written concatenation raises)."""
    try:
        return torch.broadcast_shapes(shape, *(t.shape for t in tables)) == shape
    except RuntimeError:
        return False


def _rotate_partial(x, cos, sin, halves: str, width_of_sin: bool):
    """torch.cat([x[..., :R] * cos + rotate_half(x[..., :R]) * sin, x[..., R:]], dim=-1), R =
    cos.shape[-1] (sin's where width_of_sin; Phi-3's partial rotary), as the proven function wrote
    it: where R is x's whole last dim (nothing passes through) and the tables do not broadcast x to
    a larger shape, the rotation of x through _rotate, made contiguous as the concatenation's result
    is; otherwise the rotated part through _rotate and the concatenation as written."""
    width = (sin if width_of_sin else cos).shape[-1]
    if width == x.shape[-1] and _broadcasts_to(x.shape, cos, sin):
        return _rotate(x, cos, sin, halves).contiguous()
    return torch.cat([_rotate(x[..., :width], cos, sin, halves), x[..., width:]], dim=-1)


def prove_function(fn) -> RotaryFunction | str:
    """fn's proof (cached per function and code) as a RotaryFunction, or why it is not one."""
    key = (fn, fn.__code__, fn.__defaults__)
    proof = PROOFS.get(key)
    if proof is None or isinstance(proof, RotaryFunction) and not _function_unchanged(proof):
        proof = PROOFS[key] = _prove_function(fn)
    return proof


def _prove_function(fn) -> RotaryFunction | str:
    codes = []
    reason = _function_code_reason(fn, codes)
    if reason:
        return _prove_complex(fn, reason)
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
    widths, dtypes = set(), set()  # R = table.shape[-1] of the partial form, u.dtype of the casts back
    for result in returned:
        cast = forms.cast_back(result)  # rotation.to(u.dtype)
        add, dtype_read = cast if cast else (result, None)
        partial = None if cast or not isinstance(add, torch.fx.Node) else forms.partial(add)
        if partial:  # cat([rotation of x[..., :R], x[..., R:]], dim=-1)
            add = partial[0]
        found = (forms.rotation(add) or forms.half_table_rotation(add)) if isinstance(add, torch.fx.Node) else None
        if found is None:
            return f"{fn.__name__} returns something other than rotations x * cos + rotate_half(x) * sin"
        t, c, s, form, inner, upcast, x_first = found
        if partial and form.endswith("/half"):
            return f"{fn.__name__} concatenates a rotation by half-width tables with the rest of its argument"
        if partial:
            x, rest, width = partial[1:]
            if upcast or forms.upcast_of(x) is not None:  # _rotate_partial rotates in x's own dtype
                return f"{fn.__name__} rotates part of its argument in fp32 (the partial form is fused in x's dtype)"
            if not (forms.slice_of(t, x, None, width) and forms.width_read(width, (c, s))):  # R: c's or s's last dim
                return (f"{fn.__name__} concatenates a rotation with something other than the rest of its "
                        "argument past the width of a table argument")
            inner = inner | {t, rest}
            widths.add(width)
            t = x
        if not upcast and forms.upcast_of(t) is not None:  # the rotation of u.float() (Cohere's)
            inner, t, upcast = inner | {t}, forms.upcast_of(t), True
        table_nodes = [forms.table(c, placeholders), forms.table(s, placeholders)]
        if t not in placeholders or None in table_nodes or t in (c, s):
            return f"{fn.__name__} rotates something other than an argument by tables"
        if cast and dtype_read.args[0] not in placeholders:
            return f"{fn.__name__} casts a rotation to the dtype of something other than an argument"
        if any(u not in inner and u is not add and u is not result for n in inner for u in n.users) or set(
                add.users) != {result if cast or partial else out} or set(result.users) != {out}:
            return f"{fn.__name__} uses a rotation's intermediate values elsewhere"
        # the partial form: whether R is read off s (else c); None: not the partial form
        width_of_sin = None if partial is None else width.args[0].args[0] is s and s is not c
        rotations.append((result, t, c, s, form, dtype_read, upcast, x_first, width_of_sin))
        covered |= inner | {add, result} | table_nodes[0] | table_nodes[1] | ({dtype_read} if cast else set())
        dtypes |= {dtype_read} if cast else set()
    for read in widths | dtypes:  # read for the rotations' slices or casts alone (q's and k's may share it)
        if not set(read.users) <= covered:
            return f"{fn.__name__} uses a rotation's intermediate values elsewhere"
        covered |= {read, read.args[0]} if read in widths else {read}
    if set(nodes) - covered:
        return f"{fn.__name__} computes more than its rotations"
    for result, t, c, s, form, dtype_read, upcast, x_first, width_of_sin in rotations:
        with graph.inserting_before(result):
            fused = graph.call_function(*((_rotate, (t, c, s, form, dtype_read, upcast, x_first))
                                          if width_of_sin is None else
                                          (_rotate_partial, (t, c, s, form, width_of_sin))))
        result.replace_all_uses_with(fused)
    graph.eliminate_dead_code()
    run = torch.fx.GraphModule(nn.Module(), graph).forward
    if inspect.signature(run) != inspect.signature(fn):  # fx renames arguments named like builtins
        return f"{fn.__name__}'s arguments do not survive rewriting: {inspect.signature(fn)}"
    return RotaryFunction(fn, tuple(codes), run, len(rotations))


def _reads_view_as_complex(code: types.CodeType) -> bool:
    return any(ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and ins.argval == "view_as_complex"
               for c in _code_objects(code) for ins in dis.get_instructions(c))


def _prove_complex(fn, reason: str) -> RotaryFunction | str:
    """fn proven in the complex form (rope_complex.py), if it or a function it reads calls view_as_complex;
    else reason, why it is not the rotate_half form."""
    codes = []
    complex_reason = rope_complex.function_reason(fn, codes)
    if not any(_reads_view_as_complex(code) for _, code, _, _ in codes) and not _reads_view_as_complex(fn.__code__):
        return reason
    if complex_reason:
        return f"{reason}; in the complex form, {complex_reason}"
    return RotaryFunction(fn, tuple(codes), rope_complex.ComplexRun(fn), 0)


def _function_unchanged(fn: RotaryFunction) -> bool:
    """fn and its helpers still have the code and defaults proven, and read the same globals."""
    return all(f.__code__ is code and f.__defaults__ is defaults and globals_unchanged(f.__globals__, read)
               for f, code, defaults, read in fn.codes)


class _FusedCall:
    """What a fused forward reads for a proven name while the module's global is the function
    proven: called, the rewritten function while the function and its helpers are unchanged, the
    function itself otherwise. It stands in for the function elsewhere too: attributes read
    through, it binds as a method as a function does, and pickles as the function; only an
    identity test (`is`) tells them apart."""

    def __init__(self, fn: RotaryFunction):
        self._f8tensor_fn = fn
        self.__wrapped__ = fn.fn  # inspect.signature reads through

    def __call__(self, *args, **kwargs):
        fn = self._f8tensor_fn
        if _function_unchanged(fn):
            return fn.run(*args, **kwargs)
        return fn.fn(*args, **kwargs)

    def __getattr__(self, name):  # __name__, __code__, __defaults__, ...: the function's
        if name.startswith("_f8tensor_"):
            raise AttributeError(name)
        return getattr(self._f8tensor_fn.fn, name)

    def __get__(self, obj, cls=None):
        return self if obj is None else types.MethodType(self, obj)

    def __reduce__(self):  # as pickle stores a function: by its module and name
        fn = self._f8tensor_fn.fn
        return _function_by_name, (fn.__module__, fn.__qualname__)


def _function_by_name(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# The module attributes a fused forward's globals hold themselves (the import system reads
# __package__ / __spec__ / __name__ from them for relative imports, at C level).
_MODULE_DUNDERS = ("__builtins__", "__name__", "__package__", "__spec__", "__path__", "__file__", "__loader__")


class _Globals(dict):
    """A fused forward's globals: the module's dunder attributes, and every other name read from
    the module's globals at each access; a proven name, while the module's global is still the
    function proven, reads as its _FusedCall."""

    def __init__(self, module_globals: dict, fused: dict):
        super().__init__({k: module_globals[k] for k in _MODULE_DUNDERS if k in module_globals})
        self.module_globals, self.fused = module_globals, fused

    def __missing__(self, name):
        value = self.module_globals[name]  # KeyError: then builtins, or NameError, as for the module
        fused = self.fused.get(name)
        return fused if fused is not None and value is fused._f8tensor_fn.fn else value


@dataclass(frozen=True)
class RoPECalls:
    """A module whose class forward reads proven rotary functions by these global names: chain, the
    class forward and each function along its __wrapped__ path (with code_of it: its code and defaults,
    and the closure cell that holds the next one), as proven; run, the same code run with _Globals
    (for decorated forwards, the decorators' functions rebuilt around it)."""
    names: tuple[str, ...]
    chain: tuple[tuple[types.FunctionType, tuple, int | None], ...]
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


def named_like_rotary(name: str) -> bool:
    """Whether a global function's name says it applies a rotary embedding (rotary, rope)."""
    return "rotary" in name.lower() or "rope" in name.lower()


def is_rope_candidate(mod: nn.Module) -> bool:
    """A module, not already fused, whose class forward reads a global function proven rotary, or
    named like one (then examined to record why it is not fused)."""
    if isinstance(mod, FusedModule):
        return False
    return any(isinstance(p, RotaryFunction) or named_like_rotary(name) for name, p in rotary_names(mod).items())


def find_rope_calls(mod: nn.Module) -> RoPECalls | str:
    """The fused forward of a module whose class forward reads proven rotary functions, or why not."""
    cls = type(mod)
    reason = class_reason(mod, cls)
    if reason:
        return reason
    forward = class_forward(cls)
    names = rotary_names(mod)
    proven = {name: p for name, p in names.items() if isinstance(p, RotaryFunction)}
    if not proven:
        reasons = "; ".join(f"{name}: {p}" for name, p in names.items() if named_like_rotary(name))
        return f"its forward reads no rotary function proven ({reasons or 'none named like one'})"
    inner, path = _inner_function(forward)
    for code in _code_objects(inner.__code__):
        instructions = [ins for ins in dis.get_instructions(code) if ins.opname not in ("CACHE", "EXTENDED_ARG")]
        for i, ins in enumerate(instructions):
            if ins.opname == "LOAD_GLOBAL" and ins.argval in proven and any(
                    later.opname in _COMPARES for later in instructions[i + 1:i + 3]):
                return f"forward compares {ins.argval} (it would see the fused callable, not the function)"
            if ins.opname in _WRITES_GLOBALS or ins.opname == "LOAD_GLOBAL" and ins.argval in _GLOBALS_BUILTINS:
                return f"forward writes or reads its globals as a mapping ({ins.opname} {ins.argval})"
            if ins.opname == "LOAD_BUILD_CLASS":  # a class body reads globals at C level, past the mapping
                return "forward defines a class"
    chain, fn = [], forward
    for index in path + [None]:
        chain.append((fn, code_of(fn), index))
        fn = fn.__closure__[index].cell_contents if index is not None else None
    fused = {name: _FusedCall(p) for name, p in proven.items()}
    return RoPECalls(tuple(sorted(proven)), tuple(chain),
                     _rebuild(forward, path, _Globals(inner.__globals__, fused)))


def _chain_unchanged(forward, chain) -> bool:
    """The class forward, and each function along its __wrapped__ path, are those proven."""
    fn = forward
    for proven, code, index in chain:
        if fn is not proven or not code_unchanged(fn, code):
            return False
        if index is not None:
            cells = fn.__closure__
            fn = cells[index].cell_contents if cells and index < len(cells) else None
    return True


class FusedRoPEModule(FusedModule):
    """Mixed into a proven module's class (fused_class.make_fused_class): the class's forward code, run with
    the rotary functions it calls fused."""

    _f8tensor_attr, _f8tensor_proof = ROPE_ATTR, RoPECalls

    @staticmethod
    def _f8tensor_prove(mod: nn.Module) -> RoPECalls | str:
        return find_rope_calls(mod)

    def _f8tensor_fused_forward(self, calls: RoPECalls, args, kwargs):
        if tracing() or not _chain_unchanged(self._f8tensor_base.forward, calls.chain):
            return NotImplemented
        return calls.run(self, *args, **kwargs)
