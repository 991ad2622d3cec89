"""CIFAR-10/100 read from tiny files in the official python-pickle format, the clear errors for missing and
corrupt files, and the on-device crop/flip augmentation."""

import pickle
from pathlib import Path

import pytest
import torch
from helpers import LAYOUT, write_fake_cifar

from kd_lab.data import CIFARDataModule, ImageAugment
from kd_lab.data.image_augment import CROP_KEY, FLIP_KEY
from kd_lab.errors import KDLabError


def make(root: Path, variant: str = "cifar100", **kwargs) -> CIFARDataModule:
    classes = LAYOUT[variant][4]
    return CIFARDataModule(str(root), variant, num_classes=classes, input_shape=(3, 32, 32), val_size=6, **kwargs)


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_reads_the_official_layout_and_normalizes(tmp_path, variant):
    write_fake_cifar(tmp_path, variant)
    dm = make(tmp_path, variant)
    dm.setup()
    n_train = 12 * len(LAYOUT[variant][1])
    assert len(dm.splits["train"]["target"]) == n_train - 6 and len(dm.splits["val"]["target"]) == 6
    assert dm.splits["test"]["input"].shape == (12, 3, 32, 32)
    # pixel 0 of the first test image, channel 0, undone by hand from the raw file
    raw = pickle.loads((tmp_path / LAYOUT[variant][0] / LAYOUT[variant][2][0]).read_bytes())
    expected = (raw[b"data"][0, 0] / 255 - dm.mean[0, 0, 0]) / dm.std[0, 0, 0]
    assert dm.splits["test"]["input"][0, 0, 0, 0].item() == pytest.approx(float(expected), abs=1e-5)
    assert dm.splits["test"]["target"].tolist() == raw[LAYOUT[variant][3]]


def test_validation_split_is_seeded_and_disjoint_from_train(tmp_path):
    write_fake_cifar(tmp_path)
    a, b, c = make(tmp_path), make(tmp_path), make(tmp_path, split_seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.splits["val"]["input"], b.splits["val"]["input"])
    assert not torch.equal(a.splits["val"]["input"], c.splits["val"]["input"])
    flat = {tuple(x.flatten()[:8].tolist()) for x in a.splits["train"]["input"]}
    assert not any(tuple(x.flatten()[:8].tolist()) in flat for x in a.splits["val"]["input"])


def test_missing_files_name_the_path_and_the_download(tmp_path):
    with pytest.raises(KDLabError) as err:
        make(tmp_path).setup()
    message = str(err.value)
    assert str(tmp_path / "cifar-100-python" / "train") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message and "tar -xzf" in message


def test_corrupt_file_says_so(tmp_path):
    write_fake_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:100])  # truncated download
    with pytest.raises(KDLabError, match=r"unreadable.*unpack the archive again"):
        make(tmp_path).setup()


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps({b"data": Path("x")}))
    with pytest.raises(KDLabError, match="unexpected object"):
        make(tmp_path).setup()


def batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input": torch.randn(n, 3, 32, 32, generator=g), "target": torch.arange(n)}


def test_augment_is_deterministic_per_generator_and_keeps_shape():
    aug, b = ImageAugment(padding=4, flip=True), batch()
    one = aug(b, torch.Generator().manual_seed(3))["input"]
    two = aug(b, torch.Generator().manual_seed(3))["input"]
    other = aug(b, torch.Generator().manual_seed(4))["input"]
    assert one.shape == b["input"].shape and torch.equal(one, two) and not torch.equal(one, other)


def test_crop_and_flip_move_pixels_as_torchvision_does():
    """Crop (row, col) offsets from the padded image, then mirror: checked against explicit padding + slicing."""
    aug = ImageAugment(padding=4, flip=True, fill=[-1.0, -2.0, -3.0])
    x = batch(2)["input"]
    draws = {CROP_KEY: torch.tensor([[0, 8], [5, 2]]), FLIP_KEY: torch.tensor([True, False])}
    out = aug.apply(x, draws)
    padded = torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1).repeat(2, 1, 40, 40)
    padded[:, :, 4:36, 4:36] = x
    assert torch.equal(out[0], padded[0, :, 0:32, 8:40].flip(-1))
    assert torch.equal(out[1], padded[1, :, 5:37, 2:34])


def test_loader_draws_and_device_hook_applies_the_same_augmentation(tmp_path):
    """On-device mode (draws in the loader, pixels after transfer) equals augmenting in the loader, and
    epochs differ: the draws are a function of (seed, epoch)."""
    write_fake_cifar(tmp_path)
    on_device = make(tmp_path, augment=ImageAugment(), seed=5, batch_size=4)
    in_loader = make(tmp_path, augment=ImageAugment(), augment_on_device=False, seed=5, batch_size=4)
    first = next(iter(on_device.train_dataloader()))
    assert set(first) >= {CROP_KEY, FLIP_KEY}  # nothing moved yet: the draws travel with the batch
    done = on_device.on_after_batch_transfer(first, 0)
    assert CROP_KEY not in done and done["input"].shape == (4, 3, 32, 32)
    assert torch.equal(done["input"], next(iter(in_loader.train_dataloader()))["input"])

    def epoch_input(epoch: int) -> torch.Tensor:
        loader = on_device.train_dataloader()
        loader.epoch_fn = lambda: epoch
        return on_device.on_after_batch_transfer(next(iter(loader)), 0)["input"]

    assert torch.equal(epoch_input(1), epoch_input(1)) and not torch.equal(epoch_input(1), done["input"])


def test_lightning_applies_the_augmentation_before_the_step(tmp_path):
    """The trainer calls the data module's transfer hook: a training step sees augmented pixels, no draws."""
    import lightning as L

    write_fake_cifar(tmp_path)
    dm = make(tmp_path, augment=ImageAugment(), batch_size=4)
    seen = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            seen.append(batch)
            return self.layer(batch["input"][:, :1, 0, 0]).sum()

        def validation_step(self, batch, batch_idx):  # evaluation batches carry no draws
            assert CROP_KEY not in batch

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(Probe(), datamodule=dm)
    (step,) = seen
    raw = dm.splits["train"]["input"][step["index"]]
    assert CROP_KEY not in step and step["input"].shape == raw.shape and not torch.equal(step["input"], raw)


def test_default_fill_is_black_in_pixel_space(tmp_path):
    write_fake_cifar(tmp_path)
    dm = make(tmp_path, augment=ImageAugment(fill=None))
    black = (-dm.mean / dm.std).flatten()
    assert torch.allclose(torch.tensor(dm.on_device.augment.fill), black)
