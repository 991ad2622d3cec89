"""Checks before compute that used to fire late, or with the wrong advice: a GPU the machine does not have, a
``ckpt_path`` that is no Lightning checkpoint or one of another run, a mistyped ``seed``, an ``nn.Linear``
student, a NaN while the teacher store trains the teacher (docs/errors.md lists the messages)."""

import json
import math

import pytest
import torch

import kd_lab.run.train as train_module
from kd_lab.core.step_stats import FiniteGuard
from kd_lab.errors import KDLabError, NonFiniteLossError
from kd_lab.run.builders import build_model
from kd_lab.run.checks.devices import check_devices
from kd_lab.run.checks.schema import validate_config
from kd_lab.run.resume import record_start
from kd_lab.run.train import train


def fails(cfg, message: str | None = None, *fragments: str) -> str:
    with pytest.raises(KDLabError) as err:
        train(cfg)
    text = str(err.value)
    if message is not None:
        assert text == message
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in: {text}"
    return text


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if the run gets as far as building its data module."""

    def refuse(cfg):
        raise AssertionError("the data module was built: the check came too late")

    monkeypatch.setattr(train_module, "build_datamodule", refuse)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def fake_gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


# -- trainer.accelerator and trainer.devices ----------------------------------------------------------------
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_gpu_accelerator_without_a_gpu_is_refused_before_the_data(make_cfg, tmp_path, no_gpu, no_data, accelerator):
    fails(
        make_cfg(f"trainer.accelerator={accelerator}"),
        f"trainer.accelerator={accelerator} asks for a GPU, but this machine has none (torch.cuda.is_available() is "
        "False): set trainer.accelerator=cpu, or trainer.accelerator=auto to use a GPU where there is one.",
    )
    assert not (tmp_path / "teachers").exists()  # no teacher lock taken, nothing trained
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_trainer_gpu_config_without_a_gpu(make_cfg, no_gpu, no_data):
    cfg = make_cfg("trainer=ddp", fast=False)  # the shipped multi-GPU config
    fails(cfg, None, "trainer.accelerator=gpu asks for a GPU", "set trainer.accelerator=cpu")


def test_more_devices_than_gpus(monkeypatch):
    fake_gpus(monkeypatch, 1)
    with pytest.raises(KDLabError) as err:
        check_devices({"accelerator": "gpu", "devices": 2})
    assert str(err.value) == (
        "trainer.devices=2 asks for 2 GPUs, but this machine has 1: set trainer.devices=1 (or -1 for all of them), "
        "or trainer.accelerator=cpu."
    )
    with pytest.raises(KDLabError, match=r"devices=\[0, 3\] names GPU 3, but this machine has GPU 0 only"):
        check_devices({"accelerator": "cuda", "devices": [0, 3]})
    with pytest.raises(KDLabError, match="asks for 4 GPUs"):
        check_devices({"accelerator": "auto", "devices": 4})  # auto picks the GPU when there is one
    for fine in ({"accelerator": "gpu", "devices": 1}, {"accelerator": "gpu", "devices": -1}, {"devices": "auto"}):
        check_devices(fine)


def test_cpu_processes_need_no_gpu(no_gpu):
    for fine in ({"accelerator": "cpu", "devices": 2}, {"accelerator": "auto", "devices": 2}, {}):
        check_devices(fine)  # trainer=ddp_cpu; auto falls back to the CPU


# -- ckpt_path: a Lightning checkpoint of this run's algorithm and models -----------------------------------
def test_plain_state_dict_as_ckpt_path(make_cfg, tmp_path, no_data):
    path = tmp_path / "weights.pt"
    torch.save(build_model(make_cfg().student.model).state_dict(), path)
    fails(
        make_cfg(f"ckpt_path={path}"),
        f"ckpt_path={path} holds a plain state dict (4 tensors, e.g. 'layers.0.0.weight'), not a Lightning "
        "checkpoint: ckpt_path resumes training from a Lightning checkpoint (a run's checkpoints/last.ckpt); to "
        f"load a teacher's weights set teacher.ckpt_path={path} (and ckpt_path=null).",
    )


def test_unreadable_ckpt_path(make_cfg, tmp_path, no_data):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(b"PK\x03\x04 cut short")
    fails(make_cfg(f"ckpt_path={path}"), None, f"ckpt_path={path} cannot be read", "truncated, corrupt")


def test_lightning_checkpoint_of_another_run(make_cfg, tmp_path, monkeypatch):
    """A real run's checkpoint, given to a run of another algorithm and student: refused naming the keys,
    before the data (its resume.yaml first, else its results.json); its own config passes."""
    first = make_cfg("algorithm=none", "teacher.max_epochs=1", "trainer.max_epochs=1", run="first")
    record_start(first)  # as the kd-lab command does: <run dir>/resume.yaml
    train(first)
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    store = sorted(p.name for p in (tmp_path / "teachers").iterdir())

    monkeypatch.setattr(train_module, "build_datamodule", lambda cfg: pytest.fail("the check came too late"))
    other = make_cfg("algorithm=fitnet", "student=mlp_medium", f"ckpt_path={ckpt}")
    resume = tmp_path / "first" / "resume.yaml"
    message = fails(
        other,
        None,
        f"ckpt_path={ckpt} is a checkpoint of a run with another algorithm or model (its config: {resume}): ",
        "algorithm._target_ is 'kd_lab.algorithms.NoDistillation' there, 'kd_lab.algorithms.FitNet' here",
        "student.model.hidden is [32] there, [256, 256] here",
        f"continue that run with kd-lab resume={tmp_path / 'first'}, or set ckpt_path=null",
    )
    assert message.count(". ") == 0  # one sentence
    (tmp_path / "first" / "resume.yaml").unlink()
    fails(other, None, f"(its config: {tmp_path / 'first' / 'results.json'})", "algorithm._target_ is")
    assert sorted(p.name for p in (tmp_path / "teachers").iterdir()) == store  # nothing trained

    same = make_cfg("algorithm=none", "teacher.max_epochs=1", "trainer.max_epochs=2", f"ckpt_path={ckpt}", run="2nd")
    validate_config(same)  # the same algorithm and models: continuing is fine


# -- the key that was set, and the model's own output size --------------------------------------------------
def test_mistyped_seed_is_reported_as_seed(make_cfg, no_data):
    fails(
        make_cfg("seed=abc"),
        "seed='abc' has the wrong type: the run config (conf/train.yaml) takes int for seed, not str; e.g. seed=0 "
        "(the default).",
    )


LINEAR = ["student.model._target_=torch.nn.Linear", "~student.model.input_shape", "~student.model.num_classes"]
LINEAR += ["~student.model.hidden", "+student.model.in_features=40", "+student.model.out_features=3"]


def test_linear_student_is_told_its_output_size_not_num_classes(make_cfg, tmp_path):
    message = fails(
        make_cfg(*LINEAR, "data.input_shape=[40]"),
        "the student (Linear) outputs shape (2, 3) but the data has 10 classes, so it must output shape (batch, 10): "
        "set the model's output size, student.model.out_features=10 (or ${data.num_classes} to follow the data); "
        "Linear takes no num_classes.",
    )
    assert "num_classes=" not in message
    fails(make_cfg(*LINEAR), None, "outputs shape (2, 1, 3)", "student.model.out_features=10", "it outputs 3 axes")
    assert not (tmp_path / "teachers").exists()  # the build's check: before the store trains the teacher


def test_model_with_num_classes_is_still_told_num_classes(make_cfg):
    fails(
        make_cfg("student.model.num_classes=5"),
        "the student outputs shape (2, 5) but the data has 10 classes: set student.model.num_classes=10 (the "
        "default ${data.num_classes} follows the data).",
    )


# -- a NaN while the teacher store trains the teacher -------------------------------------------------------
def test_guard_names_the_teachers_recipe():
    guard = FiniteGuard(1, role="teacher")
    with pytest.raises(NonFiniteLossError) as err:
        guard.watch(0, 3, ("ce",), torch.tensor([math.nan, math.nan]), torch.tensor(math.nan))
    assert str(err.value) == (
        "non-finite loss while training the teacher (the teacher store trains it before the student) at epoch 1, "
        "step 3: term(s) ['ce'] = [nan]. The teacher's own recipe diverged: lower teacher.optim.optimizer.lr (or "
        "change teacher.optim.*; optim.* is the student's); no teacher-store entry was written."
    )
    with pytest.raises(NonFiniteLossError, match=r"step 3: term\(s\) \['kd'\] = \[nan\]. Lower the learning rate "):
        FiniteGuard(1).watch(0, 3, ("kd",), torch.tensor([math.nan, math.nan]), torch.tensor(math.nan))


def test_nan_in_the_teachers_own_training_names_teacher_optim(make_cfg, tmp_path):
    message = fails(
        make_cfg("teacher.optim.optimizer.lr=1e30"),
        None,
        "non-finite loss while training the teacher",
        "teacher.optim.optimizer.lr",
    )
    assert " optim.optimizer.lr" not in message
    teachers = tmp_path / "teachers"
    assert not any(p.is_dir() and not p.name.startswith(".") for p in teachers.iterdir())  # no store entry
    assert not (tmp_path / "run" / "checkpoints").exists()  # the student never trained
