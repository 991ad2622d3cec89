"""perf.steps_per_batch (kd_lab.run.perf, kd_lab.run.fused_steps): lists of batches, one optimizer step per batch, the
same run as Lightning's automatic loop; Lightning's own backward/step only where something needs it."""

import lightning as L
import pytest
import torch
from helpers import ONE_BATCH, assert_same_results, build_run_module

from kd_lab.errors import KDLabError
from kd_lab.run.fused_steps import direct_step_blocker
from kd_lab.run.perf import AUTO_STEPS
from kd_lab.run.train import train

COUNTER = "+callbacks.backward_counter._target_=helpers.BackwardCounter"


def test_fused_steps_train_exactly_like_one_step_per_batch(make_cfg):
    """Lists of 4 batches (6 batches per epoch: lists of 4 and 2), one optimizer step per batch, the cosine
    schedule counted in optimizer steps; by default without Lightning's step hooks (the direct path)."""
    plain, plain_objects = train(make_cfg(ONE_BATCH, run="plain"))
    fused, objects = train(make_cfg("perf.steps_per_batch=4", run="fused"))
    module = objects["module"]
    assert not module.automatic_optimization and module._optimizer_steps.direct
    assert objects["trainer"].global_step == plain_objects["trainer"].global_step == 12  # optimizer steps
    assert objects["trainer"].optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine end
    assert_same_results(plain, fused)


def test_auto_fuses_by_default_and_changes_nothing(make_cfg, tmp_path):
    one, one_objects = train(make_cfg(ONE_BATCH, "logger=csv", run="one"))
    auto, objects = train(make_cfg("logger=csv", run="auto"))
    assert objects["datamodule"].steps_per_batch == AUTO_STEPS and objects["module"].steps_per_batch_reason == "auto"
    assert objects["trainer"].global_step == one_objects["trainer"].global_step
    assert objects["trainer"].log_every_n_steps == max(1, 10 // AUTO_STEPS)  # counted in lists, as Lightning does
    assert_same_results(one, auto)
    logged = [(tmp_path / run / "csv" / "metrics.csv").read_text() for run in ("one", "auto")]
    assert logged[0] == logged[1] and "\n1,11," in logged[0]  # same rows, same x axis (optimizer steps)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["+trainer.fast_dev_run=true"], "trainer.fast_dev_run=True counts batches"),
        (["+trainer.limit_train_batches=3"], "trainer.limit_train_batches=3 counts batches"),
        (["+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2 counts batches"),
        (["algorithm=adversarial"], "algorithm 'adversarial' steps two optimizers"),
        (["data.serve=loader", "data.num_workers=0", "data.persistent_workers=false"], "DataLoader workers"),
        (["+callbacks.peek._target_=helpers.BatchPeeker"], "callbacks.peek implements on_train_batch_end"),
        (["+callbacks.last_checkpoint.every_n_train_steps=2"], "callbacks.last_checkpoint implements on_train_batch"),
    ],
)
def test_auto_takes_one_step_per_batch_where_fusing_would_show(make_cfg, overrides, reason):
    module, datamodule = build_run_module(make_cfg(*overrides))
    assert datamodule.steps_per_batch == 1 and reason in module.steps_per_batch_reason


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["perf.steps_per_batch=fast"], r"perf.steps_per_batch='fast' is not a number: give a count .* or auto"),
        (["perf.steps_per_batch=4", "+trainer.accumulate_grad_batches=2"], r"accumulate_grad_batches=2 would change"),
    ],
)
def test_bad_steps_per_batch_settings_are_named(make_cfg, overrides, message):
    with pytest.raises(KDLabError, match=message):
        build_run_module(make_cfg(*overrides))


def test_a_callback_on_the_step_hooks_gets_lightnings_path_and_every_call(make_cfg):
    direct, _ = train(make_cfg("perf.steps_per_batch=4", run="direct"))
    hooked, objects = train(make_cfg("perf.steps_per_batch=4", COUNTER, run="hooked"))
    steps = objects["module"]._optimizer_steps
    assert not steps.direct and "BackwardCounter implements on_after_backward" in steps.blocker
    counter = next(c for c in objects["trainer"].callbacks if type(c).__name__ == "BackwardCounter")
    assert counter.calls == objects["trainer"].global_step == 12
    assert_same_results(direct, hooked)


def test_direct_steps_are_blocked_by_profilers_scalers_and_strategies(make_cfg):
    module = L.LightningModule()
    assert direct_step_blocker(L.Trainer(accelerator="cpu", logger=False), module) is None
    assert "profiler" in direct_step_blocker(L.Trainer(accelerator="cpu", profiler="simple", logger=False), module)
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    assert "strategy DDPStrategy" in direct_step_blocker(ddp, module)
    half = L.Trainer(accelerator="cpu", precision="16-true", logger=False)
    assert "precision plugin HalfPrecision" in direct_step_blocker(half, module)


@pytest.mark.parametrize("clip", ["0.05", "0.05 +trainer.gradient_clip_algorithm=value"])
def test_gradient_clipping_moves_into_manual_steps_and_clips_the_same(make_cfg, clip):
    """Lightning refuses trainer.gradient_clip_val under manual optimization; the fused steps clip like its
    automatic loop does."""
    value, *algorithm = clip.split()
    overrides = [f"+trainer.gradient_clip_val={value}", *algorithm]
    plain, plain_objects = train(make_cfg(*overrides, ONE_BATCH, run="plain"))
    _, unclipped = train(make_cfg(ONE_BATCH, run="unclipped"))
    fused, objects = train(make_cfg(*overrides, "perf.steps_per_batch=4", run="fused"))
    assert objects["module"].gradient_clip == (0.05, "value" if algorithm else "norm")
    assert objects["trainer"].gradient_clip_val is None
    assert_same_results(plain, fused)
    students = [o["module"].student for o in (plain_objects, objects, unclipped)]
    clipped, fused_clipped, not_clipped = ([p.detach() for p in s.parameters()] for s in students)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(clipped, fused_clipped, strict=True))
    assert any(not torch.allclose(a, c, atol=1e-4) for a, c in zip(clipped, not_clipped, strict=True))


def test_adversarial_methods_clip_their_manual_steps(make_cfg):
    results, objects = train(make_cfg("algorithm=adversarial", "+trainer.gradient_clip_val=0.5"))
    assert results["status"] == "finished" and objects["module"].gradient_clip == (0.5, "norm")


def test_fused_steps_are_refused_where_they_cannot_work(make_cfg):
    from kd_lab.data import FakeDataModule
    from kd_lab.run.perf import fuse_steps

    with pytest.raises(KDLabError, match=r"adversary.*perf\.steps_per_batch=1"):
        train(make_cfg("algorithm=adversarial", "perf.steps_per_batch=4"))

    class FinishedOnDevice(FakeDataModule):  # like CIFAR's on-device crop and flip
        def on_after_batch_transfer(self, batch, dataloader_idx):
            return batch

    module, _ = build_run_module(make_cfg())
    with pytest.raises(KDLabError, match=r"FinishedOnDevice finishes each batch on the device"):
        fuse_steps(module, FinishedOnDevice(), 4)


def test_bf16_fused_steps_take_the_direct_path_and_match(make_cfg):
    """bf16 autocast needs no gradient scaler, so its fused steps skip Lightning's wrappers too."""
    one, _ = train(make_cfg("trainer.precision=bf16-mixed", ONE_BATCH, run="one"))
    fused, objects = train(make_cfg("trainer.precision=bf16-mixed", "perf.steps_per_batch=4", run="fused"))
    assert objects["module"]._optimizer_steps.direct
    assert_same_results(one, fused)
