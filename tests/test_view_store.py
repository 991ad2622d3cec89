"""perf.view_store: the frozen teacher's outputs per augmented training view, written by the first run and read
by the next. A run that reads dense logits ends bit for bit where a run with a live teacher ends; the teacher
is then called once per run in training (the spot check); damaged files, locks and top-k logits behave."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_same_results

from kd_lab.errors import KDLabError
from kd_lab.run.train import train
from kd_lab.run.view_store import FitContext, ViewStore, compress_topk, expand_topk

AUGMENT = "data.augment={_target_:kd_lab.data.SignalAugment,max_shift:2,scale:0.1,noise_std:0.1,mixup_alpha:0.2}"


def teacher_training_calls(module) -> list[int]:
    """Counts the teacher's forwards while the student trains (not its evaluation on val/test batches)."""
    calls = [0]

    def hook(*_):
        if module.student.training:
            calls[0] += 1

    module.teacher.register_forward_hook(hook)
    return calls


def store_files(tmp_path) -> list:
    return sorted((tmp_path / "teachers" / "views").glob("*/epoch_*.safetensors"))


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.student.state_dict().items()}


def test_reading_the_store_gives_the_live_teachers_results_bit_for_bit(make_cfg, tmp_path):
    live, live_objects = train(make_cfg(AUGMENT, "perf.view_store=false", run="live"))
    assert live_objects["module"].step.view_store is None
    filled, fill_objects = train(make_cfg(AUGMENT, run="fill"))
    store = fill_objects["module"].step.view_store
    assert store.stats == {"read": 0, "filled": 2, "live": 0}
    assert len(store_files(tmp_path)) == 2  # one file per epoch (trainer.max_epochs=2), rank 0
    read, read_objects = train(make_cfg(AUGMENT, run="read"))
    assert read_objects["module"].step.view_store.stats == {"read": 2, "filled": 0, "live": 0}
    for other in (filled, read):
        assert_same_results(live, other, abs_tol=0.0)
    for objects in (fill_objects, read_objects):
        for key, value in state(live_objects["module"]).items():
            assert torch.equal(value, state(objects["module"])[key]), key


def test_the_teacher_is_skipped_for_stored_batches(make_cfg, tmp_path):
    """Through the step directly: a filled epoch, then the same epoch read, with the teacher's calls counted."""
    from helpers import build_run_module

    module, datamodule = build_run_module(make_cfg(AUGMENT))
    store, step = module.step.view_store, module.step
    batches = list(datamodule.train_dataloader())
    context = FitContext(0, 1, "cpu", "32-true", "tensors")
    calls = teacher_training_calls(module)
    module.train()
    for epoch_mode in ("fill", "read"):
        store.begin_epoch(0, len(batches), context, max_epochs=1)
        assert store.mode == epoch_mode
        before = calls[0]
        terms = [step.training_terms(b, view=i) for i, b in enumerate(batches)]
        store.end_epoch()
        if epoch_mode == "fill":
            assert calls[0] - before == len(batches)
            filled_terms = terms
        else:
            assert calls[0] - before == 1  # the spot check of the first stored batch
            for a, b in zip(filled_terms, terms, strict=True):
                assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_store_key_separates_seeds_and_augmentations(make_cfg, tmp_path):
    train(make_cfg(AUGMENT, "trainer.max_epochs=1", run="a"))
    train(make_cfg(AUGMENT, "trainer.max_epochs=1", "seed=1", run="b"))
    other = AUGMENT.replace("max_shift:2", "max_shift:3")
    train(make_cfg(other, "trainer.max_epochs=1", run="c"))
    assert len({f.parent for f in store_files(tmp_path)}) == 3


