"""Plain ``nn.Module`` families, built from Hydra ``_target_``. A model returns logits and nothing else:
intermediate features are recorded by module path (see ``kd_lab.core.recorder``), never returned."""

from kd_lab.models.cnn1d import CNN1d
from kd_lab.models.cnn2d import CNN2d
from kd_lab.models.mlp import MLP

__all__ = ["MLP", "CNN1d", "CNN2d"]
