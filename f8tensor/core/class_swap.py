"""Giving a module a same-named subclass of its class, in place: how conversion converts subclasses
of nn.Linear (and the norm swap subclasses of nn.RMSNorm) that keep their base's forward, such as
torchtitan 0.3's `Linear(nn.Linear, Module)`, without dropping their own methods and attributes.

The module's class becomes `type(cls.__name__, (layer, cls), ...)`: f8tensor's layer class first
(its forward), then the module's own class (its other methods: torchtitan's init_weights, config).
The object, its parameters, buffers, hooks and attributes stay the same. Copies and pickles rebuild
the class around the module's own one, which pickles by reference as usual.
"""

from torch import nn

# (f8tensor's layer class, the module's class) -> the class combining them (state.py lists it).
SWAPPED_CLASSES: dict[tuple[type, type], type] = {}


def class_reason(mod: nn.Module, cls: type) -> str | None:
    """Why the module's class cannot be given a same-named subclass, or the instance cannot take it:
    a subclass must be made without side effects and behave as the class does."""
    if "forward" in mod.__dict__:
        return "the module has an instance-level forward"
    if type(cls) is not type:
        return f"its class has the metaclass {type(cls).__name__}"
    for c in cls.__mro__[:cls.__mro__.index(nn.Module)]:
        for name in ("__init_subclass__", "__reduce__", "__reduce_ex__", "__getattr__", "__getattribute__",
                     "__setattr__"):
            if name in vars(c):
                return f"its class {c.__name__} defines {name}"
    return None


def swap_reason(mod: nn.Module, base: type) -> str | None:
    """Why a module of a subclass of base cannot run f8tensor's forward in place of base's: its
    class defines a forward of its own (an override conversion would drop), or cannot be
    subclassed as class_reason says."""
    cls = type(mod)
    for c in cls.__mro__[:cls.__mro__.index(base)]:
        if "forward" in vars(c):
            return f"{cls.__name__}: overrides forward ({c.__name__}.forward), which f8tensor's layer would replace"
    reason = class_reason(mod, cls)
    return None if reason is None else f"{cls.__name__}: {reason}"


def swap_class(mod: nn.Module, layer: type) -> nn.Module:
    """Make the module's class the same-named subclass of (layer, its class), in place; the module."""
    mod.__class__ = swapped_class(layer, type(mod))
    return mod


def swapped_class(layer: type, cls: type) -> type:
    if (layer, cls) not in SWAPPED_CLASSES:
        SWAPPED_CLASSES[layer, cls] = type(cls.__name__, (layer, cls), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "_f8tensor_layer": layer,
            "_f8tensor_own_class": cls, "__reduce_ex__": _reduce_ex})
    return SWAPPED_CLASSES[layer, cls]


def _reduce_ex(self, protocol):
    return _rebuilt, (self._f8tensor_layer, self._f8tensor_own_class), self.__getstate__()


def _rebuilt(layer: type, cls: type) -> nn.Module:
    """An empty module of the swapped class (unpickling and copies then set its state)."""
    obj = cls.__new__(cls)
    obj.__class__ = swapped_class(layer, cls)
    return obj
