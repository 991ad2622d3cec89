"""A base for methods that compare one student tap with one teacher tap (relational and contrastive methods)."""

from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, StepOutputs
from kd_lab.algorithms.embedding import flat
from kd_lab.core.bounds import NonNegative
from kd_lab.core.recorder import TapSpec, resolve_tap


class OneTapPair(Algorithm):
    """Resolves ``student_tap`` / ``teacher_tap`` (a stage index, ``"embedding"`` or a module path) and hands
    ``forward`` the two recorded features flattened to ``(B, D)``; the teacher's is detached (these methods
    never train the teacher)."""

    def __init__(
        self, ce_weight: NonNegative = 1.0, student_tap: TapSpec = "embedding", teacher_tap: TapSpec = "embedding"
    ):
        super().__init__(ce_weight)
        self.tap_specs = (student_tap, teacher_tap)
        self.paths = ("", "")

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.paths = (
            resolve_tap(student, self.tap_specs[0], "student"),
            resolve_tap(teacher, self.tap_specs[1], "teacher"),
        )

    @property
    def student_taps(self) -> list[str]:
        return [self.paths[0]]

    @property
    def teacher_taps(self) -> list[str]:
        return [self.paths[1]]

    def pair(self, out: StepOutputs) -> tuple[Tensor, Tensor]:
        """(student features, detached teacher features), each flattened to ``(B, D)``."""
        return flat(out.features[self.paths[0]]), flat(out.teacher_features[self.paths[1]]).detach()
