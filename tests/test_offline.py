"""Invariants of the offline scheme and of the teacher store."""

import json
import logging
from pathlib import Path

import pytest
import torch

from kd_lab.errors import KDLabError
from kd_lab.run.train import train


def test_frozen_teacher_is_untouched_unoptimized_and_not_checkpointed(make_cfg):
    cfg = make_cfg("teacher=cnn1d_large", "teacher.model.channels=[8,8,8]", "logger=none", "callbacks=default")
    results, objs = train(cfg)
    # train() tested the best checkpoint last; the frozen teacher must be the one loaded from the store
    teacher, module, trainer = objs["teacher"], objs["module"], objs["trainer"]
    stored = torch.load(f"{results['teacher']['path']}/teacher.pt", weights_only=True)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, stored[name]), f"teacher {name} changed during fit"
    assert not teacher.training and all(not m.training for m in teacher.modules())  # BN in eval
    assert all(not p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert optimized == {id(p) for p in module.student.parameters()} | {id(p) for p in module.algorithm.parameters()}
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert ckpt["state_dict"] and not any(k.startswith("teacher") for k in ckpt["state_dict"])
    assert all(k.startswith(("student.", "algorithm.")) for k in ckpt["state_dict"])


def test_teacher_is_trained_once_then_reused(make_cfg, caplog):
    caplog.set_level(logging.INFO, logger="kd_lab")
    first, _ = train(make_cfg(run="a"))
    assert first["teacher"]["reused"] is False
    assert "training it for 2 epochs" in caplog.text
    caplog.clear()
    second, _ = train(make_cfg("algorithm=none", "seed=1", run="b"))  # another student run, same teacher config
    assert second["teacher"]["reused"] is True and second["teacher"]["key"] == first["teacher"]["key"]
    assert "Reusing cached teacher mlp_large" in caplog.text and "training it" not in caplog.text
    assert second["best"]["test/teacher_acc"] == pytest.approx(first["best"]["test/teacher_acc"])
    third, _ = train(make_cfg("teacher.seed=1", run="c"))  # a different teacher config: a new entry
    assert third["teacher"]["reused"] is False and third["teacher"]["key"] != first["teacher"]["key"]


def test_teacher_from_checkpoint(make_cfg, tmp_path):
    first, _ = train(make_cfg(run="a"))
    ckpt = f"{first['teacher']['path']}/teacher.pt"
    results, _ = train(make_cfg(f"teacher.ckpt_path={ckpt}", "teacher.max_epochs=99", run="b"))
    assert results["teacher"]["source"] == "checkpoint"
    assert results["best"]["test/teacher_acc"] == pytest.approx(first["best"]["test/teacher_acc"])
    # a kd-lab run's own checkpoint (student.* keys) works as a teacher too
    student_ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    results, _ = train(
        make_cfg(f"teacher.ckpt_path={student_ckpt}", "teacher=mlp_large", "teacher.model.hidden=[32]", run="c")
    )
    assert results["teacher"]["source"] == "checkpoint"


def test_missing_teacher_checkpoint(make_cfg, tmp_path):
    with pytest.raises(KDLabError, match=r"teacher.ckpt_path=.*nope.pt does not exist.*ckpt_path=null"):
        train(make_cfg(f"teacher.ckpt_path={tmp_path}/nope.pt"))


def test_corrupt_teacher_checkpoint_and_nothing_written_is_lost(make_cfg, tmp_path):
    first, _ = train(make_cfg(run="a"))
    entry = first["teacher"]["path"]
    good = (tmp_path / "a" / "results.json").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((Path(entry) / "teacher.pt").read_bytes()[:100])
    with pytest.raises(KDLabError, match="truncated, corrupt or not a torch checkpoint"):
        train(make_cfg(f"teacher.ckpt_path={truncated}", run="b"))
    assert (tmp_path / "a" / "results.json").read_bytes() == good
    assert json.loads((tmp_path / "b" / "results.json").read_text())["status"] == "failed"


def test_teacher_checkpoint_of_another_architecture(make_cfg):
    first, _ = train(make_cfg(run="a"))
    with pytest.raises(KDLabError, match=r"does not fit CNN1d.*missing keys \['blocks.0.0.weight'"):
        train(make_cfg(f"teacher.ckpt_path={first['teacher']['path']}/teacher.pt", "teacher=cnn1d_large", run="b"))


def test_class_count_mismatch_fails_before_training(make_cfg, tmp_path):
    with pytest.raises(KDLabError, match=r"the teacher outputs shape \(2, 7\) but the data has 10 classes"):
        train(make_cfg("teacher.model.num_classes=7"))
    assert not (tmp_path / "teachers").exists() or not any((tmp_path / "teachers").iterdir())
    with pytest.raises(KDLabError, match=r"the student outputs shape \(2, 5\)"):
        train(make_cfg("student.model.num_classes=5", "algorithm=none"))


def test_bad_tap_path_fails_at_build_time(make_cfg):
    from kd_lab.algorithms import KD

    class TapsHint(KD):  # the feature methods of the algorithm library declare taps like this
        @property
        def student_taps(self):
            return ["layer.0"]

    from kd_lab.core.step import DistillationStep
    from kd_lab.core.tasks import Classification
    from kd_lab.run.builders import build_datamodule, build_model
    from kd_lab.schemes import Offline

    cfg = make_cfg()
    dm = build_datamodule(cfg)
    with pytest.raises(KDLabError, match=r"student \(MLP\) has no module at path 'layer.0'.*'layers.0'"):
        DistillationStep(
            build_model(cfg.student.model), TapsHint(), Offline(), Classification(10), dm.example_input(),
            teachers=[build_model(cfg.teacher.model)],
        )  # fmt: skip


def test_non_finite_loss_stops_the_run_naming_the_term(make_cfg, tmp_path):
    cfg = make_cfg("algorithm=none", "algorithm._target_=helpers.NaNAfter", "+algorithm.after=8", "callbacks=default")
    with pytest.raises(KDLabError, match=r"non-finite loss at epoch 2, step 8: term\(s\) \['exploding'\]"):
        train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()  # the first epoch's checkpoint is kept
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "exploding" in results["error"]
