"""How training batches reach the model: host tensors, device-resident tensors, or DataLoader workers for large
data; the same batches whichever way they come."""

import pytest
import torch

from kd_lab.data import FakeDataModule, ImageAugment, SignalAugment
from kd_lab.data.batches import TensorBatches, loader_batches
from kd_lab.errors import KDLabError
from kd_lab.run.train import train


def tensors(n: int = 23) -> dict[str, torch.Tensor]:
    x = torch.randn(n, 1, 8, generator=torch.Generator().manual_seed(0))
    return {"input": x, "target": torch.arange(n) % 3, "index": torch.arange(n)}


def indices(batches) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_the_tensor_batches(workers):
    epoch = {"e": 0}
    for rank in (0, 1):
        plain = TensorBatches(tensors(), 4, shuffle=True, drop_last=True, seed=3, epoch_fn=lambda: epoch["e"],
                              rank=rank, world_size=2)  # fmt: skip
        loader = loader_batches(plain, num_workers=workers, pin_memory=False)
        for e in (0, 1):  # persistent workers must follow the epoch
            epoch["e"] = e
            expected = list(plain)
            got = list(loader)
            assert indices(got) == indices(expected) and len(got) == len(plain)
            assert all(torch.equal(g["input"], x["input"]) for g, x in zip(got, expected, strict=True))


def test_loader_augmentation_is_a_function_of_seed_epoch_and_batch():
    def draw(workers):
        plain = TensorBatches(tensors(), 4, shuffle=True, drop_last=True, transform=SignalAugment(noise_std=0.5))
        return [b["input"] for b in loader_batches(plain, num_workers=workers, pin_memory=False)]

    first, again, parallel = draw(0), draw(0), draw(2)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, again, parallel, strict=True))


def test_serving_rule_by_device_size_and_augmentation():
    def module(**kwargs):
        dm = FakeDataModule(num_train=64, num_test=16, batch_size=8, **kwargs)
        dm.setup()
        return dm

    gpu = torch.device("cuda")  # only the rule is asked: nothing is moved
    assert module().serving_mode(torch.device("cpu")) == "tensors"
    assert module().serving_mode(gpu) == "device"
    assert module(augment=SignalAugment(max_shift=2)).serving_mode(gpu) == "tensors"  # draws mixed on the host
    assert module(augment=ImageAugment(padding=0), input_shape=(1, 4, 4)).serving_mode(gpu) == "device"
    assert module(device_max_mb=1e-4).serving_mode(gpu) == "loader"
    assert module(serve="loader").serving_mode(torch.device("cpu")) == "loader"
    with pytest.raises(KDLabError, match=r"data\.serve='fast' is not one of"):
        module(serve="fast")


def test_a_run_trains_from_dataloader_workers(make_cfg):
    results, objects = train(make_cfg("data.serve=loader", "data.num_workers=1", "trainer.max_epochs=1"))
    assert results["status"] == "finished"
    assert isinstance(objects["datamodule"].train_dataloader(), torch.utils.data.DataLoader)


def test_device_serving_moves_the_splits_once(make_cfg):
    results, objects = train(make_cfg("data.serve=device", "trainer.max_epochs=2"))
    datamodule = objects["datamodule"]
    assert results["status"] == "finished" and set(datamodule._device_splits) >= {"train", "val"}
