"""The forms a rotary function's rotations may take in its torch.fx graph (rope_proof.py's docstring
lists them; the proof, what it records and the rewrite are there): predicates on fx nodes, each
returning what it matched (the rotated argument, the tables, the nodes computing it) or None.
Nothing here runs the user's code or changes a graph.
"""

import builtins
import operator

import torch

from .fused_class import MULS

_ADDS = frozenset({operator.add, torch.add})
_SUBS = frozenset({operator.sub, torch.sub})
_NEGS = frozenset({operator.neg, torch.neg})


def _int(value, want: int) -> bool:
    return type(value) is int and value == want  # not -1.0, True and the like, which eager treats otherwise


def _is(n, targets, method) -> bool:
    return isinstance(n, torch.fx.Node) and (
        n.op == "call_function" and n.target in targets or n.op == "call_method" and n.target == method)


def _half_length(n, t) -> bool:
    """n is t.shape[-1] // 2."""
    if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is operator.floordiv
            and len(n.args) == 2 and _int(n.args[1], 2) and not n.kwargs):
        return False
    last = n.args[0]
    if not (isinstance(last, torch.fx.Node) and last.op == "call_function" and last.target is operator.getitem
            and len(last.args) == 2 and _int(last.args[1], -1)):
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
    if (src1 is src2 and _int(i1, 0) and _int(i2, 1) and _is(src1, {torch.chunk}, "chunk")
            and set(src1.users) == {first, second}):
        rest = list(src1.args[1:]) + [src1.kwargs[k] for k in src1.kwargs if k == "dim"]
        if len(src1.args) + len(src1.kwargs) == 3 and set(src1.kwargs) <= {"dim"} and len(rest) == 2 and _int(
                rest[0], 2) and _int(rest[1], -1):
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


def _last_dim(n) -> bool:
    """n's dim argument (positional after the first, or keyword) is exactly -1."""
    dim = n.args[1:] + tuple(n.kwargs[k] for k in n.kwargs if k == "dim")
    return set(n.kwargs) <= {"dim"} and len(dim) == 1 and _int(dim[0], -1)


def _every_other(n, t, start: int) -> bool:
    """n is t[..., start::2]."""
    if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is operator.getitem
            and len(n.args) == 2 and not n.kwargs and n.args[0] is t):
        return False
    index = n.args[1]
    first = index[1].start if type(index) is tuple and len(index) == 2 and isinstance(index[1], slice) else None
    return (type(index) is tuple and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)
            and (_int(first, start) or start == 0 and first is None) and index[1].stop is None
            and _int(index[1].step, 2))


def upcast_of(n):
    """t if n is t.float(), else None."""
    ok = (isinstance(n, torch.fx.Node) and n.op == "call_method" and n.target == "float" and len(n.args) == 1
          and not n.kwargs and isinstance(n.args[0], torch.fx.Node))
    return n.args[0] if ok else None


def _rotated_half(n):
    """(t, form, the nodes computing n, upcast) if n is rotate_half(t): cat([-second half, first half],
    dim=-1) (halves by chunk or slices: form "chunk" / "slice"), or, form "pairs", the adjacent pairs'
    form stack((-t[..., 1::2], t[..., 0::2]), dim=-1).flatten(-2) (GLM's); upcast: followed by
    .float() (Ernie 4.5's); else None."""
    inner = upcast_of(n)
    if inner is not None:
        found = _rotated_half(inner) if set(inner.users) == {n} else None
        return None if found is None or found[3] else (*found[:2], found[2] | {n}, True)
    if _is(n, {torch.cat}, "cat") and n.op == "call_function" and len(n.args) >= 1 and _last_dim(n):
        parts = n.args[0]
        if not (isinstance(parts, (tuple, list)) and len(parts) == 2 and _is(parts[0], _NEGS, "neg")
                and len(parts[0].args) == 1 and not parts[0].kwargs):
            return None
        found = _halves(parts[1], parts[0].args[0])
        if found is None:
            return None
        t, form, nodes = found
        return t, form, nodes | {n, parts[0], parts[1], parts[0].args[0]}, False
    if not (_is(n, {torch.flatten}, "flatten") and len(n.args) == 2 and not n.kwargs and _int(n.args[1], -2)):
        return None
    stack = n.args[0]
    if not (_is(stack, {torch.stack}, "stack") and stack.op == "call_function" and len(stack.args) >= 1
            and _last_dim(stack) and set(stack.users) == {n}):
        return None
    parts = stack.args[0]
    if not (isinstance(parts, (tuple, list)) and len(parts) == 2 and _is(parts[0], _NEGS, "neg")
            and len(parts[0].args) == 1 and not parts[0].kwargs):
        return None
    second, first = parts[0].args[0], parts[1]
    t = first.args[0] if isinstance(first, torch.fx.Node) and first.args else None
    if not (isinstance(t, torch.fx.Node) and _every_other(first, t, 0) and _every_other(second, t, 1)
            and set(first.users) == {stack} and set(second.users) == {parts[0]}):
        return None
    return t, "pairs", {n, stack, parts[0], first, second}, False


