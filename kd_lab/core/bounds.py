"""Value bounds declared once, in a constructor's signature: ``temperature: Positive = 4.0``.

``Positive`` is ``Annotated[float, Bound(...)]``: a float to the type checks, with a rule attached. The checks
before compute (``kd_lab.run.checks``) read the rule from the signature and reject a bad config value with
one sentence before anything is built; ``install_bound_checks`` makes a direct construction in Python check
the same rule. Every float bound rejects inf and nan: no loss can be computed with them.
"""

import functools
import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from kd_lab.errors import KDLabError


@dataclass(frozen=True)
class Bound:
    text: str  # what is allowed, as the message says it
    ok: Callable[[float], bool]
    example: str  # a sensible value, for the fix

    def accepts(self, value: Any) -> bool:
        items = value if isinstance(value, list | tuple) else [value]
        numbers = [v for v in items if isinstance(v, int | float) and not isinstance(v, bool)]
        return all(math.isfinite(v) and self.ok(v) for v in numbers)


Positive = Annotated[float, Bound("> 0 and finite", lambda v: v > 0, "1.0")]
NonNegative = Annotated[float, Bound(">= 0 and finite", lambda v: v >= 0, "1.0")]
UnitInterval = Annotated[float, Bound("in [0, 1]", lambda v: 0 <= v <= 1, "0.5")]
BelowOne = Annotated[float, Bound("in [0, 1)", lambda v: 0 <= v < 1, "0.5")]
AtLeastOne = Annotated[int, Bound(">= 1", lambda v: v >= 1, "1")]
AtLeastTwo = Annotated[int, Bound(">= 2", lambda v: v >= 2, "2")]
NonNegativeInt = Annotated[int, Bound(">= 0", lambda v: v >= 0, "0")]


def bounds_of(fn: Callable) -> dict[str, Bound]:
    """``{parameter: Bound}`` of the parameters annotated with one."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # annotations of other libraries that do not evaluate here
        return {}
    found = {}
    for name, hint in hints.items():
        for part in (hint, *typing.get_args(hint)):  # ``Positive | None`` too
            for meta in getattr(part, "__metadata__", ()):
                if isinstance(meta, Bound):
                    found[name] = meta
    return found


def check_value(owner: str, key: str, value: Any, bound: Bound) -> None:
    if not bound.accepts(value):
        raise KDLabError(
            f"{owner}.{key}={value} is out of range: it must be {bound.text}; set e.g. {owner}.{key}={bound.example}."
        )


def install_bound_checks(cls: type) -> None:
    """Wrap ``cls.__init__`` (if the class defines one) so that its bounded arguments are checked."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_checks_bounds", False):
        return
    bounds = bounds_of(init)
    if not bounds:
        return
    signature = inspect.signature(init)
    owner = "algorithm"

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        bound_args = signature.bind(self, *args, **kwargs)
        bound_args.apply_defaults()
        for key, rule in bounds.items():
            if key in bound_args.arguments:
                check_value(owner, key, bound_args.arguments[key], rule)
        init(self, *args, **kwargs)

    checked._checks_bounds = True  # type: ignore[attr-defined]
    cls.__init__ = checked


NonNegativeList = Annotated[list[float] | None, Bound(">= 0 and finite, each", lambda v: v >= 0, "[0.5, 0.5]")]
