"""The RMSNorm fusion by proof (switch `rms_norm` of fuse_model_ops): a norm module of the model's own
class, written as Hugging Face writes its Llama family's (LlamaRMSNorm, Qwen2RMSNorm, Mistral's, ...):

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

runs as f8tensor's fused RMSNorm in the same form (fused_ops/rms_norm.py, cast_before_weight):
the normalized values rounded to the input's dtype, then multiplied by the weight and rounded
again, as the written code does; one pass each way, the amax of what it writes handed to the
float8 layers that read it. The same code ending `return (self.weight * hidden_states).to(input_dtype)`
(OLMo 2's Olmo2RMSNorm: the product in fp32, one rounding, nn.RMSNorm's form) runs the fused
norm without cast_before_weight, and so does Gemma's (Gemma2RMSNorm, ...), which normalizes in a
helper method and scales by one plus the weight:

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)

(the fused norm's weight is then 1.0 + weight.float(), in fp32, computed at each call). Values:
rstd in fp32 as written, summed in another order, so the normalized values may differ by one unit
in the last place where they sit at a rounding boundary.

The proof, all of which must hold (otherwise the module is left alone, and why is recorded): the
module has no children, no buffers and one parameter, of one dim; its class passes
core/class_swap.class_reason; the bytecode of its class forward passes the shared walk
(forward_walk.py) with GRAMMAR below (self read for its parameter and one number attribute, torch's
float32 and rsqrt, a tensor's dtype, to, type_as, float, pow and mean, numbers, + and *; methods of
its class that pass the same walk and read no method themselves); torch.fx traces it to exactly
the nodes of one form above (the float32 cast by .to(torch.float32) or .float(), either order of
each product and of each sum, keepdim the bool True, Gemma's 1 a number that does not depend on
the epsilon), the number attribute being the epsilon added. It is traced with that attribute set
to a sentinel that may only be added to a traced tensor: the constant added must be that very
object, so Python arithmetic on the epsilon (which tracing would fold into one constant) is
refused, as is a literal of the same value. The epsilon is a float, an int that a float holds
exactly or a NumPy float (which the written code adds as it adds float(eps)); bools, other
numbers and float subclasses that define their own arithmetic are refused.

At each call the fused forward runs the class's own forward instead where the proof does not
cover the call: other arguments than the one input, the class forward or the globals it read
rebound since (a helper method too), tracing (fx, jit, torch.compile, which fuses the written code
itself), a weight or epsilon attribute set since to what the proof does not take (a weight that
is not a tensor, as None), and inputs the fused kernels do not compute exactly as written (a
weight of another dtype than x, which the written code promotes; autocast; tensor subclasses;
rows longer than the kernel takes on CUDA).
"""

import inspect
import numbers
import operator
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..fused_ops.rms_norm import fused_rms_norm, fused_rms_norm_applies
from ..core.class_swap import class_reason
from .forward_walk import Grammar, code_reason
from .fused_class import FusedModule, class_forward, code_of, code_unchanged, globals_unchanged, tracing

# Set on a module whose norm was fused (an RMSNormProof) or, for a candidate, why it was not (a str);
# fusion_report reads it.
NORM_ATTR = "_f8tensor_norm_proof"


def _own_state(mod: nn.Module, cls: type, name: str) -> bool:
    """self.<name> is the module's parameter or a number attribute of its own (the epsilon, which
    find_norm then checks with epsilon_reason)."""
    if hasattr(cls, name):
        return False
    if name in dict(mod.named_parameters(recurse=False)):
        return True
    return isinstance(mod.__dict__.get(name), numbers.Real)


# The methods of float that `tensor + eps` and float(eps) call: a subclass must keep float's.
_FLOAT_METHODS = ("__add__", "__radd__", "__float__")


def epsilon_reason(name: str, eps) -> str | None:
    """Why the written code may not add eps to an fp32 tensor as the fused norm adds float(eps), or
    None: eps must be a float (or a subclass keeping float's addition and conversion), an int that
    a float holds exactly (PyTorch converts ints as int64, once), or a NumPy float (converted
    as by float()); not a bool."""
    kind = type(eps)
    if isinstance(eps, float) and all(getattr(kind, m) is getattr(float, m) for m in _FLOAT_METHODS):
        return None
    if kind is int and abs(eps) <= 2**53:
        return None
    if kind.__module__ == "numpy" and isinstance(eps, numbers.Real) and not isinstance(eps, numbers.Integral):
        return None
    return (f"the epsilon {name} = {eps!r} is a {kind.__name__}, not a float, an int of magnitude at most "
            f"2**53 or a NumPy float: set it to float({name}) to fuse")