def rotation(add):
    """(t, c, s, halves form, the nodes of the rotation, upcast, t's product first) if add is
    t * c + rotate_half(t) * s (the sum in either order), or, upcast, t.float() * c +
    rotate_half(t).float() * s (Ernie 4.5's), else None. t may be u.float() with t * c written as
    another u.float() * c. t's product first: the sum has t's layout
    in eager (the rotated half's product first: a contiguous one)."""
    if not (_is(add, _ADDS, "add") and len(add.args) == 2 and not add.kwargs):
        return None
    for m1, m2 in (add.args, add.args[::-1]):
        if not all(_is(m, MULS, "mul") and len(m.args) == 2 and not m.kwargs for m in (m1, m2)):
            continue
        for rotated, s in (m2.args, m2.args[::-1]):
            found = _rotated_half(rotated) if isinstance(rotated, torch.fx.Node) else None
            if found is None:
                continue
            t, form, nodes, upcast = found
            first = m1 is add.args[0]
            for a, c in (m1.args, m1.args[::-1]):
                if upcast and upcast_of(a) is t and set(a.users) == {m1} and c is not t:
                    return t, c, s, form, nodes | {m1, m2, a}, True, first
                if not upcast and a is t and c is not t:
                    return t, c, s, form, nodes | {m1, m2}, False, first
                if (not upcast and a is not t and c is not t and upcast_of(a) is not None
                        and upcast_of(a) is upcast_of(t) and set(a.users) == {m1}):
                    # u.float() * c + rotate_half(u.float()) * s, two casts of u (ModernBERT's, ESM's):
                    # the rotation of t = u.float() (the caller reads u off it)
                    return t, c, s, form, nodes | {m1, m2, a}, False, first
    return None


def _product_of(n, a, b) -> bool:
    """n is a * b, in either order, and the only use of it is what the caller matches."""
    return (_is(n, MULS, "mul") and len(n.args) == 2 and not n.kwargs and len(n.users) == 1
            and (n.args[0] is a and n.args[1] is b or n.args[0] is b and n.args[1] is a))


def half_table_rotation(n):
    """(t, c, s, halves form + "/half", the nodes of the rotation, False, True) if n is cat((x1 * c - x2 * s,
    x2 * c + x1 * s), dim=-1) with x1, x2 the halves of t and tables c, s of half its last dim
    (GPT-OSS's _apply_rotary_emb), else None."""
    if not (_is(n, {torch.cat}, "cat") and n.op == "call_function" and len(n.args) >= 1 and _last_dim(n)):
        return None
    parts = n.args[0]
    if not (isinstance(parts, (tuple, list)) and len(parts) == 2 and _is(parts[0], _SUBS, "sub")
            and _is(parts[1], _ADDS, "add") and all(len(p.args) == 2 and not p.kwargs for p in parts)):
        return None
    (p1, p2), (q1, q2) = parts[0].args, parts[1].args
    if not all(isinstance(p, torch.fx.Node) and _is(p, MULS, "mul") and len(p.args) == 2 for p in (p1, p2, q1, q2)):
        return None
    for x1, c in (p1.args, p1.args[::-1]):
        for x2, s in (p2.args, p2.args[::-1]):
            found = _halves(x1, x2) if isinstance(x1, torch.fx.Node) and isinstance(x2, torch.fx.Node) else None
            if found is None or c is s or not (_product_of(p1, x1, c) and _product_of(p2, x2, s)):
                continue
            for r1, r2 in ((q1, q2), (q2, q1)):
                if _product_of(r1, x2, c) and _product_of(r2, x1, s):
                    t, form, nodes = found
                    return t, c, s, form + "/half", nodes | {*parts, p1, p2, q1, q2, x1, x2}, False, True
    return None


