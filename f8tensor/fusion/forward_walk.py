"""The bytecode walk the module proofs share (gate_proof.py, norm_proof.py): a class forward of one
argument is accepted only if it is straight-line code that reads nothing but what a Grammar allows,
so that tracing it with torch.fx runs nothing of the user's and writes nothing, and follows the one
path every call takes.
"""

import dis
import inspect
import types
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .fused_class import JUMPS, global_value

_NO_VALUE = frozenset({"RESUME", "NOP", "CACHE", "PRECALL", "PUSH_NULL", "KW_NAMES"})  # push nothing of their own
# calls: 3.11 on CALL (3.13 CALL_KW); 3.10 CALL_FUNCTION, CALL_METHOD, CALL_FUNCTION_KW
_CALL_OPS = frozenset({"CALL", "CALL_KW", "CALL_FUNCTION", "CALL_METHOD", "CALL_FUNCTION_KW"})
_BINARY_310 = {"BINARY_MULTIPLY": "*", "BINARY_ADD": "+"}  # Python 3.10's binary opcodes


@dataclass(frozen=True)
class Grammar:
    """What a forward may read and compute. does: what it may do, for the reasons ("call its
    children, silu and *"); self_reads: what self may be read for ("a child module");
    self_attribute(mod, cls, name): whether self.<name> may be read; torch_objects: the globals and
    attributes of torch modules that may be read (by identity); tensor_attributes: the attributes
    and methods of a tensor that may be read; constants: the types of constants that may be loaded;
    binary_ops: the binary operators that may be applied ("*", "+")."""
    does: str
    self_reads: str
    self_attribute: Callable[[nn.Module, type, str], bool]
    torch_objects: tuple
    tensor_attributes: frozenset
    constants: tuple
    binary_ops: frozenset


def code_reason(mod: nn.Module, cls: type, forward, grammar: Grammar, read_globals: list,
                self_reads: list | None = None) -> str | None:
    """Why the forward's bytecode is not straight-line code of one argument that reads only what
    grammar allows; appends (name, value) of each global it reads, and (module, name, value) of each
    attribute of a torch module (F.silu), to read_globals, and each name it reads off self to
    self_reads."""
    code = forward.__code__
    if code.co_argcount != 2 or code.co_kwonlyargcount or code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        return "forward does not take exactly one argument"
    if code.co_freevars or code.co_cellvars:
        return "forward uses super() or a closure"
    if getattr(code, "co_exceptiontable", b""):  # 3.11 on; 3.10's try/with blocks are jumps
        return "forward has a try or with block"
    instructions = list(dis.get_instructions(code))
    if any(ins.opcode in JUMPS for ins in instructions):
        return "forward has a branch or a loop"
    this = code.co_varnames[0]
    modules = tuple(o for o in grammar.torch_objects if isinstance(o, types.ModuleType))
    misuse = f"forward uses self other than to read {grammar.self_reads}"
    top = None  # what the last instruction left on top of the stack: "self", "tensor", a torch object
    for ins in instructions:
        op = ins.opname
        if op in _NO_VALUE:
            continue
        if top == "self" and op not in ("LOAD_ATTR", "LOAD_METHOD"):
            return misuse
        if top == "keyword names" and op not in ("CALL_FUNCTION_KW", "CALL_KW"):
            return f"forward does more than {grammar.does}: {op} {ins.argrepr}".rstrip()
        if op in ("LOAD_FAST", "LOAD_FAST_CHECK"):
            top = "self" if ins.argval == this else "tensor"
        elif op in ("LOAD_FAST_LOAD_FAST", "STORE_FAST_LOAD_FAST"):  # 3.13: two locals in one instruction
            first, second = ins.argval
            if first == this:  # self loaded under another value, or rebound
                return misuse
            top = "self" if second == this else "tensor"
        elif op == "STORE_FAST_STORE_FAST":
            if this in ins.argval:
                return "forward rebinds self"
            top = None
        elif op == "LOAD_GLOBAL":
            value = global_value(forward.__globals__, ins.argval)
            if not any(value is ok for ok in grammar.torch_objects):
                return f"forward reads the global {ins.argval!r}"
            read_globals.append((ins.argval, value))
            top = value
        elif op in ("LOAD_ATTR", "LOAD_METHOD"):
            name = ins.argval
            if top == "self":
                if not grammar.self_attribute(mod, cls, name):
                    return f"forward reads self.{name}, which is not (only) {grammar.self_reads}"
                if self_reads is not None:
                    self_reads.append(name)
                top = "tensor" if name in mod._parameters else "child"
            elif top == "tensor" and name in grammar.tensor_attributes:
                top = "method"
            elif any(top is ok for ok in modules) and any(
                    getattr(top, name, None) is ok for ok in grammar.torch_objects):
                read_globals.append((top, name, getattr(top, name)))  # F.silu, patched later: seen
                top = getattr(top, name)
            elif isinstance(top, types.ModuleType):
                return f"forward reads {top.__name__}.{name}"
            else:
                return f"forward reads .{name} of a {top}"
        elif op == "LOAD_CONST" and type(ins.argval) in grammar.constants:
            top = "constant"
        elif op == "LOAD_CONST" and type(ins.argval) is tuple and all(type(n) is str for n in ins.argval):
            top = "keyword names"  # 3.10 and 3.13 pass them so, to the next instruction, a call
        elif (op in _CALL_OPS or op == "BINARY_OP" and ins.argrepr in grammar.binary_ops
              or _BINARY_310.get(op) in grammar.binary_ops):
            top = "tensor"
        elif op == "UNPACK_SEQUENCE" and top == "tensor":  # the values of a call (chunk's), unpacked
            top = "tensor"
        elif op == "STORE_FAST" and ins.argval == this:
            return "forward rebinds self"
        elif op in ("STORE_FAST", "RETURN_VALUE"):
            top = None
        else:
            return f"forward does more than {grammar.does}: {op} {ins.argrepr}".rstrip()
    if top == "self":
        return misuse
    return None
