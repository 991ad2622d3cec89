"""timm models as teachers and students (kd_lab/models/timm.py, conf/student/timm.yaml, conf/teacher/timm.yaml).

Most tests use a stand-in ``timm`` module: ``create_model`` over one small CNN, with timm's ``feature_info``
and ``global_pool``. They test the wrapper: what it asks timm for, the local weights, the errors, a
distillation step. The tests at the end use timm itself (the ``real_timm`` fixture). timm imports
torchvision, which cannot be installed on this project's test machines, so CI installs timm with
``--no-deps`` (.ci/run) and the fixture puts a test-only torchvision stand-in in its place
(tests/torchvision_stand_in.py)."""

import contextlib
import importlib
import importlib.util
import re
import sys
import types
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision_stand_in import NOT_HERE, FrozenBatchNorm2d, modules

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


# -- timm itself --------------------------------------------------------------------------------------------
TIMM_INSTALL = "pip install --no-deps timm==1.0.31 (as .ci/run does; docs/extending.md)"


def is_timm(name: str) -> bool:
    return name == "timm" or name.startswith("timm.")


@contextlib.contextmanager
def timm_imported() -> Iterator[types.ModuleType]:
    """The real ``timm``, imported with no hub access. Where torchvision cannot be imported, a test-only
    stand-in (tests/torchvision_stand_in.py) is in ``sys.modules`` inside this block only: timm's imports need
    torchvision, its models do not. The timm modules imported over the stand-in leave with it, so nothing
    after the block gets a timm wired to the stand-in."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip(f"timm is not installed: {TIMM_INSTALL}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read when the hub is imported
        try:
            import torchvision  # noqa: F401
        except ImportError:
            stand_in = True
            for name, module in modules().items():
                patch.setitem(sys.modules, name, module)
        else:
            stand_in = False
        before = {name for name in sys.modules if is_timm(name)}
        try:
            yield importlib.import_module("timm")  # an ImportError fails the test: the stand-in lacks a name
        finally:
            if stand_in:
                for name in [name for name in sys.modules if is_timm(name) and name not in before]:
                    del sys.modules[name]


@pytest.fixture
def real_timm() -> Iterator[types.ModuleType]:
    """timm itself for one test (``timm_imported``): the stand-in, if used, is gone after the test."""
    with timm_imported() as timm:
        yield timm


def test_timm_over_the_stand_in_leaves_with_it():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed: timm_imported uses it, not the stand-in")
    with timm_imported() as timm:
        assert sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d is FrozenBatchNorm2d
        assert timm.layers.create_norm.FrozenBatchNorm2d is FrozenBatchNorm2d  # what timm's norm layers build
    assert not any(name == "torchvision" or name.startswith("torchvision.") for name in sys.modules)
    assert "timm.layers.create_norm" not in sys.modules


ARCHS = [  # (arch, extra timm kwargs, input shape, weights file suffix, last stage, embedding tap)
    ("resnet18", {}, (2, 1, 8, 8), ".pt", "layer4", "global_pool"),
    ("vit_tiny_patch16_224", {"img_size": 32}, (2, 1, 32, 32), ".safetensors", "blocks.11", None),
]


@pytest.mark.parametrize(("arch", "kwargs", "shape", "suffix", "last_stage", "embedding"), ARCHS)
def test_real_timm_weights_round_trip(real_timm, tmp_path, arch, kwargs, shape, suffix, last_stage, embedding):
    torch.manual_seed(0)
    saved = timm_model(arch, num_classes=10, in_chans=1, **kwargs).eval()
    path = tmp_path / f"{arch}{suffix}"
    if suffix == ".pt":
        torch.save(saved.state_dict(), path)
    else:
        save_file(saved.state_dict(), str(path))
    x = torch.randn(*shape)
    fresh = timm_model(arch, num_classes=10, in_chans=1, **kwargs).eval()
    assert not torch.allclose(fresh(x), saved(x))  # another random init: the load below changes something
    loaded = timm_model(arch, num_classes=10, in_chans=1, weights=str(path), **kwargs).eval()
    assert saved(x).shape == (shape[0], 10)
    assert torch.equal(loaded(x), saved(x))
    assert loaded.stage_taps[-1] == last_stage
    assert getattr(loaded, "embedding_tap", None) == embedding  # a ViT pools by a string setting, not a module


def test_real_timm_unknown_name_suggests_the_nearest(real_timm):
    with pytest.raises(KDLabError, match=r"timm has no model named 'resnet81'; did you mean \[.*'resnet18'"):
        timm_model("resnet81", num_classes=10, in_chans=1)


def test_real_timm_student_distills_one_step(make_cfg, real_timm):
    cfg = make_cfg(*DIGITS, "teacher=cnn2d_large", "student=timm", "student.model.arch=resnet18")
    results, objects = train(cfg)
    assert results["status"] == "finished"
    assert results["names"]["student"] == "timm-resnet18"
    assert type(objects["run"].student).__module__ == "timm.models.resnet"


# -- the torchvision stand-in itself ---------------------------------------------------------------------------
def randomize_batch_norms(model: nn.Module) -> None:
    """Statistics and affine parameters away from their init (mean 0, var 1, weight 1 or 0), so a wrong
    frozen norm shows."""
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            for t in (norm.weight, norm.bias, norm.running_mean):
                t.normal_()
            norm.running_var.uniform_(0.5, 2.0)


def test_stand_in_frozen_batch_norm_is_batch_norm_in_eval():
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(3, eps=1e-3)
    randomize_batch_norms(norm)
    frozen = FrozenBatchNorm2d(3, eps=1e-3)
    frozen.load_state_dict(norm.state_dict())  # strict: num_batches_tracked is dropped, as torchvision does
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(frozen(x), norm.eval()(x))
    assert list(frozen.parameters()) == []  # all buffers: nothing for an optimizer to move


def test_timm_freezes_batch_norm_with_the_stand_in(real_timm):
    """timm's freeze_batch_norm_2d swaps each BatchNorm2d for torchvision's FrozenBatchNorm2d (the
    stand-in's here): the model's eval output must not change."""
    torch.manual_seed(0)
    model = timm_model("resnet18", num_classes=10, in_chans=1).eval()
    randomize_batch_norms(model)
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    frozen = real_timm.layers.freeze_batch_norm_2d(model)
    frozen_type = importlib.import_module("torchvision.ops.misc").FrozenBatchNorm2d
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert sum(isinstance(m, frozen_type) for m in frozen.modules()) == 20  # resnet18: 17 + 3 downsample norms
    torch.testing.assert_close(frozen(x), expected)


def test_stand_in_refuses_what_it_does_not_implement(monkeypatch):
    stand_in = modules()
    with pytest.raises(RuntimeError, match=r"torchvision.transforms.ToTensor is a placeholder .*real torchvision"):
        stand_in["torchvision.transforms"].ToTensor()
    with pytest.raises(AttributeError, match=re.escape(f"torchvision.transforms.Resize {NOT_HERE}")):
        stand_in["torchvision.transforms"].Resize  # noqa: B018
    for name, module in stand_in.items():
        monkeypatch.setitem(sys.modules, name, module)
    # No torchvision.models: timm's import of FX feature extraction fails, and timm goes on without it.
    with pytest.raises(ModuleNotFoundError, match=r"torchvision.models"):
        importlib.import_module("torchvision.models.feature_extraction")
