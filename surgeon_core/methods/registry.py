"""Method registry: ``@register("tent")`` on a class, ``get_method("tent")`` to find it."""

from typing import Callable, Dict, List, Type

from ..errors import SurgeonError

__all__ = ["UnknownMethod", "register", "get_method", "list_methods"]

_METHODS: Dict[str, Type] = {}


class UnknownMethod(SurgeonError, KeyError):
    """A method name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def register(name: str) -> Callable[[Type], Type]:
    """Class decorator registering a method under one lower-case name."""
    if name != name.lower():
        raise ValueError("method names are lower case, got %r" % name)

    def decorate(cls: Type) -> Type:
        if name in _METHODS:
            raise ValueError("method %r is registered twice (%s and %s)"
                             % (name, _METHODS[name].__name__, cls.__name__))
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def get_method(name: str) -> Type:
    """The class registered as ``name``.

    Raises:
        UnknownMethod: no such method (the message lists the registered names).
    """
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethod("unknown method %r; known: %s" % (name, ", ".join(list_methods())))


def list_methods() -> List[str]:
    return sorted(_METHODS)
