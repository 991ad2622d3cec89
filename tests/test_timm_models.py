"""timm models as teachers and students (kd_lab/models/timm.py, conf/student/timm.yaml, conf/teacher/timm.yaml).

timm imports torchvision, which this project's test machines do not have, so most tests use a stand-in
``timm`` module: ``create_model`` over one small CNN, with timm's ``feature_info`` and ``global_pool``. They
test the wrapper: what it asks timm for, the local weights, the errors, a distillation step. The tests at
the end use timm itself and skip when it cannot be imported."""

import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import kd_lab.models.timm as timm_wrapper
from kd_lab.errors import KDLabError
from kd_lab.models.timm import import_timm, timm_model
from kd_lab.run.train import train

DIGITS = ["data=digits", "debug=fdr"]  # one batch of each loop; the store trains its teacher on one batch too


class TinyNet(nn.Module):
    """What the stand-in builds: a conv stage, timm's ``global_pool`` module and a classifier."""

    def __init__(self, num_classes: int, in_chans: int, width: int = 8):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)
        self.feature_info = [{"module": "conv", "num_chs": width}, {"module": "layer1", "num_chs": width}]

    def forward(self, x):
        return self.fc(self.global_pool(self.layer1(self.conv(x))))


@pytest.fixture
def fake_timm(monkeypatch) -> types.ModuleType:
    """A ``timm`` module in ``sys.modules`` that knows the model ``tinynet`` and records every call."""
    module = types.ModuleType("timm")
    module.calls = []

    def create_model(name, pretrained=False, num_classes=1000, in_chans=3, **kwargs):
        module.calls.append({"name": name, "pretrained": pretrained, "num_classes": num_classes, **kwargs})
        if name != "tinynet":
            raise RuntimeError(f"Unknown model ({name})")
        return TinyNet(num_classes, in_chans, **kwargs)

    module.create_model = create_model
    module.list_models = lambda pattern=None: ["tinynet", "resnet18"]
    monkeypatch.setitem(sys.modules, "timm", module)
    return module


def test_a_model_is_built_by_name_and_never_pretrained(fake_timm):
    model = timm_model("tinynet", num_classes=10, in_chans=1, width=4)
    assert fake_timm.calls == [{"name": "tinynet", "pretrained": False, "num_classes": 10, "width": 4}]
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert model.stage_taps == ["conv", "layer1"]  # from timm's feature_info: feature methods find their taps
    assert model.embedding_tap == "global_pool"


def test_pretrained_true_is_refused(fake_timm):
    with pytest.raises(KDLabError, match=r"pretrained=True would download weights, and kd-lab never downloads"):
        timm_model("tinynet", num_classes=10, in_chans=1, pretrained=True)
    assert fake_timm.calls == []


def test_an_unknown_name_suggests_the_nearest(fake_timm):
    with pytest.raises(KDLabError, match=r"timm has no model named 'tinynt'; did you mean \['tinynet'\]"):
        timm_model("tinynt", num_classes=10, in_chans=1)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_from_a_local_file(fake_timm, tmp_path, suffix):
    torch.manual_seed(0)
    saved = timm_model("tinynet", num_classes=10, in_chans=1)
    path = tmp_path / f"tinynet{suffix}"
    if suffix == ".pt":
        torch.save(saved.state_dict(), path)
    else:
        save_file(saved.state_dict(), str(path))
    x = torch.randn(4, 1, 8, 8)
    fresh = timm_model("tinynet", num_classes=10, in_chans=1)
    assert not torch.allclose(fresh(x), saved(x))  # another random init: the load below changes something
    loaded = timm_model("tinynet", num_classes=10, in_chans=1, weights=str(path))
    assert torch.equal(loaded(x), saved(x))


def test_a_missing_weights_file(fake_timm, tmp_path):
    with pytest.raises(KDLabError, match=r"model.weights=.*gone.pt is not a file; .*model.weights=null"):
        timm_model("tinynet", num_classes=10, in_chans=1, weights=str(tmp_path / "gone.pt"))


