"""The complex form of the RoPE fusion (rope_proof.py): rotary functions that rotate adjacent pairs
as complex numbers, as Meta's Llama 3 and torchtitan write them:

    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    freqs_cis = <freqs_cis sliced to the sequence and viewed as [1, S, 1, D / 2]>
    return torch.view_as_real(xq_ * freqs_cis).flatten(3).type_as(xq)      (and likewise for xk)

In eager mode that is a cast, a complex multiply and a cast back per tensor each way, the RoPE cost
torch.compile removes. Such code usually asserts on shapes and builds the broadcast shape with a
list comprehension: it branches and loops on shapes, which symbolic tracing cannot follow. So the
proof has two parts, both of which must hold:

- once per function (again if its code, defaults or a helper change, as for the rotate_half form):
  its bytecode, and that of every function it defines or reads by a global name, reads nothing but
  arguments, locals, cells of its own nested code, constants, `torch`, the builtins of
  SAFE_BUILTINS and the attributes of ATTRIBUTES (shape and device queries, views, casts, the
  complex views; a move to x's own device, as DeepSeek-V2's `.to(xq_.device)`, traces to nothing),
  and stores nothing but locals and those cells: no global, attribute or item writes, no try or with
  block, no imports, no closure over outer scopes. Running it on fake tensors therefore runs nothing
  of the user's and changes nothing outside its own tensors (an in-place operator such as `+=`
  passes the walk; the trace then shows it, and such a function is not fused).
- once per call signature (each argument a plain tensor, not a lazily conjugated or negated view:
  shape, strides, dtype, device, requires_grad, and which arguments are the same tensor; an fp32
  argument at an odd storage offset, which view_as_complex refuses, is never traced): torch.fx's
  make_fx traces it on fake tensors of that signature (its branches and loops run on those shapes) to ATen ops,
  with none of the caller's dispatch modes seeing them (selective activation checkpointing's would
  record ops of its own into the trace), which must be exactly, for each value returned, an
  argument x rotated by a table t:
      x, cast to fp32 unless it is fp32, viewed as x.shape[:-1] + [D / 2, 2], view_as_complex,
      times t (in either order; the product has x's complex shape and dtype complex64),
      view_as_real, viewed back to x's shape, cast to x's dtype unless that is fp32,
  with t a chain of views (slice, view, unsqueeze, squeeze, select, alias) of an argument of dtype
  complex64, and nothing else computed; each intermediate of x's chain used only there.

A proven signature runs each rotation as f8tensor.rope(x, cos, sin, interleaved=True), cos and sin the
real and imaginary parts of t (the chain of views replayed on the argument), each repeated twice
along the last dim, where x is contiguous with at least MIN_FUSED_NUMEL elements, t has D / 2
entries in its last dim (no broadcasting over the pairs) and does not require grad, and the written
result has x's strides (rope's layout; a product with the table first takes the table's);
a value returned twice is one tensor returned twice, as written. Otherwise the function runs as
written: for every call that is not all plain tensors, and untraced where no bf16, fp16 or fp32
argument has MIN_FUSED_NUMEL elements or an fp32 one sits at an odd storage offset (view_as_complex
raises there, as written). A signature whose trace is not of that form runs the function as
written, with one FusionWarning per function and reason. The proofs of the last MAX_PLANS
signatures called are kept. Values: rope's, fp32 math of the same products and sums
(x1 c - x2 s, x2 c + x1 s) and one rounding to x's dtype, as the written code computes them; a
complex multiply may contract a product and a sum into one fused multiply-add where rope does not,
or the reverse, so results agree within one unit in the last place of x's dtype plus fp32 rounding
at the magnitude of the pair (visible only for fp32 x, where the two products nearly cancel), not
bit for bit.
"""

import builtins
import dis
import inspect
import types
import warnings
from collections import OrderedDict

import torch

from ..kernels import INPUT_DTYPES
from ..torch_internals import dispatch_modes_disabled
from . import rope_proof  # its MIN_FUSED_NUMEL and rope_checked, read at each call (they import each other)
from .fused_class import global_value
from .python_versions import FusionWarning

