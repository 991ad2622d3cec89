"""One place that turns what a model returns into what the distillation step needs.

Models of kd-lab return a Tensor of logits. Models of other libraries return more:
a tuple whose first element is the logits, or a Hugging Face ``ModelOutput`` with ``.logits``.
``logits_of`` reads any of them. ``feature_of`` applies the same rule to a recorded module output:
a transformer block returns a tuple whose first element is its hidden state, so a tap on
``transformer.h.2`` records that hidden state.
"""

from typing import Any

from torch import Tensor

from kd_lab.errors import KDLabError


def first_tensor(value: Any) -> Tensor | None:
    """The Tensor that a module output stands for, or None.

    The rule: a Tensor is itself; a tuple or list gives its first element; a mapping or a dataclass
    such as ``ModelOutput`` gives ``logits``, then ``last_hidden_state``, then its first Tensor field.
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list):
        return first_tensor(value[0]) if value else None
    for key in ("logits", "last_hidden_state"):
        found = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
        if isinstance(found, Tensor):
            return found
    if isinstance(value, dict) or hasattr(value, "values"):
        for item in value.values():
            if isinstance(item, Tensor):
                return item
    return None


def logits_of(output: Any, role: str = "model") -> Tensor:
    """The logits in a model's output (a Tensor, a tuple, or a ``ModelOutput``)."""
    if isinstance(output, Tensor):  # the common case, first
        return output
    found = first_tensor(output)
    if found is None:
        raise KDLabError(
            f"the {role} returned {type(output).__name__}, which holds no logits Tensor; return a Tensor, "
            "a tuple that starts with the logits, or an object with a .logits field."
        )
    return found


def feature_of(output: Any) -> Any:
    """A recorded module output as the algorithms see it: the Tensor it stands for, or the output unchanged
    when it holds none (an algorithm that taps such a module gets what the module returned)."""
    if isinstance(output, Tensor):
        return output
    found = first_tensor(output)
    return output if found is None else found