def helper_method(mod: nn.Module, cls: type, name: str):
    """The plain function self.<name> reads, where it is a method of the class (not an instance
    attribute, not a property or other descriptor), else None."""
    fn = inspect.getattr_static(cls, name, None)
    return fn if isinstance(fn, types.FunctionType) and name not in mod.__dict__ and name != "forward" else None


def _state_or_helper(mod: nn.Module, cls: type, name: str) -> bool:
    return _own_state(mod, cls, name) or helper_method(mod, cls, name) is not None


_GRAMMAR_ARGS = dict(does="normalize with its weight", torch_objects=(torch, torch.float32, torch.rsqrt),
                     tensor_attributes=frozenset({"dtype", "to", "type_as", "float", "pow", "mean"}),
                     constants=(bool, int, float, type(None)), binary_ops=frozenset({"*", "+"}))
# The forward may call helper methods (which pass HELPER_GRAMMAR: they call none).
GRAMMAR = Grammar(self_reads="its weight, epsilon and helper methods", self_attribute=_state_or_helper,
                  **_GRAMMAR_ARGS)
HELPER_GRAMMAR = Grammar(self_reads="its weight and epsilon", self_attribute=_own_state, **_GRAMMAR_ARGS)


@dataclass(frozen=True)
class RMSNormProof:
    """forward(x) = weight * normalized(x).to(x.dtype) (cast_before_weight) or (weight *
    normalized(x)).to(x.dtype), normalized(x) = x.float() * rsqrt(mean(x.float()^2) + eps): weight,
    eps: the names of the parameter and of the number attribute; forward, globals: the code proven
    and what its global names were bound to; arg: the forward's parameter name (None: positional-only);
    code: code_of the forward and of each helper method, as proven."""
    weight: str
    eps: str
    arg: str | None
    forward: types.FunctionType
    globals: tuple[tuple[str, object], ...]
    cast_before_weight: bool = True
    one_plus_weight: bool = False  # Gemma's form: normalized(x) * (1 + weight.float()), one rounding
    helpers: tuple[tuple[str, types.FunctionType], ...] = ()  # the methods the forward calls, as proven
    code: tuple = ()  # code_of(forward), then of each helper

    def __str__(self):
        if self.one_plus_weight:
            return f"RMSNorm fused: (normalized(x, eps={self.eps}) * (1 + {self.weight})).type_as(x)"
        if self.cast_before_weight:
            return f"RMSNorm fused: {self.weight} * normalized(x, eps={self.eps}).to(x.dtype)"
        return f"RMSNorm fused: ({self.weight} * normalized(x, eps={self.eps})).to(x.dtype)"


def is_norm_candidate(mod: nn.Module) -> bool:
    """No children or buffers, one parameter of one dim, a plain-function class forward that names
    rsqrt or calls a method of its class that does (Gemma's), or a class named like an RMSNorm
    (examined, so that the report says why it is not fused); not an nn.RMSNorm (the norm swap's),
    not yet fused."""
    if isinstance(mod, (nn.RMSNorm, FusedNormModule)) or next(mod.children(), None) is not None:
        return False
    params = list(mod.parameters(recurse=False))
    if len(params) != 1 or params[0].dim() != 1 or next(mod.buffers(recurse=False), None) is not None:
        return False
    forward = class_forward(type(mod))
    if forward is None:
        return False
    helpers = (helper_method(mod, type(mod), name) for name in forward.__code__.co_names)
    return ("rsqrt" in forward.__code__.co_names or "rmsnorm" in type(mod).__name__.lower()
            or any(fn is not None and "rsqrt" in fn.__code__.co_names for fn in helpers))


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return True


def _is_call(n, op: str, target, nargs: int) -> bool:
    return (isinstance(n, torch.fx.Node) and n.op == op and n.target == target and len(n.args) == nargs)


def _product(n, a_test, b_test):
    """(a, b) if n is a * b or b * a with a_test(a) and b_test(b), else None."""
    if not (_is_call(n, "call_function", operator.mul, 2) and not n.kwargs):
        return None
    for a, b in (n.args, n.args[::-1]):
        if a_test(a) and b_test(b):
            return a, b
    return None


class _EpsilonArithmetic(TypeError):
    pass


class _Sentinel(float):
    """The epsilon attribute's value while find_norm traces the forward: a float that may only be
    added to a traced tensor. Any other arithmetic on it raises, as tracing would fold it into one
    constant (`e + (e * e - e / 4 + c)` is e at one value, not at others)."""

    def _traced_only(self, *other):
        if other and isinstance(other[0], torch.fx.Proxy):
            return NotImplemented  # the Proxy's own operator records it
        raise _EpsilonArithmetic("the epsilon is computed with in Python")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _traced_only
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _traced_only
    __divmod__ = __rdivmod__ = __pow__ = __rpow__ = __neg__ = __pos__ = __abs__ = _traced_only
    __int__ = __round__ = __trunc__ = __floor__ = __ceil__ = _traced_only