# Builtins a rotary function may call (pure functions of their arguments).
SAFE_BUILTINS = frozenset({"enumerate", "len", "range", "zip", "tuple", "list", "int", "min", "max", "reversed"})
# Attributes it may read: shape queries, views, casts and the complex views (none writes).
ATTRIBUTES = frozenset({
    "ndim", "shape", "size", "dim", "dtype", "float", "to", "type_as", "reshape", "view", "flatten",
    "unflatten", "unsqueeze", "squeeze", "contiguous", "view_as_complex", "view_as_real", "real", "imag", "device",
    "mul"})
_OPS = frozenset({
    "NOP", "RESUME", "CACHE", "PRECALL", "PUSH_NULL", "KW_NAMES", "EXTENDED_ARG",
    "LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR", "LOAD_FAST_LOAD_FAST", "STORE_FAST",
    "STORE_FAST_LOAD_FAST", "STORE_FAST_STORE_FAST", "LOAD_CONST", "RETURN_CONST", "RETURN_VALUE",
    "LOAD_CLOSURE", "LOAD_DEREF", "STORE_DEREF", "MAKE_CELL", "COPY_FREE_VARS", "MAKE_FUNCTION",
    "SET_FUNCTION_ATTRIBUTE",
    "BINARY_SUBSCR", "BINARY_SLICE", "BUILD_SLICE", "BUILD_TUPLE", "BUILD_LIST", "LIST_APPEND",
    "LIST_EXTEND", "LIST_TO_TUPLE", "UNPACK_SEQUENCE", "BINARY_OP", "BINARY_ADD", "BINARY_SUBTRACT",
    "BINARY_MULTIPLY", "BINARY_FLOOR_DIVIDE", "BINARY_TRUE_DIVIDE", "UNARY_NEGATIVE", "UNARY_NOT",
    "COMPARE_OP", "IS_OP", "CONTAINS_OP", "TO_BOOL", "POP_TOP", "DUP_TOP", "ROT_TWO", "ROT_THREE", "COPY",
    "SWAP", "GET_ITER", "FOR_ITER", "END_FOR", "JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_ABSOLUTE",
    "POP_JUMP_IF_FALSE", "POP_JUMP_IF_TRUE", "POP_JUMP_IF_NONE", "POP_JUMP_IF_NOT_NONE",
    "POP_JUMP_FORWARD_IF_FALSE", "POP_JUMP_FORWARD_IF_TRUE", "POP_JUMP_BACKWARD_IF_FALSE",
    "POP_JUMP_BACKWARD_IF_TRUE", "POP_JUMP_FORWARD_IF_NONE", "POP_JUMP_FORWARD_IF_NOT_NONE",
    "JUMP_IF_FALSE_OR_POP", "JUMP_IF_TRUE_OR_POP", "LOAD_ASSERTION_ERROR", "RAISE_VARARGS", "RERAISE",
    "CALL", "CALL_KW", "CALL_FUNCTION", "CALL_FUNCTION_KW", "CALL_METHOD", "CALL_FUNCTION_EX"})
# CALL_INTRINSIC_1 runs one of several C helpers: only this one (3.12+, star-argument calls).
_INTRINSICS = frozenset({"INTRINSIC_LIST_TO_TUPLE"})
_CONSTANTS = (int, float, bool, str, type(None), type(Ellipsis))
_aten = torch.ops.aten
_TABLE_VIEWS = frozenset({_aten.slice.Tensor, _aten.view.default, _aten.unsqueeze.default, _aten.squeeze.dim,
                          _aten.select.int, _aten.alias.default})
# (function, reason) pairs already warned about (state.py lists it).
warned: set = set()
# Signatures' proofs kept per function, the least recently called dropped first: a model calls it
# with a few (per layer shape, training and evaluation); a sequence length that changes every
# batch would make one per length.
MAX_PLANS = 64



def _constant_ok(value) -> bool:
    return (type(value) in _CONSTANTS or isinstance(value, types.CodeType)
            or type(value) is tuple and all(_constant_ok(v) for v in value))


