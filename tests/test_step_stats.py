"""The loss bookkeeping that replaced a ``self.log`` and a host sync per step: the logged epoch means are still
the batch-size weighted means of every step's values, and a deferred non-finite check still names the first
bad step and its terms."""

import lightning as L
import pytest
import torch

from kd_lab.core.step_stats import EpochSums, FiniteGuard, stack_terms
from kd_lab.errors import NonFiniteLossError
from kd_lab.run.train import train


class StepLosses(L.Callback):
    def __init__(self):
        self.epochs: list[list[tuple[float, int]]] = []

    def on_train_epoch_start(self, trainer, module):
        self.epochs.append([])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.epochs[-1].append((float(outputs["loss"]), len(batch["target"])))


def test_logged_train_loss_is_the_weighted_mean_of_the_steps(make_cfg, monkeypatch):
    recorder, means = StepLosses(), []
    cfg = make_cfg("data.num_train=250")  # 187 training samples: the last batch is dropped, sizes stay equal

    class Probe(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            means.append(float(trainer.callback_metrics["train/loss"]))

    import kd_lab.run.train as train_module

    real = train_module.build_callbacks
    monkeypatch.setattr(train_module, "build_callbacks", lambda c: [*real(c), recorder, Probe()])
    train(cfg)
    assert len(means) == len(recorder.epochs) == cfg.trainer.max_epochs
    for logged, steps in zip(means, recorder.epochs, strict=True):
        expected = sum(v * n for v, n in steps) / sum(n for _, n in steps)
        assert logged == pytest.approx(expected, rel=1e-6)


def test_epoch_sums_weight_by_batch_size_and_reset():
    sums = EpochSums()
    terms = {"ce": torch.tensor(1.0), "kd": torch.tensor(3.0)}
    sums.add("train/loss", ("ce", "kd"), stack_terms(torch.tensor(4.0), terms), 10)
    terms = {"ce": torch.tensor(2.0), "kd": torch.tensor(0.0)}
    sums.add("train/loss", ("ce", "kd"), stack_terms(torch.tensor(2.0), terms), 30)
    means = {k: (float(v), n) for k, (v, n) in sums.pop_means().items()}
    assert means == {"train/loss": (2.5, 40), "train/loss_ce": (1.75, 40), "train/loss_kd": (0.75, 40)}
    assert sums.pop_means() == {}


@pytest.mark.parametrize("every", [1, 5])
def test_the_guard_names_the_first_bad_step_however_often_it_checks(every):
    guard = FiniteGuard(every)
    nan = torch.tensor(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2: term\(s\) \['kd'\] = \[nan\]"):
        for step in range(10):
            terms = {"ce": torch.tensor(1.0), "kd": nan if step >= 2 else torch.tensor(0.5)}
            loss = torch.stack(list(terms.values())).sum()
            guard.watch(0, step, ("ce", "kd"), stack_terms(loss, terms), loss)
        guard.check()
    assert every == 1 or step == every - 1  # a deferred check raises at its next check, naming step 2
