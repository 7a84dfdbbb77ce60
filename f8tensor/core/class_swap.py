"""Giving a module a same-named subclass of its class, in place: how conversion converts subclasses
of nn.Linear (and the norm swap subclasses of nn.RMSNorm) that keep their base's forward, such as
torchtitan 0.3's `Linear(nn.Linear, Module)`, without dropping their own methods and attributes.

The module's class becomes `type(cls.__name__, (layer, cls), ...)`: f8tensor's layer class first
(its forward), then the module's own class (its other methods: torchtitan's init_weights, config).
The object, its parameters, buffers, hooks and attributes stay the same. Copies and pickles rebuild
the class around the module's own one, which pickles by reference as usual. Made classes run no
`__init_subclass__` of the classes they derive from (QuietSubclasses), so that making one has no
side effect on the user's class registries. `type(mod)(...)` reaches the layer's constructor, not
the module's own: rebuild a converted module from its own class.
"""

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

# (f8tensor's layer class, the module's class) -> the class combining them (state.py lists it).
SWAPPED_CLASSES: dict[tuple[type, type], type] = {}


class QuietSubclasses:
    """A base of the classes f8tensor derives from a user's class (the layers here, the fused
    modules' mixins): a class made with `_f8tensor_quiet=True` calls no further __init_subclass__."""

    def __init_subclass__(cls, _f8tensor_quiet: bool = False, **kwargs):
        if not _f8tensor_quiet:
            super().__init_subclass__(**kwargs)


def class_reason(mod: nn.Module, cls: type) -> str | None:
    """Why the module's class cannot be given a same-named subclass, or the instance cannot take it:
    a subclass must behave as the class does."""
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


def swap_reason(mod: nn.Module, base: type, layer: type, attributes: tuple = ()) -> str | None:
    """Why a module of a subclass of base cannot run layer's forward in place of base's: its class
    defines a forward of its own (an override the swap would replace), it is a lazy module (which
    turns into its base class at its first call), a name layer defines or sets (attributes) is its
    own already, or its class cannot be subclassed as class_reason says."""
    cls = type(mod)
    own = cls.__mro__[:cls.__mro__.index(base)]
    for c in own:
        if "forward" in vars(c):
            return f"{cls.__name__}: overrides forward ({c.__name__}.forward), which f8tensor's layer would replace"
    if isinstance(mod, LazyModuleMixin):
        return f"{cls.__name__}: a lazy module (it becomes {base.__name__} at its first call): convert after that"
    names = {n for n in vars(layer) if not n.startswith("__") and n not in ("forward", "extra_repr")}
    for name in sorted(names | set(attributes)):
        if name in mod.__dict__ or any(name in vars(c) for c in own):
            return f"{cls.__name__}: its own {name} would be replaced by {layer.__name__}'s"
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
            "_f8tensor_own_class": cls, "__reduce_ex__": _reduce_ex}, _f8tensor_quiet=True)
    return SWAPPED_CLASSES[layer, cls]


def _reduce_ex(self, protocol):
    cls = type(self)  # the swapped class, or a subclass made of it later (as FSDP2's): kept by copies
    made_here = "_f8tensor_own_class" in vars(cls)
    return _rebuilt, (self._f8tensor_layer, self._f8tensor_own_class, None if made_here else cls), self.__getstate__()


def _rebuilt(layer: type, cls: type, later: type | None = None) -> nn.Module:
    """An empty module of the swapped class, or of a class made of it later (unpickling and copies
    then set its state)."""
    obj = cls.__new__(cls)
    obj.__class__ = later or swapped_class(layer, cls)
    return obj