def test_weights_of_another_head_are_refused(fake_timm, tmp_path):
    path = tmp_path / "five.pt"
    torch.save(timm_model("tinynet", num_classes=5, in_chans=1).state_dict(), path)
    with pytest.raises(KDLabError, match=r"does not fit it: .*shape mismatches \(file vs model\) \['fc.weight"):
        timm_model("tinynet", num_classes=10, in_chans=1, weights=str(path))


def test_weights_with_missing_keys_are_refused(fake_timm, tmp_path):
    state = timm_model("tinynet", num_classes=10, in_chans=1).state_dict()
    path = tmp_path / "cut.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, path)
    with pytest.raises(KDLabError, match=r"missing keys \['fc.weight', 'fc.bias'\]"):
        timm_model("tinynet", num_classes=10, in_chans=1, weights=str(path))


def test_a_file_that_is_no_state_dict(fake_timm, tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(KDLabError, match=r"cannot be read .*torch.save\(model.state_dict\(\), path\)"):
        timm_model("tinynet", num_classes=10, in_chans=1, weights=str(path))


def test_missing_timm_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm fails as if it were not installed
    with pytest.raises(
        KDLabError, match=r"timm models need the timm package, which is not installed: pip install timm"
    ):
        import_timm()


def test_timm_without_torchvision_says_so(monkeypatch):
    def import_module(name):
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")

    monkeypatch.setattr(timm_wrapper.importlib, "import_module", import_module)
    with pytest.raises(KDLabError, match=r"cannot be imported without torchvision .*download.pytorch.org/whl/cpu"):
        import_timm()


def test_a_timm_student_distills_one_step(make_cfg, fake_timm):
    cfg = make_cfg(*DIGITS, "teacher=cnn2d_large", "student=timm", "student.model.arch=tinynet")
    results, objects = train(cfg)
    assert results["status"] == "finished"
    assert results["names"]["student"] == "timm-tinynet"
    assert isinstance(objects["run"].student, TinyNet)
    assert fake_timm.calls[0] == {"name": "tinynet", "pretrained": False, "num_classes": 10}


def test_a_timm_teacher_with_feature_taps(make_cfg, fake_timm, tmp_path):
    """FitNets taps the middle stage of each model: timm's feature_info gives the teacher's stages."""
    torch.manual_seed(1)
    weights = tmp_path / "teacher.safetensors"
    save_file(timm_model("tinynet", num_classes=10, in_chans=1).state_dict(), str(weights))
    cfg = make_cfg(
        *DIGITS,
        "teacher=timm",
        "teacher.model.arch=tinynet",
        f"teacher.model.weights={weights}",
        "student=cnn2d_small",
        "algorithm=fitnet",
    )
    results, objects = train(cfg)
    assert results["status"] == "finished"
    assert objects["run"].algorithm.teacher_taps == ["layer1"]  # stage 2 // 2 = 1 of ["conv", "layer1"]


# -- timm itself: skipped where it cannot be imported (not installed, or installed without torchvision) ------
def test_real_timm_resnet_weights_round_trip(tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    saved = timm_model("resnet10t", num_classes=10, in_chans=1)
    torch.save(saved.state_dict(), tmp_path / "r.pt")
    loaded = timm_model("resnet10t", num_classes=10, in_chans=1, weights=str(tmp_path / "r.pt"))
    saved.eval(), loaded.eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), saved(x))
    assert loaded.embedding_tap == "global_pool" and loaded.stage_taps[-1] == "layer4"


def test_real_timm_student_distills_one_step(make_cfg):
    pytest.importorskip("timm")
    results, _ = train(make_cfg(*DIGITS, "teacher=cnn2d_large", "student=timm"))
    assert results["status"] == "finished"
    assert results["names"]["student"] == "timm-resnet10t"
