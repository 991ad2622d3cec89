"""Which algorithm runs under which scheme and on which task: derived from what each algorithm class declares
(``Algorithm.schemes``, ``Algorithm.task_kinds``), never written down twice. An invalid pair fails before
anything is built, with the options that would work."""

from functools import cache

from hydra._internal.utils import _locate
from omegaconf import OmegaConf

from kd_lab.errors import KDLabError
from kd_lab.run.builders import CONFIG_DIR, group_options

SCHEMES = ("offline", "online", "self")


@cache
def algorithm_classes() -> dict[str, type]:
    """``{option: class}`` of every shipped algorithm config (``conf/algorithm/<option>.yaml``)."""
    classes = {}
    for name in group_options("algorithm"):
        target = OmegaConf.load(CONFIG_DIR / "algorithm" / f"{name}.yaml").get("_target_")
        if target:
            classes[name] = _locate(target)
    return classes


def compatible() -> dict[str, list[str]]:
    """``{scheme: [algorithm options that run under it]}`` (the table docs and tests show)."""
    return {s: sorted(n for n, c in algorithm_classes().items() if s in c.schemes) for s in SCHEMES}


def check_compatible(algorithm: str, target: str | None, scheme: str, task_kind: str | None = None) -> None:
    """Refuse an algorithm (config option ``algorithm``, class at ``target``) under ``scheme`` or on a task of
    kind ``task_kind``."""
    if scheme not in SCHEMES:
        raise KDLabError(f"unknown scheme '{scheme}'; valid schemes: {list(SCHEMES)}.")
    cls = _locate(target) if target else algorithm_classes().get(algorithm)
    if cls is None:
        return  # an algorithm config without a target: the schema check reports it
    if scheme not in cls.schemes:
        table = compatible()
        fits = [s for s in SCHEMES if s in cls.schemes]
        raise KDLabError(
            f"algorithm '{algorithm}' cannot run under scheme '{scheme}'. "
            f"Under '{scheme}' pick one of {table[scheme]}"
            + (f", or run '{algorithm}' with scheme={'|'.join(fits)}." if fits else ".")
        )
    if task_kind is not None and task_kind not in cls.task_kinds:
        fits = sorted(n for n, c in algorithm_classes().items() if task_kind in c.task_kinds and scheme in c.schemes)
        raise KDLabError(
            f"algorithm '{algorithm}' cannot run on a {task_kind} task: it supports {sorted(cls.task_kinds)}. "
            f"On {task_kind} under scheme '{scheme}' pick one of {fits}."
        )