def table(n, placeholders) -> set | None:
    """The nodes computing table n (none for an argument), or None if n is not a table: an argument,
    its unsqueeze, or either repeated per pair as GLM writes it, t[..., : t.shape[-1] // 2]
    .repeat_interleave(2, dim=-1)."""
    if n in placeholders:
        return set()
    if _is(n, {torch.unsqueeze}, "unsqueeze") and n.args and n.args[0] in placeholders and (
            len(n.args) + len(n.kwargs) == 2):
        return {n}
    dim = n.args[2:] + tuple(n.kwargs[k] for k in n.kwargs if k == "dim") if isinstance(n, torch.fx.Node) else ()
    if not (_is(n, {torch.repeat_interleave}, "repeat_interleave") and len(n.args) >= 2 and _int(n.args[1], 2)
            and set(n.kwargs) <= {"dim"} and len(dim) == 1 and _int(dim[0], -1)):
        return None
    front = n.args[0]
    if not (isinstance(front, torch.fx.Node) and front.op == "call_function" and front.target is operator.getitem
            and len(front.args) == 2 and type(front.args[1]) is tuple and len(front.args[1]) == 2
            and front.args[1][0] is Ellipsis and isinstance(front.args[1][1], slice)):
        return None
    t, cut = front.args[0], front.args[1][1]
    inner = table(t, placeholders)
    if inner is None or not (cut.start is None and cut.step is None and _half_length(cut.stop, t)):
        return None
    return inner | {n, front, cut.stop, cut.stop.args[0], cut.stop.args[0].args[0]}


def cast_back(n):
    """(the rotation, the dtype read) if n is rotation.to(u.dtype) (or .to(dtype=u.dtype)) for some
    u, else None (the caller checks that u is an argument, and what else reads that dtype)."""
    if not (isinstance(n, torch.fx.Node) and n.op == "call_method" and n.target == "to" and (
            len(n.args) == 2 and not n.kwargs or len(n.args) == 1 and list(n.kwargs) == ["dtype"])):
        return None
    dtype = n.args[1] if len(n.args) == 2 else n.kwargs["dtype"]
    if not (isinstance(dtype, torch.fx.Node) and dtype.op == "call_function" and dtype.target is builtins.getattr
            and len(dtype.args) == 2 and dtype.args[1] == "dtype"):
        return None
    return n.args[0], dtype


def slice_of(n, x, start, stop) -> bool:
    """n is x[..., start:stop] (step None), start and stop nodes or None as given."""
    if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is operator.getitem
            and len(n.args) == 2 and not n.kwargs and n.args[0] is x):
        return False
    index = n.args[1]
    return (type(index) is tuple and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)
            and index[1].start is start and index[1].stop is stop and index[1].step is None)


def width_read(n, tables) -> bool:
    """n is t.shape[-1] for t one of tables, read for slicing alone."""
    if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is operator.getitem
            and len(n.args) == 2 and _int(n.args[1], -1) and not n.kwargs):
        return False
    shape = n.args[0]
    return (isinstance(shape, torch.fx.Node) and shape.op == "call_function" and shape.target is builtins.getattr
            and len(shape.args) == 2 and shape.args[0] in tables and shape.args[1] == "shape"
            and set(shape.users) == {n})


def partial(n):
    """(the rotation node, x, the node x[..., R:], the node R) if n is cat([rotation, x[..., R:]],
    dim=-1) (Phi-3's partial rotary: the rotation of x[..., :R] in front of the rest of x), else
    None; the caller checks that the rotation rotates x[..., :R] and that R is a table's last dim."""
    if not (_is(n, {torch.cat}, "cat") and n.op == "call_function" and len(n.args) >= 1 and _last_dim(n)):
        return None
    parts = n.args[0]
    if not (isinstance(parts, (tuple, list)) and len(parts) == 2 and all(isinstance(p, torch.fx.Node) for p in parts)):
        return None
    rotation, rest = parts
    if not (rest.op == "call_function" and rest.target is operator.getitem and len(rest.args) == 2
            and type(rest.args[1]) is tuple and len(rest.args[1]) == 2 and isinstance(rest.args[1][1], slice)):
        return None
    x, width = rest.args[0], rest.args[1][1].start
    if not (isinstance(width, torch.fx.Node) and slice_of(rest, x, width, None) and set(rest.users) == {n}):
        return None
    return rotation, x, rest, width
