"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html) from the official
"python version" files in ``data_dir``: 50000 train / 10000 test 32x32 colour images, as ``(B, 3, 32, 32)``
inputs normalized per channel. CIFAR-100 uses the 100 fine labels.

A validation split is carved from train (``val_size``, seeded by ``split_seed``); the test split never selects
anything. Augmentation (``ImageAugment``: RepDistiller's pad-4 crop and flip) is drawn in the loader and
applied after the batch reached its device, so on a GPU it runs there.
"""

import io
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kd_lab.data.base import TensorDataModule
from kd_lab.data.batches import Batch
from kd_lab.data.image_augment import DrawOnly, ImageAugment
from kd_lab.errors import KDLabError, brief

VARIANTS = {
    # folder in the archive, train files, test files, label key, archive URL
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "fine_labels",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}
# what a CIFAR pickle may contain: numpy arrays, lists, strings and numbers (nothing that runs code)
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class CIFARUnpickler(pickle.Unpickler):
    """Loads the python-2 pickles of the official archives and refuses any other global."""

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR file")
        return super().find_class(module, name)


def read_batch_file(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One file -> uint8 images ``(n, 3, 32, 32)`` and int64 labels ``(n,)``."""
    try:
        raw = CIFARUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        entries = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
        images = np.asarray(entries["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entries[label_key], dtype=np.int64)
    except Exception as e:
        raise KDLabError(
            f"CIFAR file {path} is unreadable ({brief(e)}): it is truncated or not an official CIFAR python file. "
            "Delete it and unpack the archive again."
        ) from e
    if len(images) != len(labels):
        raise KDLabError(f"CIFAR file {path} holds {len(images)} images but {len(labels)} labels; unpack it again.")
    return images, labels


class CIFARDataModule(TensorDataModule):
    """Args:
    data_dir: the directory holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
    variant: ``cifar10`` or ``cifar100``.
    mean, std: per-channel normalization of pixels in [0, 1].
    augment: an ``ImageAugment``; its ``fill=None`` means a black border in pixel space.
    augment_on_device: apply the augmentation after the batch moved to its device (False: in the loader).
    """

    def __init__(
        self,
        data_dir: str,
        variant: str = "cifar100",
        mean: tuple[float, float, float] = (0.5071, 0.4867, 0.4408),
        std: tuple[float, float, float] = (0.2675, 0.2565, 0.2761),
        augment: ImageAugment | None = None,
        augment_on_device: bool = True,
        **kwargs,
    ):
        if variant not in VARIANTS:
            raise KDLabError(f"data.variant={variant!r} is not one of {sorted(VARIANTS)}.")
        self.mean = torch.tensor([float(v) for v in mean]).view(3, 1, 1)  # config lists are ListConfigs
        self.std = torch.tensor([float(v) for v in std]).view(3, 1, 1)
        if augment is not None and augment.fill is None:
            augment = ImageAugment(augment.padding, augment.flip, fill=(-self.mean / self.std).flatten().tolist())
        self.on_device = DrawOnly(augment) if augment is not None and augment_on_device else None
        super().__init__(augment=self.on_device or augment, **kwargs)
        self.data_dir = Path(data_dir)
        self.variant = variant

    @property
    def folder(self) -> Path:
        return self.data_dir / VARIANTS[self.variant][0]

    def _read(self, names: list[str]) -> tuple[Tensor, Tensor]:
        folder, _, _, label_key, url = VARIANTS[self.variant]
        parts = []
        for name in names:
            path = self.folder / name
            if not path.is_file():
                raise KDLabError(
                    f"{self.variant} file {path} is missing. Download {url} and unpack it into {self.data_dir} "
                    f"(`tar -xzf {url.rsplit('/', 1)[-1]} -C {self.data_dir}` makes {folder}/), or point "
                    "data.data_dir (paths.data_dir) at the directory that holds it."
                )
            parts.append(read_batch_file(path, label_key))
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        return (images.float() / 255 - self.mean) / self.std, labels

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        _, train, test, _, _ = VARIANTS[self.variant]
        return {"train": self._read(train), "test": self._read(test)}

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        return self.on_device.finish(batch) if self.on_device else batch
