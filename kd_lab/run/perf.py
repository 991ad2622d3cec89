"""``conf/perf``: speed switches that leave the run's math alone, as one frozen plan handed to the run's
assembly (``kd_lab.run.assemble``). Nothing is switched on an object after it is built.

- ``cache_teacher``: teacher outputs computed once for the training set (``kd_lab.run.teacher_cache``);
  refused with a clear error when augmentation or a learning teacher would make them wrong.
- ``teacher_inference_mode``: frozen teachers run under ``torch.inference_mode`` (no autograd bookkeeping at
  all); their outputs are cloned into normal tensors, which the losses may save for backward.
- ``channels_last``: NHWC memory format for the models and for 4-D (image) batches, what cuDNN's tensor-core
  convolutions want under bf16; a no-op for 1-D signals and MLPs.
- ``compile``: ``nn.Module.compile()`` of student and teacher, in place, so state-dict keys (checkpoints) are
  unchanged; ``compile_backend`` picks torch.compile's backend.
- ``view_store``: the frozen teacher's outputs for every augmented training view, written by the first run
  and read by every later run that asks the same (``kd_lab.run.view_store``). ``auto``: used where it is
  exact, off elsewhere; ``true``: refused with a clear error where it cannot be exact; ``false``: off.
  ``view_store_topk``: store the top k logits per view (fp16) instead of all of them; ``view_store_max_mb``:
  the largest store one run may write.
- ``check_finite_every``: steps between non-finite loss checks (``kd_lab.core.step_stats.FiniteGuard``);
  None: every step on a CPU, every 50 on an accelerator (each check is a host sync there).
"""

from dataclasses import asdict, dataclass

from kd_lab.core.bounds import AtLeastOne, Positive
from kd_lab.core.step import StepPlan
from kd_lab.errors import KDLabError


@dataclass(frozen=True)
class PerfPlan:
    cache_teacher: bool = False
    teacher_inference_mode: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    check_finite_every: AtLeastOne | None = None
    view_store: bool | str = "auto"
    view_store_topk: AtLeastOne | None = None
    view_store_max_mb: Positive = 4096.0

    def __post_init__(self):
        if self.view_store not in (True, False, "auto"):
            raise KDLabError(f"perf.view_store={self.view_store!r}: use auto, true or false.")

    @property
    def step_plan(self) -> StepPlan:
        return StepPlan(teacher_inference_mode=self.teacher_inference_mode, channels_last=self.channels_last)

    def as_dict(self) -> dict:
        return asdict(self)