_SENTINEL = _Sentinel(0.0625)  # an exact binary fraction; compared by identity
_NOT_IT = ("forward is not weight * h.to(x.dtype), (weight * h).to(x.dtype) or "
           "(h * (1.0 + weight.float())).type_as(x), "
           "h = x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)")


def _pattern(mod: nn.Module, weight_name: str, eps: _Sentinel, eps_name: str):
    """(the input placeholder, cast_before_weight, one_plus_weight) if torch.fx traces mod to
    exactly the operations of one of the three forms with eps, the object, added, else why not."""
    tracer = _LeafTracer()
    try:
        graph = tracer.trace(mod)
    except _EpsilonArithmetic:
        return (f"forward computes with the epsilon {eps_name} in Python (tracing would fold that into "
                "one constant): it must be added to the mean of the squares as it is")
    except Exception as e:  # noqa: BLE001 (any failure to trace means: not provably the pattern)
        return f"forward could not be traced ({type(e).__name__}: {e})"
    finally:
        tracer.__dict__.clear()
    nodes = list(graph.nodes)
    (out,) = [n for n in nodes if n.op == "output"]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or len(out.args) != 1:
        return _NOT_IT
    (x,) = placeholders

    def to_fp32(n):
        return isinstance(n, torch.fx.Node) and not n.kwargs and (
            _is_call(n, "call_method", "to", 2) and n.args == (x, torch.float32)
            or _is_call(n, "call_method", "float", 1) and n.args == (x,))

    def weight(n):
        return isinstance(n, torch.fx.Node) and n.op == "get_attr" and n.target == weight_name

    def back_to_x_dtype(n):  # h.to(x.dtype): (h,)
        return (_is_call(n, "call_method", "to", 2) and not n.kwargs and _is_call(
            n.args[1], "call_function", getattr, 2) and n.args[1].args == (x, "dtype"))

    def normalized(n):  # h.float() * rsqrt(...): (h, rsqrt), else None
        return _product(n, to_fp32, lambda r: _is_call(r, "call_function", torch.rsqrt, 1))

    def one_plus_weight(n):  # 1.0 + weight.float(), either order (the sentinel refuses to make a 1)
        if not (_is_call(n, "call_function", operator.add, 2) and not n.kwargs):
            return False
        for one, w in (n.args, n.args[::-1]):
            if (type(one) in (int, float) and one == 1 and _is_call(w, "call_method", "float", 1)
                    and not w.kwargs and weight(w.args[0])):
                return True
        return False

    def like_x(n):  # h.type_as(x): (h,)
        return _is_call(n, "call_method", "type_as", 2) and not n.kwargs and n.args[1] is x

    cast_before_weight, scaled = True, False
    found = _product(out.args[0], weight, back_to_x_dtype)  # weight * normalized(x).to(x.dtype)
    found = found and normalized(found[1].args[0])
    if not found and back_to_x_dtype(out.args[0]):  # (weight * normalized(x)).to(x.dtype)
        cast_before_weight = False
        found = _product(out.args[0].args[0], weight, normalized)
        found = found and normalized(found[1])
    if not found and like_x(out.args[0]):  # (normalized(x) * (1.0 + weight.float())).type_as(x)
        cast_before_weight, scaled = False, True
        found = _product(out.args[0].args[0], one_plus_weight, normalized)
        found = found and normalized(found[1])
    if not found or len(nodes) != (13 if scaled else 12):
        return _NOT_IT
    h, rsqrt = found
    total = rsqrt.args[0]
    summed = _is_call(total, "call_function", operator.add, 2) and not total.kwargs and (
        total.args[1] is eps and isinstance(total.args[0], torch.fx.Node) or total.args[0] is eps)
    variance = summed and (total.args[0] if isinstance(total.args[0], torch.fx.Node) else total.args[1])
    mean = variance and _is_call(variance, "call_method", "mean", 2) and (
        variance.args[1] == -1 and type(variance.args[1]) is int and variance.kwargs == {"keepdim": True}
        and type(variance.kwargs["keepdim"]) is bool)  # mean(-1, keepdim=1) raises
    square = mean and variance.args[0]
    if not (mean and _is_call(square, "call_method", "pow", 2) and square.args == (h, 2)
            and type(square.args[1]) is int and not square.kwargs):
        return _NOT_IT
    if any(len(n.users) != (2 if n is h or n is x else 1) for n in nodes if n.op != "output"):
        return "forward uses an intermediate value more than once"
    return x, cast_before_weight, scaled


