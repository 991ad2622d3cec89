"""Every algorithm x scheme pair: valid ones run a fast_dev_run, invalid ones fail at build time."""

import itertools
from pathlib import Path

import pytest

from kd_lab.errors import KDLabError
from kd_lab.run.checks.compatibility import SCHEMES as ALL_SCHEMES
from kd_lab.run.checks.compatibility import algorithm_classes, check_compatible, compatible
from kd_lab.run.train import CONFIG_DIR, train

COMPATIBLE = compatible()

ALGORITHMS = sorted(p.stem for p in Path(CONFIG_DIR, "algorithm").glob("*.yaml"))
SCHEMES = sorted(p.stem for p in Path(CONFIG_DIR, "scheme").glob("*.yaml"))
# the classification matrix: language-model-only algorithms have theirs (tests/test_lm.py)
CLASSIFYING = [a for a in ALGORITHMS if "classification" in algorithm_classes()[a].task_kinds]
PAIRS = list(itertools.product(CLASSIFYING, SCHEMES))
VALID = [(a, s) for a, s in PAIRS if a in COMPATIBLE.get(s, ())]
INVALID = [(a, s) for a, s in PAIRS if a not in COMPATIBLE.get(s, ())]
# A CNN teacher, and a student of each family: CNN (feature maps) and MLP (vectors only).
PAIRING = ["teacher=cnn1d_large", "teacher.model.channels=[8,16,16]"]
# (algorithm, student) pairs a method cannot bridge by design: the build must say why (message fragment).
BUILD_ERRORS: dict[tuple[str, str], str] = {
    ("attention", "mlp_small"): r"attention transfer needs spatial feature maps.*Pick algorithm=fitnet or kd",
    # one hidden layer: no section before the deepest to attach an exit to
    ("byot", "mlp_small"): r"byot with exits=all needs a student with at least 2 stage_taps.*algorithm.exits",
    # a GNN teacher on graph data only (tests/test_graph.py runs it on data=csbm)
    ("glnn", "mlp_small"): r"algorithm=glnn distills a graph neural network into an MLP.*teacher=gcn data=csbm",
    ("glnn", "cnn1d_tiny"): r"algorithm=glnn distills a graph neural network into an MLP.*teacher=gcn data=csbm",
    # one hidden layer: IRG's transformation needs two layers of each network
    ("irg", "mlp_small"): r"irg's transformation needs two layers of each network.*transformation_weight=0",
    # the matrix's teacher is a CNN of other widths: Tf-KD_self needs the student's own architecture
    ("tf_kd_self", "mlp_small"): r"tf_kd_self needs a teacher of the student's own architecture.*chain=born_again",
    ("tf_kd_self", "cnn1d_tiny"): r"tf_kd_self needs a teacher of the student's own architecture.*chain=born_again",
    # attention terms on an MLP's vectors (the KL term alone runs: tests/test_data_free.py)
    ("zskt", "mlp_small"): r"algorithm=zskt: its attention terms need feature maps.*algorithm.at_weight=0",
}
# algorithms that need a particular kind of data
DATA = {"cross_modal": "data=fake_xmodal"}
# algorithms whose own set-up would dominate a fast_dev_run: a smaller one
EXTRA = {"deep_inversion": ["algorithm.num_samples=64", "algorithm.iterations=2"]}


def test_every_config_is_declared():
    assert set(SCHEMES) == set(COMPATIBLE)
    assert set(ALGORITHMS) == set().union(*COMPATIBLE.values())


@pytest.mark.parametrize(("algorithm", "scheme"), VALID)
@pytest.mark.parametrize("student", ["mlp_small", "cnn1d_tiny"])
def test_fast_dev_run(make_cfg, algorithm, scheme, student):
    data = DATA.get(algorithm, "data=fake")
    overrides = [data, f"algorithm={algorithm}", f"scheme={scheme}", f"student={student}", "debug=fdr"]
    cfg = make_cfg(*PAIRING, *overrides, *EXTRA.get(algorithm, []))
    if (algorithm, student) in BUILD_ERRORS:
        with pytest.raises(KDLabError, match=BUILD_ERRORS[algorithm, student]):
            train(cfg)
        return
    results, objs = train(cfg)
    assert results["status"] == "finished"
    assert objs["trainer"].fast_dev_run
    assert 0.0 <= results["best"]["test/acc"] <= 1.0


@pytest.mark.parametrize(("algorithm", "scheme"), INVALID or [pytest.param("-", "-", marks=pytest.mark.skip)])
def test_invalid_pair_fails_at_build_time(make_cfg, algorithm, scheme, tmp_path):
    with pytest.raises(KDLabError, match=f"algorithm '{algorithm}' cannot run under scheme '{scheme}'"):
        train(make_cfg(f"algorithm={algorithm}", f"scheme={scheme}", "debug=fdr"))
    assert not (tmp_path / "teachers").exists()  # nothing was trained


def test_pair_check_names_the_fix():
    with pytest.raises(KDLabError, match=r"unknown scheme 'onlin'; valid schemes: \['offline'"):
        check_compatible("kd", None, "onlin")
    with pytest.raises(KDLabError, match=r"algorithm 'byot' cannot run under scheme 'offline'. Under 'offline' pick "):
        check_compatible("byot", None, "offline")
    with pytest.raises(KDLabError, match=r"run 'codistillation' with scheme=online"):
        check_compatible("codistillation", None, "self")


def test_the_table_is_what_the_classes_declare():
    """The compatibility table is derived from each algorithm class's ``schemes``: nothing to keep in sync."""
    for name, cls in algorithm_classes().items():
        assert {s for s in ALL_SCHEMES if name in COMPATIBLE[s]} == set(cls.schemes)


def test_an_algorithm_of_another_task_is_refused():
    with pytest.raises(KDLabError, match=r"algorithm 'crd' cannot run on a language_modeling task"):
        check_compatible("crd", None, "offline", "language_modeling")


LANGUAGE_ONLY = sorted(n for n, c in algorithm_classes().items() if "classification" not in c.task_kinds)


@pytest.mark.parametrize("algorithm", LANGUAGE_ONLY)
def test_a_language_model_algorithm_on_a_classifier_names_the_task(make_cfg, algorithm):
    """gkd and seq_kd read task.prompt_length, which a classifier's task lacks: the pairing rule is the message."""
    scheme = "offline" if "offline" in algorithm_classes()[algorithm].schemes else "self"
    with pytest.raises(KDLabError, match=f"algorithm '{algorithm}' cannot run on a classification task"):
        train(make_cfg(f"algorithm={algorithm}", f"scheme={scheme}", "debug=fdr"))


def test_cross_modal_needs_paired_data(make_cfg):
    with pytest.raises(KDLabError, match=r"algorithm=cross_modal needs paired data.*data=mnist1d_xmodal"):
        train(make_cfg(*PAIRING, "algorithm=cross_modal", "debug=fdr"))
