"""scikit-learn's bundled ``digits`` (1797 8x8 grey images, 10 classes) as ``(B, 1, 8, 8)`` inputs in [0, 1].

It ships with scikit-learn, so no download. It has no official test split: a fixed 20% (``test_seed``)
is held out as the test set, and the validation split is carved from the rest as for every data module.
"""

import torch
from torch import Tensor

from kd_lab.data.base import TensorDataModule


class DigitsDataModule(TensorDataModule):
    def __init__(self, test_fraction: float = 0.2, test_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.test_fraction = test_fraction
        self.test_seed = test_seed

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.as_tensor(digits.target, dtype=torch.int64)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.test_seed))
        n_test = round(self.test_fraction * len(x))
        test, train = order[:n_test].sort().values, order[n_test:].sort().values
        return {"train": (x[train], y[train]), "test": (x[test], y[test])}
