"""Random inputs with learnable labels, for fast tests of any model family.

Targets are the argmax of a fixed random linear map of the inputs, so a model can learn them and a test
can tell learning from noise.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from kd_lab.data.base import TensorDataModule


class FakeDataModule(TensorDataModule):
    def __init__(
        self,
        input_shape: Sequence[int] = (1, 40),
        num_classes: int = 10,
        num_train: int = 256,
        num_test: int = 128,
        data_seed: int = 0,
        **kwargs,
    ):
        super().__init__(num_classes=num_classes, input_shape=input_shape, **kwargs)
        self.sizes = {"train": num_train, "test": num_test}
        self.data_seed = data_seed

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(self.data_seed)
        shape = self.teacher_input_shape or self.input_shape  # the raw modality (a student view derives from it)
        dim = int(torch.tensor(shape).prod())
        projection = torch.randn(dim, self.num_classes, generator=g)
        arrays = {}
        for name, n in self.sizes.items():
            x = torch.randn(n, *shape, generator=g)
            arrays[name] = (x, (x.flatten(1) @ projection).argmax(1))
        return arrays
