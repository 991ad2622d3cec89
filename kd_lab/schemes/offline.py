"""``offline``: a pre-trained teacher, frozen (Hinton et al. 2015; the survey's offline scheme).

Frozen means all of: no gradients, eval mode including normalization layers (BN running stats never move),
not in the optimizer, not in the student's checkpoint, and not wrapped by DDP (a parameter-free-to-train
module under DDP is an error, torchdistill#122). The module holds it outside its submodules for that.
"""

from torch import nn

from kd_lab.schemes.base import Scheme


class Offline(Scheme):
    name = "offline"
    trains_teacher = False

    def prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        teacher.requires_grad_(False)
        return teacher.eval()
