"""The shared shape of kd-lab's data modules: in-memory tensors, a validation split carved from the
training set (the test split is never used for selection), and batches as dicts.

A batch is ``{"input": x, "target": y, "index": i}``; ``index`` is the sample's global index in the
training set (contrastive methods keep memory banks by it). Subclasses implement ``load()``.
"""

from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kd_lab.data.batches import TensorBatches, Transform, loader_batches
from kd_lab.data.image_augment import DrawOnly, ImageAugment
from kd_lab.errors import KDLabError

SERVE_MODES = ("auto", "tensors", "device", "loader")
DEVICE_SAFE = (ImageAugment, DrawOnly)  # draw on the host, apply on the batch's device


class TensorDataModule(L.LightningDataModule):
    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...],
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int | float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
        augment: Transform | None = None,
        student_view: Callable[[Tensor, str], Tensor] | None = None,
        teacher_input_shape: tuple[int, ...] | None = None,
        serve: str = "auto",
        device_max_mb: float = 4096,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ):
        """``serve`` (docs/performance.md): how training batches reach the model. ``tensors``: sliced from the
        tensors in host memory; ``device``: the tensors moved to the accelerator once, sliced there; ``loader``:
        sliced in ``num_workers`` DataLoader workers into pinned memory. ``auto``: ``device`` on an
        accelerator when all splits take at most ``device_max_mb`` and the augmentation runs on any device
        (none, or ``ImageAugment``), ``loader`` when they take more, ``tensors`` otherwise (and on a CPU)."""
        super().__init__()
        self.num_classes = num_classes  # declared in the data config so models can interpolate it;
        self.input_shape = tuple(input_shape)  # checked against the loaded data in setup()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.seed = seed
        self.augment = augment
        # Cross-modal data: the student sees student_view(x) as "input", the teacher x as "teacher_input".
        self.student_view = student_view
        self.teacher_input_shape = tuple(teacher_input_shape) if teacher_input_shape else None
        self.splits: dict[str, dict[str, Tensor]] = {}
        if serve not in SERVE_MODES:
            raise KDLabError(f"data.serve={serve!r} is not one of {SERVE_MODES}; 'auto' picks by size and device.")
        self.serve, self.device_max_mb = serve, device_max_mb
        self.loader_options = {"num_workers": num_workers, "pin_memory": pin_memory}
        self.loader_options["persistent_workers"] = persistent_workers
        self._device_splits: dict[str, dict[str, Tensor]] = {}

    # -- to implement ----------------------------------------------------------------------------------
    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Return ``{"train": (x, y), "test": (x, y)}`` as float inputs and int64 targets."""
        raise NotImplementedError

    # -- Lightning hooks -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        arrays = self.load()
        if self.student_view is not None:
            arrays = {name: (self.student_view(x, name), y, x) for name, (x, y) in arrays.items()}
        for name, (x, y, *teacher_x) in arrays.items():
            check_split(name, x, y, self.num_classes, self.input_shape)
            if teacher_x:
                check_split(name, teacher_x[0], y, self.num_classes, self.teacher_input_shape or x.shape[1:])
        test = split_dict(*arrays["test"])
        train = split_dict(*arrays["train"])
        n = len(train["target"])
        n_val = round(self.val_size * n) if isinstance(self.val_size, float) else self.val_size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        for name, idx in (("train", order[n_val:].sort().values), ("val", order[:n_val].sort().values)):
            self.splits[name] = {key: t[idx] for key, t in train.items()}
            self.splits[name]["index"] = torch.arange(len(idx))
        self.splits["test"] = test

    def example_input(self, key: str = "input", n: int = 2) -> Tensor:
        """A few training inputs, for probing feature shapes with one forward."""
        self.setup()
        return self.splits["train"][key][:n]

    @property
    def teacher_input_key(self) -> str:
        """``teacher_input`` when teacher and student see different modalities (cross-modal data)."""
        self.setup()
        return "teacher_input" if "teacher_input" in self.splits["train"] else "input"

    @property
    def num_train(self) -> int:
        self.setup()
        return len(self.splits["train"]["target"])

    @property
    def train_targets(self) -> Tensor:
        """The label of every training index (``batch["index"]`` indexes this)."""
        self.setup()
        return self.splits["train"]["target"]

    def may_use_loader(self) -> bool:
        """Whether training batches may come through DataLoader workers (``serving_mode`` on some device)."""
        if self.serve != "auto":
            return self.serve == "loader"
        size_mb = sum(t.numel() * t.element_size() for s in self.splits.values() for t in s.values()) / 2**20
        return size_mb > self.device_max_mb

    def serving_mode(self, device: torch.device) -> str:
        """``tensors``, ``device`` or ``loader`` (see ``__init__``'s ``serve``)."""
        if self.serve != "auto":
            return self.serve
        if device.type == "cpu":
            return "tensors"
        if self.may_use_loader():
            return "loader"
        return "device" if self.augment is None or isinstance(self.augment, DEVICE_SAFE) else "tensors"

    def _served(self, split: str, mode: str, device: torch.device) -> dict[str, Tensor]:
        if mode != "device":
            return self.splits[split]
        if split not in self._device_splits:  # once per run: later epochs and loaders reuse the device copy
            self._device_splits[split] = {key: t.to(device) for key, t in self.splits[split].items()}
        return self._device_splits[split]

    def _loader(self, split: str, train: bool) -> TensorBatches | DataLoader:
        self.setup()
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        mode = self.serving_mode(device)
        batches = TensorBatches(
            self._served(split, mode, device),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            seed=self.seed,
            transform=self.augment if train else None,
            epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else (lambda: 0),
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )
        served = loader_batches(batches, **self.loader_options) if mode == "loader" else batches
        return served

    def train_dataloader(self) -> TensorBatches:
        return self._loader("train", train=True)

    def val_dataloader(self) -> TensorBatches:
        return self._loader("val", train=False)

    def test_dataloader(self) -> TensorBatches:
        return self._loader("test", train=False)


def split_dict(x: Tensor, y: Tensor, teacher_x: Tensor | None = None) -> dict[str, Tensor]:
    split = {"input": x, "target": y, "index": torch.arange(len(y))}
    if teacher_x is not None:
        split["teacher_input"] = teacher_x
    return split


def check_split(name: str, x: Tensor, y: Tensor, num_classes: int, input_shape: tuple[int, ...]) -> None:
    """Fail before training on data that would silently poison it."""
    if len(x) != len(y):
        raise KDLabError(f"data split '{name}': {len(x)} inputs but {len(y)} targets; regenerate the data files.")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise KDLabError(
            f"data split '{name}': inputs of shape {tuple(x.shape[1:])}, but the data config declares "
            f"{tuple(input_shape)}; set data.input_shape={list(x.shape[1:])} or regenerate the data files."
        )
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten()[:5].tolist()
        raise KDLabError(
            f"data split '{name}': NaN or Inf in the inputs (first bad samples: {bad}); clean or regenerate the data."
        )
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise KDLabError(
            f"data split '{name}': targets span [{int(y.min())}, {int(y.max())}] but the data declares "
            f"{num_classes} classes; fix data.num_classes or the labels."
        )
