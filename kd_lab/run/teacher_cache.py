"""Teacher outputs computed once and reused every epoch (``perf.cache_teacher=true``).

A frozen teacher (offline scheme) in eval mode is a fixed function of its input. When the input of training
sample ``i`` is the same every epoch (no augmentation, no random transform), its logits and the features the
algorithm taps are the same too, so one pass over the training set replaces a teacher forward per step: the
distillation epoch then costs what the vanilla student's epoch costs. Batches carry each sample's global
``index``, which selects the cached rows.

The cache refuses (``KDLabError``) where it would be wrong: augmentation on the training batches (mixup,
shift, crop, noise: the teacher would have seen other inputs), or teachers that learn. Under DDP every rank
caches the whole training set (it is read by index, and ranks see different shards each epoch).
"""

import logging

import torch
from torch import Tensor, nn

from kd_lab.core.recorder import FeatureRecorder
from kd_lab.errors import KDLabError

log = logging.getLogger(__name__)


def check_cacheable(datamodule, trains_teacher: bool) -> None:
    """Refuse the cache for runs whose teacher outputs change from epoch to epoch."""
    augment = getattr(datamodule, "augment", None)
    if augment is not None:
        name = type(getattr(augment, "augment", augment)).__name__
        raise KDLabError(
            f"perf.cache_teacher=true needs the same teacher inputs every epoch, but data.augment ({name}) draws "
            "new ones for every batch (shift/scale/noise/mixup, or crop/flip), so cached teacher outputs would be "
            "wrong. Set data.augment=null to train without augmentation, or perf.cache_teacher=false."
        )
    if trains_teacher:
        raise KDLabError(
            "perf.cache_teacher=true needs a frozen teacher, but this scheme trains the teacher (its outputs change "
            "every step); use scheme=offline or perf.cache_teacher=false."
        )


class TeacherCache:
    """Every teacher's logits and tapped features for every training sample, filled on first use."""

    def __init__(self, inputs: Tensor, batch_size: int = 1000):
        self.inputs = inputs  # the training split's teacher inputs, indexed by the batches' "index"
        self.batch_size = batch_size
        self.logits: list[Tensor] = []
        self.features: list[dict[str, Tensor]] = []

    @property
    def filled(self) -> bool:
        return bool(self.logits)

    @property
    def nbytes(self) -> int:
        tensors = [*self.logits, *(f for feats in self.features for f in feats.values())]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def fill(self, teachers: list[nn.Module], recorders: list[FeatureRecorder], device: torch.device) -> None:
        for teacher, recorder in zip(teachers, recorders, strict=True):
            if teacher.training:
                raise KDLabError("the teacher cache needs teachers in eval mode (a frozen, offline teacher).")
            logits, features = [], []
            for start in range(0, len(self.inputs), self.batch_size):
                x = self.inputs[start : start + self.batch_size].to(device)
                with recorder:
                    logits.append(teacher(x))
                features.append(recorder.features)
            self.logits.append(torch.cat(logits))
            self.features.append({path: torch.cat([f[path] for f in features]) for path in recorder.paths})
        log.info(
            "teacher cache: %d samples, %d teacher(s), %.2f MiB (%d bytes) on %s",
            len(self.inputs),
            len(teachers),
            self.nbytes / 2**20,
            self.nbytes,
            device,
        )

    def lookup(self, index: Tensor) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """Each teacher's logits and features for the samples ``index`` (global training indices)."""
        index = index.to(self.logits[0].device)
        logits = [z.index_select(0, index) for z in self.logits]
        features = [{path: f.index_select(0, index) for path, f in feats.items()} for feats in self.features]
        return logits, features
