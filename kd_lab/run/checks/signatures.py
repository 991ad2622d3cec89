"""What a config node may hold, read from the signature of the callable that receives it.

A node's ``_target_`` (a class or a factory function) is the single source of truth: its parameters are the
keys the node may have, their annotations the types the values must have. ``**kwargs`` that a kd-lab class
hands to its kd-lab base class are followed up the MRO; ``**kwargs`` that leave kd-lab (W&B's ``init``
arguments, say) make the node *open*: its other keys cannot be checked here.
"""

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class Signature:
    params: dict[str, inspect.Parameter]
    hints: dict[str, Any]
    open: bool  # takes **kwargs that go outside kd-lab: unknown keys cannot be judged


def _own_kd_lab(obj: Any) -> bool:
    return getattr(obj, "__module__", "").startswith("kd_lab")


def _hints(fn: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not evaluate here (forward refs of other libraries)
        return {}


def _keyword_params(fn: Callable) -> tuple[dict[str, inspect.Parameter], bool]:
    params, takes_kwargs = {}, False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            takes_kwargs = True
        elif p.kind is not p.VAR_POSITIONAL and p.name != "self":
            params[p.name] = p
    return params, takes_kwargs


def signature_of(target: Callable) -> Signature:
    if not inspect.isclass(target):
        params, takes_kwargs = _keyword_params(target)
        return Signature(params, _hints(target), open=takes_kwargs)
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    inits = [k.__dict__["__init__"] for k in target.__mro__ if "__init__" in k.__dict__ and k is not object]
    for i, init in enumerate(inits):
        own, takes_kwargs = _keyword_params(init)
        own_hints = _hints(init)
        for name, p in own.items():
            params.setdefault(name, p)
            if name in own_hints:
                hints.setdefault(name, own_hints[name])
        if not takes_kwargs:
            return Signature(params, hints, open=False)
        if not (_own_kd_lab(init) and i + 1 < len(inits) and _own_kd_lab(inits[i + 1])):
            return Signature(params, hints, open=True)
    return Signature(params, hints, open=bool(inits))


_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection)


def fits(value: Any, tp: Any) -> bool:
    """Whether a (resolved) config value can be passed where ``tp`` is annotated. Types that a config value
    cannot be judged against (callables, modules, protocols) accept anything."""
    if tp is Any or tp is EMPTY or isinstance(tp, str | typing.ForwardRef | typing.TypeVar):
        return True
    if isinstance(value, dict) and "_target_" in value:
        return True  # instantiated into whatever its own target builds (checked as a node of its own)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is Path:
        return isinstance(value, str)
    if origin in _SEQUENCES or tp in _SEQUENCES:
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(fits(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or tp in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if inspect.isclass(tp) and isinstance(value, tp):
        return True
    if value is None or isinstance(value, bool | int | float | str | list):
        return not inspect.isclass(tp)  # a plain value where a class (a module, a tensor) is expected
    return True


def type_name(tp: Any) -> str:
    """``float | None``; a Literal lists its values (``'32-true' | 16 | ...``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(dict.fromkeys(type_name(a) for a in args))
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if tp is type(None):
        return "None"
    if inspect.isclass(tp) and not args:
        return tp.__name__
    return str(tp).replace("typing.", "").replace("collections.abc.", "").replace("NoneType", "None")
