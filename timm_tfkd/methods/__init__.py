"""The registry of teacher-free methods: ``--tfkd-mode NAME`` is looked up here.

Each method is one module with a :class:`~timm_tfkd.methods.base.Method` subclass; adding one is that module, its
registration line below, and its tests (``docs/architecture.md``, "How to add a method").
"""
from typing import Dict, List, Tuple

from .base import (
    AUG_SPLITS_ALL, AUG_SPLITS_CLEAN_KD, SMOOTHING_EPSILON, SMOOTHING_EXPLICIT, SMOOTHING_TIMM, Flag, Method,
    TaskContext,
)
from .lsr import LabelSmoothing
from .none import PlainTimm
from .reg import VirtualTeacher
from .self_kd import KnowledgeDistillation, SelfDistillation

__all__ = [
    'Flag', 'Method', 'TaskContext', 'SMOOTHING_EPSILON', 'SMOOTHING_EXPLICIT', 'SMOOTHING_TIMM', 'AUG_SPLITS_ALL',
    'AUG_SPLITS_CLEAN_KD', 'DEFAULT_METHOD',
    'register_method', 'get_method', 'method_names', 'registered_methods', 'registered_flags',
]

_METHODS: Dict[str, Method] = {}
DEFAULT_METHOD = 'none'


def register_method(method: Method) -> Method:
    """Add a method to the registry (its ``name`` becomes a ``--tfkd-mode`` choice).

    Raises:
        ValueError: The name is taken, or one of its flags clashes with another method's flag of the same option.
    """
    if not method.name or method.name in _METHODS:
        raise ValueError(f"a Tf-KD method needs a new name, got '{method.name}'")
    known = {flag.option: flag for flag in registered_flags()}
    for flag in method.flags:
        if flag.option in known and known[flag.option] is not flag:
            raise ValueError(f'{method.name}: {flag.option} is declared differently by another method; share the '
                             f'Flag object')
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method registered as ``name``.

    Raises:
        ValueError: No such method.
    """
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown Tf-KD mode '{name}' (known: {', '.join(_METHODS)})") from None


def method_names() -> Tuple[str, ...]:
    """Every registered method name, in registration order."""
    return tuple(_METHODS)


def registered_methods() -> List[Method]:
    return list(_METHODS.values())


def registered_flags() -> List[Flag]:
    """Every flag of every method, each once, in the order they were first declared."""
    flags: Dict[str, Flag] = {}
    for method in _METHODS.values():
        for flag in method.flags:
            flags.setdefault(flag.option, flag)
    return list(flags.values())


register_method(PlainTimm())
register_method(LabelSmoothing())
register_method(VirtualTeacher())
register_method(SelfDistillation())
register_method(KnowledgeDistillation())