def test_a_machine_with_another_cpu_instruction_set_fills_its_own_store(make_cfg, tmp_path, monkeypatch):
    """A store copied to a machine whose torch picks other CPU kernels is not read there: its floats differ."""
    train(make_cfg(AUGMENT, "trainer.max_epochs=1", run="here"))
    real = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2" if real != "AVX2" else "AVX512")
    _, objects = train(make_cfg(AUGMENT, "trainer.max_epochs=1", run="there"))
    assert objects["module"].step.view_store.stats == {"read": 0, "filled": 1, "live": 0}
    assert len({f.parent for f in store_files(tmp_path)}) == 2


def test_a_damaged_epoch_file_is_filled_again(make_cfg, tmp_path, caplog):
    train(make_cfg(AUGMENT, "trainer.max_epochs=1", run="fill"))
    (path,) = store_files(tmp_path)
    path.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="kd_lab.run.view_store"):
        _, objects = train(make_cfg(AUGMENT, "trainer.max_epochs=1", run="again"))
    assert "cannot be read" in caplog.text and str(path) in caplog.text
    assert objects["module"].step.view_store.stats["filled"] == 1
    assert path.stat().st_size > 100  # written again, whole


def test_features_are_stored_for_an_algorithm_that_taps_the_teacher(make_cfg, tmp_path):
    live, _ = train(make_cfg(AUGMENT, "algorithm=fitnet", "perf.view_store=false", run="live"))
    train(make_cfg(AUGMENT, "algorithm=fitnet", run="fill"))
    read, objects = train(make_cfg(AUGMENT, "algorithm=fitnet", run="read"))
    assert objects["module"].step.view_store.stats["read"] == 2
    assert_same_results(live, read, abs_tol=0.0)


def test_top_k_runs_see_the_same_teacher_whether_they_fill_or_read(make_cfg, tmp_path):
    filled, _ = train(make_cfg(AUGMENT, "perf.view_store_topk=3", run="fill"))
    read, objects = train(make_cfg(AUGMENT, "perf.view_store_topk=3", run="read"))
    assert objects["module"].step.view_store.stats["read"] == 2
    assert_same_results(filled, read, abs_tol=0.0)


def test_top_k_keeps_the_top_probabilities_and_the_tail_mass():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 3.0]])
    values, index, fill = compress_topk(logits, 2)
    assert index.tolist() == [[0, 4], [4, 0]] or index[1, 0] == 4
    dense = expand_topk(values, index, fill, 5)
    p, q = logits.softmax(-1), dense.softmax(-1)
    top = logits.topk(2, -1).indices
    assert torch.allclose(q.gather(-1, top), p.gather(-1, top), atol=1e-3)  # fp16 values
    tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, top, False)
    assert torch.allclose((q * tail).sum(-1), (p * tail).sum(-1), atol=1e-3)
    # hand-computed: row 0's others (0.5, -1, 0) share log(e^0.5 + e^-1 + 1) - log 3 each
    expected = torch.log(torch.tensor(0.5).exp() + torch.tensor(-1.0).exp() + 1) - torch.log(torch.tensor(3.0))
    assert dense[0, 1].item() == pytest.approx(expected.item(), abs=1e-6)


def test_a_lock_held_by_a_live_process_means_live_outputs_and_no_file(tmp_path):
    store = small_store(tmp_path)
    context = FitContext(0, 1, "cpu", "32-true", "tensors")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store.begin_epoch(0, 1, context, max_epochs=1)  # opens the directory and fills epoch 0
        store.record(0, [torch.zeros(2, 3)], [{}])
        store.end_epoch()
        lock = store.directory / "epoch_00001.rank0.lock"
        lock.write_text(f"{os.uname().nodename} {sleeper.pid}\n")
        store.begin_epoch(1, 1, context, max_epochs=2)
        assert store.mode == "live"
        store.record(0, [torch.zeros(2, 3)], [{}])
        store.end_epoch()
        assert not (store.directory / "epoch_00001.rank0.safetensors").exists() and lock.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    store.begin_epoch(1, 1, context, max_epochs=2)  # the holder is gone: its lock is taken over
    assert store.mode == "fill"
    store.close()
    assert not lock.exists()


