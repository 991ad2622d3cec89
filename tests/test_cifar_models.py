"""The CIFAR zoo against RepDistiller's definitions (HobbitLong/RepDistiller ``models/``).

The table was produced by instantiating RepDistiller's model code next to ours for 100 classes (outside this
repo): parameter count, and a fingerprint of the state dict's names and shapes (buffers included). Equal
fingerprints mean RepDistiller's checkpoints load into our models; with its weights loaded the two gave the
same logits (max difference 6e-6, float rounding of the pooling order)."""

import hashlib

import pytest
import torch

from kd_lab.core.recorder import probe_shapes, resolve_tap
from kd_lab.models.cifar import ZOO

# name: (parameters for 100 classes, sha1[:16] of "key:shape" lines of the sorted state dict)
REFERENCE = {
    "resnet8": (83892, "12f62b8d43f1afe9"),
    "resnet14": (181108, "2950543d1e9d68d2"),
    "resnet20": (278324, "b9ddf09307659bef"),
    "resnet32": (472756, "f84a3988bee7703b"),
    "resnet44": (667188, "1e09d3c0c0fd525e"),
    "resnet56": (861620, "5804e24b1947c4ea"),
    "resnet110": (1736564, "00f1edfdf5dadc17"),
    "resnet8x4": (1233540, "7f0edb9af70c4beb"),
    "resnet32x4": (7433860, "235d5dfffe700e84"),
    "ResNet50": (23705252, "99813486061e8af8"),
    "wrn_16_1": (180916, "d63f675b4daedbca"),
    "wrn_16_2": (703284, "672c19730a52f172"),
    "wrn_40_1": (569780, "f518e61dec66cc40"),
    "wrn_40_2": (2255156, "9303544e45bfe084"),
    "vgg8": (3965028, "cccc6df644d950e5"),
    "vgg11": (9277284, "3cc7bd26e9268378"),
    "vgg13": (9462180, "85d262b0c680e48c"),
    "vgg16": (14774436, "9fc34865c6bc13b9"),
    "vgg19": (20086692, "d24385c16573be93"),
    "MobileNetV2": (812836, "e33ad8ebac326584"),
    "ShuffleV1": (949258, "38b2972fbe8f20c7"),
    "ShuffleV2": (1355528, "8a87fab55985a1c0"),
}


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    return hashlib.sha1("\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state.items())).encode()).hexdigest()[:16]


def test_the_zoo_is_the_reference_list():
    assert set(ZOO) == set(REFERENCE)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_parameters_and_state_dict_match_repdistiller(name):
    model = ZOO[name](num_classes=100)
    params, digest = REFERENCE[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert fingerprint(model.state_dict()) == digest


@pytest.mark.parametrize("name", list(REFERENCE))
def test_logits_and_declared_taps(name):
    torch.manual_seed(0)
    model = ZOO[name](num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    stages = [resolve_tap(model, i) for i in range(len(model.stage_taps))]
    embedding = resolve_tap(model, "embedding")
    shapes = probe_shapes(model, [*stages, embedding, "."], x)
    assert shapes["."] == (2, 10)
    sides = [shapes[s][-1] for s in stages]
    assert all(len(shapes[s]) == 4 for s in stages) and sides == sorted(sides, reverse=True)  # shallow to deep
    assert shapes[embedding][:2] == (2, next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).in_features)
    model.train()
    model(x).sum().backward()  # trains: every parameter gets a gradient
    assert all(p.grad is not None for p in model.parameters())