def _code_reason(name: str, code: types.CodeType, fn_globals: dict, codes: list, read: list,
                 depth: int) -> str | None:
    """Why code (of function name, reading fn_globals) is not side-effect free as the module docstring
    says; appends the (name, value) of each global it reads to read, and the proofs of the global
    functions it reads to codes (function_reason)."""
    for ins in dis.get_instructions(code):
        op = ins.opname
        if op == "LOAD_GLOBAL":
            value = global_value(fn_globals, ins.argval)
            if not (value is torch or ins.argval in SAFE_BUILTINS and value is getattr(builtins, ins.argval)):
                if not isinstance(value, types.FunctionType) or depth >= 3:
                    return f"{name} reads the global {ins.argval!r}"
                if not any(f is value for f, *_ in codes):
                    reason = function_reason(value, codes, depth + 1)
                    if reason:
                        return reason
            if (ins.argval, value) not in read:
                read.append((ins.argval, value))
        elif op in ("LOAD_ATTR", "LOAD_METHOD"):
            if ins.argval not in ATTRIBUTES:
                return f"{name} reads .{ins.argval}"
        elif op in ("LOAD_CONST", "RETURN_CONST"):
            if not _constant_ok(ins.argval):
                return f"{name} uses the constant {ins.argval!r}"
        elif op == "CALL_INTRINSIC_1":
            if ins.argrepr not in _INTRINSICS:
                return f"{name} calls {ins.argrepr}"
        elif op not in _OPS:
            return f"{name} does more than compute on its arguments: {op} {ins.argrepr}".rstrip()
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions and comprehensions
            reason = _code_reason(f"{name}.{const.co_name}", const, fn_globals, codes, read, depth)
            if reason:
                return reason
    return None


def function_reason(fn: types.FunctionType, codes: list, depth: int = 0) -> str | None:
    """Why fn, or a function it reads by a global name, is not side-effect free as the module
    docstring says; appends (function, code, defaults, globals read) for each of them to codes."""
    if fn.__closure__ or fn.__code__.co_freevars:
        return f"{fn.__name__} has a closure"
    if not all(_constant_ok(d) for d in fn.__defaults__ or ()) or fn.__kwdefaults__:
        return f"{fn.__name__} has a default other than a number, None or a string, or keyword-only defaults"
    read = []
    reason = _code_reason(fn.__name__, fn.__code__, fn.__globals__, codes, read, depth)
    if reason:
        return reason
    codes.append((fn, fn.__code__, fn.__defaults__, tuple(read)))
    return None


class Plan:
    """A proven signature: its rotations, each (argument index of x, argument index of t, the chain
    of views from that argument to t as (op, constant arguments) pairs), the strides the written
    code gives each, and for each returned value the index of its rotation (one value returned
    twice is one rotation)."""

    def __init__(self, rotations, strides, order, single: bool, container: type = tuple):
        self.rotations, self.strides, self.order = rotations, strides, order
        self.single, self.container = single, container


def _one_user(node) -> bool:
    return len(node.users) == 1


def _cast_of(node, dtype):
    """The node cast to dtype takes (aten._to_copy with only dtype, and x's layout / device), or None."""
    if not (node.op == "call_function" and node.target is _aten._to_copy.default and len(node.args) == 1):
        return None
    kwargs = dict(node.kwargs)
    if kwargs.pop("dtype", None) is not dtype or kwargs.pop("layout", torch.strided) is not torch.strided:
        return None
    device = kwargs.pop("device", None)
    src = node.args[0]
    if kwargs or device is not None and device != src.meta["val"].device:
        return None
    return src


def _table_chain(node, placeholders):
    """(argument index, [(op, constant args)]) if node is a chain of views of a complex64 argument."""
    ops = []
    while node not in placeholders:
        if not (node.op == "call_function" and node.target in _TABLE_VIEWS and node.args and not node.kwargs
                and all(not isinstance(a, torch.fx.Node) for a in node.args[1:])):
            return None
        ops.append((node.target, tuple(node.args[1:])))
        node = node.args[0]
    if node.meta["val"].dtype is not torch.complex64:
        return None
    return placeholders[node], ops[::-1]


