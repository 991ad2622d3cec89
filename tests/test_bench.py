"""kd-lab-bench at tiny size: every variant runs and the report has its shape (timings are not asserted)."""

import json

from kd_lab.tools.bench import bench

TINY = ["--rounds", "1", "--epochs", "1", "--warmup", "0"]


def test_bench_reports_every_variant_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    bench([*TINY, "--set", "data=fake", "data.num_train=96", "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"a", "b", "c", "d", "c_kd", "e", "v", "f"}
    assert {"b/a epoch", "d/c epoch", "d/c_kd epoch", "e/c epoch", "f/v epoch", "f/b epoch"} <= set(report["ratios"])
    assert report["variants"]["f"]["view_store"] == {"read": 1, "filled": 0, "live": 0}  # filled before the clock
    assert "view_store" not in report["variants"]["b"]  # a live teacher
    assert all(len(v["epoch_s"]) == 1 and v["median_epoch_s"] > 0 for v in report["variants"].values())


def test_bench_cifar_path_runs_on_cpu(tmp_path):
    # CIFAR-shaped data (3x32x32, 100 classes) with small 2-D CNNs in place of the resnets: the code path of a
    # GPU run (precision, channels_last, the per-sample DataLoader reference) at a size a test can afford
    out = tmp_path / "bench.json"
    args = ["--cifar", "--teacher", "cnn2d_large", "--student", "cnn2d_small", "--num-train", "80"]
    bench([*TINY, *args, "--batch-size", "16", "--channels-last", "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"a", "b", "c", "d", "c_kd", "e", "v", "f", "a_dataloader"}
    assert report["args"]["precision"] == "32-true" and report["variants"]["b"]["train_images_per_s"] > 0
    assert report["variants"]["f"]["view_store"] == {"read": 1, "filled": 0, "live": 0}  # crop and flip views
    assert report["data"] == {"batch_size": 16, "steps_per_epoch": (80 - 8) // 16}  # 8 images for validation
