"""Schemes: who learns and where the teacher comes from. Which algorithms fit which scheme is declared by the
algorithms themselves (``Algorithm.schemes``; the table is ``kd_lab.run.checks.compatibility.compatible``)."""

from kd_lab.schemes.base import Scheme
from kd_lab.schemes.offline import Offline
from kd_lab.schemes.online import Online
from kd_lab.schemes.self_distillation import SelfDistillation

__all__ = ["Offline", "Online", "Scheme", "SelfDistillation"]
