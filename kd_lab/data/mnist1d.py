"""MNIST-1D (Greydanus 2020, "Scaling down deep learning", https://arxiv.org/abs/2011.14439).

Generated locally by the ``mnist1d`` package (no download: the package's own generator with its default
arguments, 4000 train / 1000 test signals of length 40), cached on disk as one ``.pt`` file keyed by the
generator arguments. Inputs are ``(B, 1, 40)``.
"""

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from kd_lab.data.base import TensorDataModule
from kd_lab.errors import KDLabError, brief
from kd_lab.utils.io import atomic_torch_save

log = logging.getLogger(__name__)


class MNIST1dDataModule(TensorDataModule):
    def __init__(self, data_dir: str, num_samples: int = 5000, generator_seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir)
        self.generator_args = {"num_samples": num_samples, "seed": generator_seed}

    @property
    def cache_file(self) -> Path:
        digest = hashlib.sha1(json.dumps(self.generator_args, sort_keys=True).encode()).hexdigest()[:10]
        return self.data_dir / "mnist1d" / f"mnist1d-{digest}.pt"

    def prepare_data(self) -> None:
        if self.cache_file.exists():
            return
        self._check_data_dir()  # before generating: a bad data_dir must not cost the generation first
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        for key, value in self.generator_args.items():
            setattr(args, key, value)
        log.info("Generating MNIST-1D %s -> %s", self.generator_args, self.cache_file)
        d = make_dataset(args)
        arrays = {
            "x": torch.as_tensor(d["x"], dtype=torch.float32),
            "y": torch.as_tensor(d["y"], dtype=torch.int64),
            "x_test": torch.as_tensor(d["x_test"], dtype=torch.float32),
            "y_test": torch.as_tensor(d["y_test"], dtype=torch.int64),
        }
        atomic_torch_save(arrays, self.cache_file)

    def _check_data_dir(self) -> None:
        folder = self.cache_file.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            writable = os.access(folder, os.W_OK)
        except OSError as e:
            problem = brief(e)
        else:
            problem = "" if writable else "not writable"
        if problem:
            raise KDLabError(
                f"data.data_dir={self.data_dir} cannot hold the MNIST-1D cache ({problem}); set "
                "paths.data_dir to a writable directory (it is created if missing)."
            )

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        self.prepare_data()  # idempotent; covers setup() without a Trainer (tests, probing)
        try:
            d = torch.load(self.cache_file, weights_only=True)
            arrays = {"train": (d["x"], d["y"]), "test": (d["x_test"], d["y_test"])}
        except Exception as e:
            # not regenerated silently: the file is derived data, but a corrupt one points at a disk or copy
            # problem worth seeing, and kd-lab never deletes a file it did not just write
            raise KDLabError(
                f"MNIST-1D cache file {self.cache_file} is unreadable ({brief(e, sentence=True)}): it is "
                f"truncated or corrupt; delete it (rm {self.cache_file}) and the next run regenerates it."
            ) from e
        return {name: (x.unsqueeze(1), y) for name, (x, y) in arrays.items()}
