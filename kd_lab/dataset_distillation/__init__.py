"""Dataset distillation: learn a small synthetic training set that trains a model from scratch.

Wang, Zhu, Torralba, Efros 2018 (arXiv:1811.10959) posed the problem. Two methods are built here:

- ``gm``: gradient matching (Zhao, Mopuri, Bilen, ICLR 2021, arXiv:2006.05929). The synthetic examples of a
  class are moved so that a network's gradient on them points like its gradient on real examples of that class.
- ``dm``: distribution matching (Zhao, Bilen, WACV 2023, arXiv:2110.04181). The synthetic examples of a class
  are moved so that their mean embedding under a randomly initialized network equals the real mean embedding.

Modules: ``matching`` (the two distances), ``synthesis`` (the loops), ``evaluate`` (a model trained from
scratch on a set, tested), ``app`` (the ``kd-lab-distill-data`` Hydra app). See docs/dataset_distillation.md.
"""

from kd_lab.dataset_distillation.matching import (
    gradient_distance,
    layer_gradient_distance,
    mean_embedding_distance,
)

__all__ = ["gradient_distance", "layer_gradient_distance", "mean_embedding_distance"]
