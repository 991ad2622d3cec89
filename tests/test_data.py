import pytest
import torch

from kd_lab.data import DigitsDataModule, FakeDataModule, MNIST1dDataModule, SignalAugment
from kd_lab.data.batches import TensorBatches
from kd_lab.errors import KDLabError


def tensors(n: int = 10) -> dict[str, torch.Tensor]:
    return {"input": torch.arange(n, dtype=torch.float32).view(n, 1, 1), "index": torch.arange(n)}


def test_batches_cover_the_data_once_per_epoch():
    loader = TensorBatches(tensors(10), batch_size=3, shuffle=True, drop_last=False)
    seen = torch.cat([b["index"] for b in loader])
    assert len(loader) == 4 and sorted(seen.tolist()) == list(range(10))


def test_order_is_a_function_of_seed_and_epoch():
    epoch = {"e": 0}

    def make(seed):
        return TensorBatches(tensors(), 4, shuffle=True, drop_last=True, seed=seed, epoch_fn=lambda: epoch["e"])

    first = [b["index"].tolist() for b in make(0)]
    assert first == [b["index"].tolist() for b in make(0)]
    assert first != [b["index"].tolist() for b in make(1)]
    epoch["e"] = 1
    assert first != [b["index"].tolist() for b in make(0)]


def test_ddp_shards_are_disjoint_and_equal_for_training():
    shards = [TensorBatches(tensors(11), 2, shuffle=True, drop_last=True, rank=r, world_size=2) for r in (0, 1)]
    a, b = ([i for batch in s for i in batch["index"].tolist()] for s in shards)
    assert len(shards[0]) == len(shards[1]) == 2
    assert not set(a) & set(b)


def test_augment_is_deterministic_given_the_generator():
    aug = SignalAugment(max_shift=3, scale=0.2, noise_std=0.1, mixup_alpha=0.4)
    batch = {"input": torch.randn(8, 1, 40), "target": torch.arange(8)}
    one = aug(batch, torch.Generator().manual_seed(5))
    two = aug(batch, torch.Generator().manual_seed(5))
    assert torch.equal(one["input"], two["input"]) and torch.equal(one["mix_lam"], two["mix_lam"])
    assert one["input"].shape == batch["input"].shape


def test_shift_moves_the_signal_and_zero_pads():
    x = torch.arange(1, 11, dtype=torch.float32).view(1, 1, 10).repeat(64, 1, 1)
    out = SignalAugment(max_shift=2)({"input": x, "target": torch.zeros(64)}, torch.Generator().manual_seed(0))["input"]
    for row in out[:, 0]:
        nonzero = row[row != 0]
        assert torch.equal(nonzero, torch.arange(nonzero[0].item(), nonzero[0].item() + len(nonzero)))
        assert len(nonzero) >= 8


def test_validation_split_is_carved_from_train_and_fixed():
    dm = FakeDataModule(num_train=100, num_test=20, val_size=0.2, seed=3)
    dm.setup()
    assert len(dm.splits["val"]["target"]) == 20 and len(dm.splits["train"]["target"]) == 80
    other = FakeDataModule(num_train=100, num_test=20, val_size=0.2, seed=7)  # another run seed: same split
    other.setup()
    assert torch.equal(dm.splits["val"]["input"], other.splits["val"]["input"])
    train_rows = {tuple(r.flatten().tolist()) for r in dm.splits["train"]["input"]}
    assert not any(tuple(r.flatten().tolist()) in train_rows for r in dm.splits["val"]["input"])


def test_mnist1d_is_generated_once_and_cached(data_dir):
    dm = MNIST1dDataModule(data_dir=str(data_dir), num_classes=10, input_shape=(1, 40))
    dm.setup()
    assert dm.cache_file.is_file()
    assert dm.splits["train"]["input"].shape == (3600, 1, 40)
    assert dm.splits["val"]["input"].shape == (400, 1, 40)
    assert dm.splits["test"]["input"].shape == (1000, 1, 40)
    mtime = dm.cache_file.stat().st_mtime_ns
    again = MNIST1dDataModule(data_dir=str(data_dir), num_classes=10, input_shape=(1, 40))
    again.setup()
    assert dm.cache_file.stat().st_mtime_ns == mtime
    assert torch.equal(again.splits["test"]["input"], dm.splits["test"]["input"])


def test_corrupt_mnist1d_cache_is_a_clear_error(tmp_path):
    dm = MNIST1dDataModule(data_dir=str(tmp_path), num_classes=10, input_shape=(1, 40))
    dm.cache_file.parent.mkdir(parents=True)
    dm.cache_file.write_bytes(b"not a torch file")
    with pytest.raises(KDLabError, match=r"unreadable.*delete it"):
        dm.setup()


def test_digits_are_2d_images():
    dm = DigitsDataModule(num_classes=10, input_shape=(1, 8, 8))
    dm.setup()
    x = dm.splits["train"]["input"]
    assert x.shape[1:] == (1, 8, 8) and x.min() >= 0 and x.max() <= 1
    n = sum(len(s["target"]) for s in dm.splits.values())
    assert n == 1797


def test_nan_inputs_fail_before_training():
    dm = FakeDataModule()
    original = dm.load

    def poisoned():
        arrays = original()
        arrays["train"][0][3, 0, 5] = float("nan")
        return arrays

    dm.load = poisoned
    with pytest.raises(KDLabError, match=r"NaN or Inf in the inputs \(first bad samples: \[3\]\)"):
        dm.setup()


def test_declared_class_count_is_checked_against_the_labels():
    with pytest.raises(KDLabError, match="declares 3 classes"):
        DigitsDataModule(num_classes=3, input_shape=(1, 8, 8)).setup()


def test_circular_shift_is_a_roll():
    x = torch.randn(16, 1, 12)
    out = SignalAugment(max_shift=3, circular=True)({"input": x, "target": torch.zeros(16)}, torch.Generator())
    for row_in, row_out in zip(x[:, 0], out["input"][:, 0], strict=True):
        assert any(torch.equal(torch.roll(row_in, s), row_out) for s in range(-3, 4))
