import pytest
import torch
from torch import nn

from kd_lab.core.recorder import FeatureRecorder, probe_shapes, record
from kd_lab.errors import KDLabError
from kd_lab.models import MLP, CNN1d


def cnn() -> CNN1d:
    return CNN1d(input_shape=(1, 40), num_classes=10, channels=(8, 16, 16))


def test_records_named_modules_and_model_output():
    model = cnn()
    x = torch.randn(3, 1, 40)
    out, feats = record(model, ["blocks.0", "blocks.2", "."], x)
    assert feats["blocks.0"].shape == (3, 8, 40)
    assert feats["blocks.2"].shape == (3, 16, 10)
    torch.testing.assert_close(feats["."], out)


def test_bad_path_names_nearest_valid_paths():
    with pytest.raises(KDLabError) as err:
        FeatureRecorder(cnn(), ["block.1"], role="teacher")
    message = str(err.value)
    assert "teacher (CNN1d) has no module at path 'block.1'" in message
    assert "'blocks.1'" in message


def test_hooks_exist_only_inside_the_with_block():
    model = MLP(input_shape=(1, 40), num_classes=10, hidden=(16,))
    recorder = FeatureRecorder(model, ["layers.0", "head"])
    target = model.get_submodule("layers.0")
    with recorder:
        assert len(target._forward_hooks) == 1
        model(torch.randn(2, 1, 40))
        assert set(recorder.features) == {"layers.0", "head"}
    assert len(target._forward_hooks) == 0 and len(model.head._forward_hooks) == 0
    assert not recorder.active
    model(torch.randn(2, 1, 40))  # no recording outside the block
    with recorder:
        assert recorder.features == {}  # cleared for every step


def test_hooks_removed_even_when_forward_raises():
    model = cnn()
    recorder = FeatureRecorder(model, ["blocks.1"])
    with pytest.raises(RuntimeError), recorder:
        model(torch.randn(2, 3, 40))  # wrong channel count
    assert len(model.blocks[1]._forward_hooks) == 0


def test_probe_shapes_leaves_bn_statistics_and_mode_alone():
    model = cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = probe_shapes(model, ["blocks.1", "head"], torch.randn(2, 1, 40))
    assert shapes == {"blocks.1": torch.Size([2, 16, 20]), "head": torch.Size([2, 10])}
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_any_module_can_be_recorded():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    _, feats = record(model, ["1"], torch.randn(5, 4))
    assert feats["1"].shape == (5, 3)


def test_tap_specs_resolve_to_paths():
    from kd_lab.core.recorder import resolve_tap

    model = cnn()
    assert resolve_tap(model, -1) == "blocks.2" and resolve_tap(model, 0) == "blocks.0"
    assert resolve_tap(model, "embedding") == "pool" and resolve_tap(model, "head") == "head"
    assert resolve_tap(MLP(input_shape=(1, 40), num_classes=10, hidden=(8, 8)), "embedding") == "layers.1"
    with pytest.raises(KDLabError, match="3 stages"):
        resolve_tap(model, 5)
    with pytest.raises(KDLabError, match="declares no stage_taps"):
        resolve_tap(nn.Sequential(nn.Linear(2, 2)), -1, "teacher")
    with pytest.raises(KDLabError, match=r"no module at path 'blcks\.0'"):
        resolve_tap(model, "blcks.0")