def _is(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def _rotation(out, placeholders):
    """(x index, t index, t's views, the nodes of x's chain) if out is a rotation of the module
    docstring, else None."""
    val = out.meta["val"]
    back, chain = out, {out}
    if val.dtype is not torch.float32:  # cast back to x's dtype
        back = _cast_of(out, val.dtype)
        if back is None or not _one_user(back):
            return None
        chain.add(back)
    if not (_is(back, _aten.view.default) and tuple(back.meta["val"].shape) == tuple(val.shape)):
        return None
    real = back.args[0]
    if not (_is(real, _aten.view_as_real.default) and _one_user(real)):
        return None
    mul = real.args[0]
    if not (_is(mul, _aten.mul.Tensor) and len(mul.args) == 2 and not mul.kwargs and _one_user(mul)
            and mul.meta["val"].dtype is torch.complex64):
        return None
    chain |= {real, mul}
    for xc, t in (mul.args, mul.args[::-1]):
        if not (_is(xc, _aten.view_as_complex.default) and _one_user(xc) and isinstance(t, torch.fx.Node)
                and mul.meta["val"].shape == xc.meta["val"].shape):  # else the table broadcasts x
            continue
        pairs = xc.args[0]
        if not (_is(pairs, _aten.view.default) and _one_user(pairs)):
            continue
        src = pairs.args[0]
        if val.dtype is not torch.float32:
            if not (_one_user(src) and _cast_of(src, torch.float32) in placeholders):
                continue
            x_node, nodes = src.args[0], chain | {xc, pairs, src}
        else:
            x_node, nodes = src, chain | {xc, pairs}
        x = x_node.meta["val"] if x_node in placeholders else None
        if x is None or x.dtype is not val.dtype or x.shape != val.shape or x.shape[-1] % 2 or (
                tuple(pairs.meta["val"].shape) != (*x.shape[:-1], x.shape[-1] // 2, 2)):
            continue
        table = _table_chain(t, placeholders)
        if table is not None:
            return placeholders[x_node], table[0], table[1], nodes
    return None


def trace_plan(fn, args) -> Plan | str:
    """The plan of fn called with these plain tensors, or why its trace is not rotations (traced
    without the caller's dispatch modes: the trace is of fn alone, whatever mode it is called in)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with torch.no_grad(), dispatch_modes_disabled():
            graph = make_fx(fn, tracing_mode="fake")(*args).graph
    except Exception as e:  # noqa: BLE001 (any failure to trace means: not provably rotations here)
        return f"{fn.__name__} could not be traced on fake tensors ({type(e).__name__}: {e})"
    nodes = list(graph.nodes)
    placeholders = {n: i for i, n in enumerate(n for n in nodes if n.op == "placeholder")}
    (out,) = [n for n in nodes if n.op == "output"]
    single = not isinstance(out.args[0], (tuple, list))
    returned = (out.args[0],) if single else tuple(out.args[0])
    rotations, strides, order, covered = [], [], [], set(placeholders) | {out}
    seen = {}  # returned node -> index of its rotation
    for value in returned:
        if isinstance(value, torch.fx.Node) and value in seen:  # the same tensor again
            order.append(seen[value])
            continue
        found = _rotation(value, placeholders) if isinstance(value, torch.fx.Node) else None
        if found is None:
            return f"{fn.__name__} returns something other than complex rotations of its arguments"
        x_index, t_index, views, chain = found
        seen[value] = len(rotations)
        order.append(seen[value])
        rotations.append((x_index, t_index, views))
        strides.append(tuple(value.meta["val"].stride()))
        covered |= chain
    table_nodes = set()
    for n in nodes:  # the tables' view chains: everything not covered must be one of them
        if n not in covered and n.op == "call_function" and n.target in _TABLE_VIEWS:
            table_nodes.add(n)
    if set(nodes) - covered - table_nodes:
        extra = sorted(str(n.target) for n in set(nodes) - covered - table_nodes)
        return f"{fn.__name__} computes more than its rotations ({', '.join(extra)})"
    return Plan(tuple(rotations), tuple(strides), tuple(order), single,
                list if isinstance(out.args[0], list) else tuple)  # fx: immutable_list


def _tables(t: torch.Tensor):
    """cos, sin of a complex64 table t [..., D / 2]: its real and imaginary parts, each repeated
    twice along the last dim (rope's interleaved tables), fp32."""
    pairs = torch.view_as_real(t)
    return pairs[..., 0].repeat_interleave(2, dim=-1), pairs[..., 1].repeat_interleave(2, dim=-1)


def _replay(t: torch.Tensor, views) -> torch.Tensor:
    for op, args in views:
        t = op(t, *args)
    return t


def _signature(args) -> tuple:
    """What a trace specialises on: each argument's shape, strides, dtype, device and requires_grad,
    and which arguments are the same tensor (make_fx traces one tensor passed twice as one input).
    (The storage offset only matters to view_as_complex of an fp32 argument, which __call__ runs as
    written at an odd one, untraced.)"""
    return tuple((a.shape, a.stride(), a.dtype, a.device, a.requires_grad,
                  next(j for j, b in enumerate(args) if b is a)) for a in args)


def _same_layout(shape, strides, others) -> bool:
    """Whether two strides of a tensor of this shape lay it out alike (rope's output has contiguous
    x's strides): a dim of size 1 addresses nothing, and fake tensors may give it other strides."""
    return all(n == 1 or s == t for n, s, t in zip(shape, strides, others))


def _fusable(x: torch.Tensor, t: torch.Tensor) -> bool:
    return (x.dtype in INPUT_DTYPES and x.is_contiguous() and x.numel() >= rope_proof.MIN_FUSED_NUMEL and 2 <= x.dim() <= 4
            and not t.requires_grad and t.device == x.device and t.dim() >= 1 and t.shape[-1] == x.shape[-1] // 2
            and torch.broadcast_shapes(t.shape, (*x.shape[:-1], x.shape[-1] // 2)) == (*x.shape[:-1], x.shape[-1] // 2))


class ComplexRun:
    """The rewritten function of a proven complex-form rotary function: each call signature proven
    (trace_plan) once, then its rotations run as f8tensor.rope; the function as written otherwise."""

    def __init__(self, fn: types.FunctionType):
        self.fn, self.signature = fn, inspect.signature(fn)
        params = self.signature.parameters.values()
        # A call passing exactly these arguments by position binds them in order (no Signature.bind).
        self.positional = len(params) if all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                                             for p in params) else -1
        self.plans: OrderedDict[tuple, Plan | str] = OrderedDict()  # the last MAX_PLANS signatures

    def __call__(self, *args, **kwargs):
        fn = self.fn
        if not kwargs and len(args) == self.positional:
            values = args
        else:
            try:
                bound = self.signature.bind(*args, **kwargs)
            except TypeError:
                return fn(*args, **kwargs)  # raises as written
            bound.apply_defaults()
            values = tuple(bound.arguments.values())
        if not all(type(v) is torch.Tensor and not (v.is_conj() or v.is_neg()) for v in values):
            return fn(*args, **kwargs)  # (lazily conjugated or negated views: the written code resolves them)
        min_numel = rope_proof.MIN_FUSED_NUMEL
        if not any(v.dtype in INPUT_DTYPES and v.numel() >= min_numel for v in values):
            return fn(*args, **kwargs)  # nothing rope would rotate: no trace
        if any(v.dtype is torch.float32 and v.storage_offset() % 2 for v in values):
            return fn(*args, **kwargs)  # view_as_complex of it raises as written (rope would not)
        key = _signature(values)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = trace_plan(fn, values)
            if len(self.plans) > MAX_PLANS:
                self.plans.popitem(last=False)
            if isinstance(plan, str) and (fn, plan) not in warned:
                warned.add((fn, plan))
                warnings.warn(f"f8tensor.fuse_model_ops: {fn.__qualname__} runs as written for arguments of "
                              f"shapes {[tuple(v.shape) for v in values]}: {plan}", FusionWarning, stacklevel=3)
        else:
            self.plans.move_to_end(key)
        if isinstance(plan, str):
            return fn(*args, **kwargs)
        tables = {}
        for (x_index, t_index, views), strides in zip(plan.rotations, plan.strides):
            key = (t_index, tuple(views))
            if key not in tables:
                tables[key] = _replay(values[t_index], views)
            x = values[x_index]
            if not (_fusable(x, tables[key]) and _same_layout(x.shape, x.stride(), strides)):
                return fn(*args, **kwargs)
        cos_sin = {key: _tables(t) for key, t in tables.items()}
        outs = tuple(rope_proof.rope_checked(values[x_index], *cos_sin[(t_index, tuple(views))], interleaved=True)
                     for x_index, t_index, views in plan.rotations)
        return outs[0] if plan.single else plan.container(outs[i] for i in plan.order)