def small_store(tmp_path, **kwargs) -> ViewStore:
    teacher = torch.nn.Linear(3, 3)
    options = {"topk": None, "sample_bytes": 12, "max_mb": 1.0, "required": False, **kwargs}
    return ViewStore(tmp_path / "views", {"batch_size": 2, "data": "test"}, [teacher], **options)


def test_a_store_over_its_size_limit_is_off_or_refused(tmp_path, make_cfg):
    context = FitContext(0, 1, "cpu", "32-true", "tensors")
    store = small_store(tmp_path, max_mb=1e-6)
    store.begin_epoch(0, 10, context, max_epochs=300)
    assert not store.enabled and store.lookup(0, torch.device("cpu")) is None
    with pytest.raises(KDLabError, match=r"view_store_max_mb.*view_store_topk"):
        small_store(tmp_path, max_mb=1e-6, required=True).begin_epoch(0, 10, context, max_epochs=300)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("scheme=online",), r"scheme=online trains the teacher.*scheme=offline"),
        (("data=fake_xmodal", "algorithm=cross_modal"), r"another view of the data than the teacher"),
        (("data.augment={_target_:helpers.OwnDrawsAugment}",), r"OwnDrawsAugment.*views_from_generator"),
        (("perf.cache_teacher=true",), r"cache_teacher=true already computes the teacher"),
    ],
)
def test_runs_it_cannot_serve_exactly_are_refused_before_training(make_cfg, overrides, match):
    with pytest.raises(KDLabError, match=match):
        train(make_cfg(*overrides, "perf.view_store=true"))


def test_auto_leaves_those_runs_to_a_live_teacher(make_cfg):
    _, objects = train(make_cfg("scheme=online", "trainer.max_epochs=1"))
    assert objects["module"].step.view_store is None


def cifar_cfg(make_cfg, tmp_path, *overrides: str, run: str):
    """CIFAR-100's crop and flip on fake files in the official format, with small 2-D CNNs."""
    from helpers import write_fake_cifar

    data = write_fake_cifar(tmp_path / "cifar", "cifar100", per_file=48)
    cfg = make_cfg(
        "data=cifar100",
        "data.val_size=8",
        "data.batch_size=16",
        "teacher=cnn2d_large",
        "teacher.max_epochs=1",
        "student=cnn2d_small",
        *overrides,
        run=run,
    )
    cfg.paths.data_dir = str(data)
    return cfg


def test_cifar_crop_and_flip_read_from_the_store_train_bit_for_bit_and_top_k_alike(make_cfg, tmp_path):
    live, live_objects = train(cifar_cfg(make_cfg, tmp_path, "perf.view_store=false", run="live"))
    train(cifar_cfg(make_cfg, tmp_path, run="fill"))
    read, read_objects = train(cifar_cfg(make_cfg, tmp_path, run="read"))
    assert read_objects["module"].step.view_store.stats == {"read": 2, "filled": 0, "live": 0}
    assert_same_results(live, read, abs_tol=0.0)
    for key, value in state(live_objects["module"]).items():
        assert torch.equal(value, state(read_objects["module"])[key]), key
    # top-k (what CIFAR-100 x 240 epochs needs): not the live teacher's logits, but the same for filler and reader
    filled_k, fill_objects = train(cifar_cfg(make_cfg, tmp_path, "perf.view_store_topk=8", run="fill_k"))
    read_k, read_k_objects = train(cifar_cfg(make_cfg, tmp_path, "perf.view_store_topk=8", run="read_k"))
    assert fill_objects["module"].step.view_store.stats == {"read": 0, "filled": 2, "live": 0}
    assert read_k_objects["module"].step.view_store.stats == {"read": 2, "filled": 0, "live": 0}
    assert_same_results(filled_k, read_k, abs_tol=0.0)
    assert any(not torch.equal(v, state(fill_objects["module"])[k]) for k, v in state(live_objects["module"]).items())
