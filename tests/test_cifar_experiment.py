"""The CIFAR-100 CRD benchmark's config composes and runs: a fast_dev_run of resnet8x4 <- resnet32x4 with the
reference recipe (experiment=cifar100_crd/<pair>) on tiny files in the CIFAR-100 python format."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_fake_cifar

from kd_lab.run.train import train

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "cifar100_crd"
TINY = ["data.val_size=8", "data.batch_size=8", "data.eval_batch_size=16", "trainer.accelerator=cpu"]


def test_every_pair_composes_with_the_reference_recipe(make_cfg):
    pairs = sorted(p.stem for p in (EXPERIMENT.parent.parent / "kd_lab/conf/experiment/cifar100_crd").glob("*.yaml"))
    assert len(pairs) == 13
    for pair in pairs:
        cfg = make_cfg(f"experiment=cifar100_crd/{pair}", fast=False)
        teacher, student = pair.split("-")
        assert (cfg.teacher.name, cfg.student.name, cfg.data.name) == (teacher, student, "cifar100")
        assert cfg.trainer.max_epochs == 240 and cfg.teacher.max_epochs == 240 and cfg.data.batch_size == 64
        assert list(cfg.optim.scheduler.milestones) == [150, 180, 210] and cfg.optim.optimizer.weight_decay == 5e-4
        low = student in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
        assert cfg.optim.optimizer.lr == (0.01 if low else 0.05) and cfg.teacher.optim.optimizer.lr == 0.05


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["kd", "crd"])
def test_a_pair_runs_fast_dev_run_on_fake_cifar(make_cfg, tmp_path, algorithm):
    data = write_fake_cifar(tmp_path / "cifar", "cifar100", per_file=40)
    cfg = make_cfg(
        "experiment=cifar100_crd/resnet32x4-resnet8x4", f"algorithm={algorithm}", "debug=fdr", *TINY, fast=False
    )
    cfg.paths.data_dir = str(data)
    results, _ = train(cfg)
    assert results["status"] == "finished"
    assert results["params"]["student"] == 1233540 and results["params"]["teacher"] == 7433860
    assert 0.0 <= results["best"]["test/acc"] <= 1.0


def test_compare_reference_lines_up_a_kd_lab_table(tmp_path):
    """compare_reference.py reads kd-lab-compare's CSV (fractions) and reports the gap to reference.csv (%)."""
    table = tmp_path / "table.csv"
    fields = ["data", "teacher", "student", "algorithm", "scheme", "setting", "acc_best", "std_best", "acc_last",
              "std_last", "teacher_acc", "seeds"]  # fmt: skip
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerow(dict(zip(fields, ["cifar100", "resnet32x4", "resnet8x4", "crd", "offline", "-", "0.752",
                                          "0.001", "0.7561", "0.002", "0.79", "3"], strict=True)))  # fmt: skip
    out = tmp_path / "gap.json"
    script = EXPERIMENT / "compare_reference.py"
    subprocess.run([sys.executable, str(script), str(table), "--json", str(out)], check=True, capture_output=True)
    (row,) = [r for r in json.loads(out.read_text()) if r["algorithm"] == "crd"]
    assert row["reference"] == 75.51 and row["ours"] == pytest.approx(75.61) and row["gap"] == pytest.approx(0.10)


def test_convert_teacher_reads_a_repdistiller_checkpoint(tmp_path):
    """RepDistiller's files hold {"epoch", "model", "accuracy", "optimizer"}; the converted file loads as
    teacher.ckpt_path does, into the same weights."""
    import torch

    from kd_lab.models.cifar import resnet8
    from kd_lab.run.checkpoints import load_weights

    source = resnet8()
    saved = {"epoch": 240, "model": source.state_dict(), "accuracy": torch.tensor(69.1), "optimizer": {}}
    torch.save(saved, tmp_path / "ckpt_epoch_240.pth")
    script = EXPERIMENT / "convert_teacher.py"
    args = [str(tmp_path / "ckpt_epoch_240.pth"), "resnet8", str(tmp_path / "t.pt")]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = load_weights(resnet8(), tmp_path / "t.pt")
    pairs = zip(loaded.state_dict().values(), source.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    wrong_arch = [args[0], "vgg8", str(tmp_path / "v.pt")]
    wrong = subprocess.run([sys.executable, str(script), *wrong_arch], capture_output=True)
    assert wrong.returncode == 1 and b"does not fit vgg8" in wrong.stderr