def find_norm(mod: nn.Module) -> RMSNormProof | str:
    """The proof of a candidate norm module, or why it is not one."""
    cls = type(mod)
    forward = class_forward(cls)
    read_globals, self_reads = [], []
    reason = class_reason(mod, cls) or code_reason(mod, cls, forward, GRAMMAR, read_globals, self_reads)
    if reason:
        return reason
    helpers = tuple((name, helper_method(mod, cls, name)) for name in dict.fromkeys(self_reads)
                    if not _own_state(mod, cls, name))
    for name, fn in helpers:  # each helper method walked as the forward is, calling no method itself
        if fn.__globals__ is not forward.__globals__:
            return f"forward calls self.{name}, a method defined in another module"
        reason = code_reason(mod, cls, fn, HELPER_GRAMMAR, read_globals, self_reads)
        if reason:
            return f"{reason.replace('forward', f'self.{name}', 1)} (a method the forward calls)"
    self_reads = [n for n in self_reads if not any(n == name for name, _ in helpers)]
    params = dict(mod.named_parameters(recurse=False))
    weights = sorted({n for n in self_reads if n in params})
    epsilons = sorted({n for n in self_reads if n not in params})
    if len(weights) != 1 or len(epsilons) != 1:
        return "forward does not read one weight and one epsilon off self"
    original = mod.__dict__[epsilons[0]]
    reason = epsilon_reason(epsilons[0], original)
    if reason:
        return reason
    # Traced with the sentinel as the epsilon: the constant added must be that object, so it is the
    # attribute, read at each call, not a literal of the same value nor a number computed from it.
    try:
        mod.__dict__[epsilons[0]] = _SENTINEL
        found = _pattern(mod, weights[0], _SENTINEL, epsilons[0])
    finally:
        mod.__dict__[epsilons[0]] = original
    if isinstance(found, str):
        return f"{found} (the epsilon {epsilons[0]} = {original!r})" if found == _NOT_IT else found
    x, cast_before_weight, one_plus_weight = found
    positional_only = forward.__code__.co_posonlyargcount > 1
    return RMSNormProof(weights[0], epsilons[0], None if positional_only else x.target, forward,
                        tuple(read_globals), cast_before_weight, one_plus_weight, helpers,
                        tuple(code_of(fn) for fn in (forward, *(fn for _, fn in helpers))))


def _call_covered(mod: nn.Module, proof: RMSNormProof, args, kwargs):
    """The input if the proof covers this call and the kernels compute it as written, else None:
    the weight must still be a tensor (None: the written code raises) and the epsilon a number
    that epsilon_reason takes."""
    if len(args) + len(kwargs) != 1 or (kwargs and (proof.arg is None or proof.arg not in kwargs)):
        return None
    if mod._f8tensor_base.forward is not proof.forward or tracing() or any(
            helper_method(mod, mod._f8tensor_base, name) is not fn for name, fn in proof.helpers) or not all(
            code_unchanged(fn, code) for fn, code in zip((proof.forward, *(fn for _, fn in proof.helpers)),
                                                          proof.code)):
        return None
    if not globals_unchanged(proof.forward.__globals__, proof.globals):
        return None
    x, weight = args[0] if args else kwargs[proof.arg], getattr(mod, proof.weight)
    if not isinstance(weight, torch.Tensor) or epsilon_reason(proof.eps, mod.__dict__.get(proof.eps)):
        return None
    return x if fused_rms_norm_applies(x, weight) else None


class FusedNormModule(FusedModule):
    """Mixed into a proven norm's class (fused_class.make_fused_class): a forward that runs the fused
    norm in the written form where _call_covered says the proof covers the call."""

    _f8tensor_attr, _f8tensor_proof = NORM_ATTR, RMSNormProof

    @staticmethod
    def _f8tensor_prove(mod: nn.Module) -> RMSNormProof | str:
        return find_norm(mod)

    def _f8tensor_fused_forward(self, proof: RMSNormProof, args, kwargs):
        x = _call_covered(self, proof, args, kwargs)
        if x is None:
            return NotImplemented
        weight = getattr(self, proof.weight)
        if proof.one_plus_weight:  # Gemma's scale, in fp32 as written; the fused norm rounds once
            weight = 1.0 + weight.float()
        return fused_rms_norm(x, weight, float(self.__dict__[proof.eps]), cast_before_weight=proof.cast_before_weight)
