"""Schemes, and the one place that declares which algorithms fit which scheme."""

from kd_lab.errors import KDLabError
from kd_lab.schemes.base import Scheme
from kd_lab.schemes.offline import Offline
from kd_lab.schemes.online import Online
from kd_lab.schemes.self_distillation import SelfDistillation

# scheme name -> algorithm names it can run. An algorithm missing here cannot run under that scheme.
COMPATIBLE: dict[str, frozenset[str]] = {
    "offline": frozenset(
        {
            "none",
            "kd",
            "adversarial",
            "cross_modal",
            "multi_teacher",
            "sp",
            "rkd",
            "pkt",
            "crd",
            "crd_kd",
            "dkd",
            "fitnet",
            "attention",
            "teacher_assistant",
        }
    ),
    # the teacher learns too: its outputs reach the algorithm detached; the scheme adds its own terms
    "online": frozenset(
        {
            "kd",
            "dkd",
            "fitnet",
            "attention",
            "sp",
            "rkd",
            "pkt",
            "crd",
            "crd_kd",
            "adversarial",
            "cross_modal",
            "codistillation",
        }
    ),
    "self": frozenset({"byot", "born_again"}),
}


def check_compatible(algorithm: str, scheme: str) -> None:
    if scheme not in COMPATIBLE:
        raise KDLabError(f"unknown scheme '{scheme}'; valid schemes: {sorted(COMPATIBLE)}.")
    if algorithm not in COMPATIBLE[scheme]:
        fits = sorted(s for s, algs in COMPATIBLE.items() if algorithm in algs)
        raise KDLabError(
            f"algorithm '{algorithm}' cannot run under scheme '{scheme}'. "
            f"Under '{scheme}' pick one of {sorted(COMPATIBLE[scheme])}"
            + (f", or run '{algorithm}' with scheme={'|'.join(fits)}." if fits else ".")
        )


__all__ = ["COMPATIBLE", "Offline", "Online", "Scheme", "SelfDistillation", "check_compatible"]
