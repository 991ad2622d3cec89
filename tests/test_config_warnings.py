"""Settings that cannot do what they say (kd_lab/run/checks/settings.py): a warning naming the setting and the
fix, or a refusal where the run would be meaningless. Checked on composed configs; nothing is trained."""

import logging

import pytest

from kd_lab.errors import KDLabError
from kd_lab.run.builders import to_dict
from kd_lab.run.checks.schema import validate_config
from kd_lab.run.checks.settings import check_settings


def warnings_of(cfg) -> list[str]:
    return check_settings(to_dict(cfg))


def one_warning(cfg, *parts: str) -> str:
    found = warnings_of(cfg)
    assert len(found) == 1, found
    for part in parts:
        assert part in found[0], found[0]
    return found[0]


def test_the_shipped_defaults_warn_of_nothing(make_cfg):
    assert warnings_of(make_cfg(fast=False)) == []
    assert warnings_of(make_cfg()) == []  # the tests' 2-epoch runs, kd with a cosine schedule


def test_dkd_warmup_longer_than_the_run(make_cfg):
    """DKD's default 20-epoch warm-up in a 5-epoch run: w = min(1, (epoch + 1) / 20) ends at 5 / 20."""
    one_warning(
        make_cfg("algorithm=dkd", "trainer.max_epochs=5"),
        "algorithm.warmup_epochs=20 with trainer.max_epochs=5",
        "never reach full weight (at most 0.25 of it, in the last epoch)",
        "algorithm.warmup_epochs=0",
    )


def test_dkd_warmup_as_long_as_the_run(make_cfg):
    one_warning(make_cfg("algorithm=dkd", "trainer.max_epochs=20"), "reach full weight only in the last epoch")


def test_dkd_warmup_shorter_than_the_run_is_fine(make_cfg):
    assert warnings_of(make_cfg("algorithm=dkd", "trainer.max_epochs=21")) == []
    assert warnings_of(make_cfg("algorithm=dkd", "algorithm.warmup_epochs=0", "trainer.max_epochs=2")) == []


def test_ab_initialization_as_long_as_the_run(make_cfg):
    """AB's initialization stage trains its transfer term alone: as long as the run, no task loss ever."""
    one_warning(
        make_cfg("algorithm=ab", "trainer.max_epochs=10"),
        "algorithm.init_epochs=10 with trainer.max_epochs=10",
        "never trains on the task's loss",
        "algorithm.joint=true",
    )
    assert warnings_of(make_cfg("algorithm=ab", "trainer.max_epochs=11")) == []
    assert warnings_of(make_cfg("algorithm=ab", "algorithm.joint=true", "trainer.max_epochs=10")) == []


def test_learning_rate_warmup_as_long_as_the_run(make_cfg):
    one_warning(
        make_cfg("optim.scheduler.warmup_epochs=2"),
        "optim.scheduler.warmup_epochs=2 with trainer.max_epochs=2",
        "never decays",
        "or 0",
    )


def test_milestones_past_the_last_epoch(make_cfg):
    """sgd_multistep decays at 150, 180, 210: a 180-epoch run (epochs 0..179) loses the last two."""
    one_warning(
        make_cfg("optim=sgd_multistep", "trainer.max_epochs=180"),
        "optim.scheduler.milestones=[150, 180, 210] with trainer.max_epochs=180",
        "the decays at [180, 210] never happen",
        "decays 1 of 3 times",
        "optim.scheduler.milestones=[112,135,157]",
        "trainer.max_epochs=211",
    )
    assert warnings_of(make_cfg("optim=sgd_multistep", "trainer.max_epochs=211")) == []


def test_the_store_teachers_schedule_is_checked_against_teacher_max_epochs(make_cfg, tmp_path):
    cfg = make_cfg("optim@teacher.optim=sgd_multistep", "teacher.max_epochs=30")
    one_warning(cfg, "teacher.optim.scheduler.milestones=[150, 180, 210] with teacher.max_epochs=30")
    # a teacher loaded from a checkpoint is not trained: its recipe does nothing, so nothing to say
    loaded = make_cfg("optim@teacher.optim=sgd_multistep", f"teacher.ckpt_path={tmp_path}/t.pt")
    assert warnings_of(loaded) == []


def test_a_decay_factor_of_one(make_cfg):
    one_warning(
        make_cfg("optim=sgd_multistep", "trainer.max_epochs=240", "optim.scheduler.gamma=1"),
        "optim.scheduler.gamma=1",
        "the milestones change nothing",
    )


def test_an_assistant_that_is_the_student(make_cfg):
    one_warning(
        make_cfg("chain=teacher_assistant", "chain.assistants=[mlp_small]"),
        "chain.assistants=['mlp_small'] names the run's student mlp_small",
        "largest first",
    )


def test_an_assistant_named_twice(make_cfg):
    one_warning(
        make_cfg("chain=teacher_assistant", "chain.assistants=[mlp_medium,mlp_medium]"),
        "names ['mlp_medium'] more than once",
    )


def test_a_debug_run_is_not_warned_about_its_schedules(make_cfg):
    assert warnings_of(make_cfg("algorithm=dkd", "debug=fdr")) == []


def test_warnings_are_logged_by_validate_config(make_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="kd_lab.run.checks.settings"):
        validate_config(make_cfg("algorithm=dkd", "trainer.max_epochs=5"))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "algorithm.warmup_epochs=20 with trainer.max_epochs=5" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algorithm.ce_weight=0", "algorithm.kd_weight=0"],
            "algorithm.ce_weight=0 and algorithm.kd_weight=0: every term of the kd loss is weighted 0",
        ),
        (
            ["algorithm=dkd", "algorithm.ce_weight=0", "algorithm.alpha=0", "algorithm.beta=0"],
            "algorithm.ce_weight=0 and algorithm.alpha=0 and algorithm.beta=0: every term of the dkd loss",
        ),
        (["algorithm=none", "algorithm.ce_weight=0"], "algorithm.ce_weight=0: every term of the none loss"),
    ],
)
def test_a_loss_weighted_zero_is_refused(make_cfg, overrides, message):
    with pytest.raises(KDLabError, match=message) as caught:
        validate_config(make_cfg(*overrides))
    assert "set at least one weight above 0" in str(caught.value)


def test_one_nonzero_weight_is_enough(make_cfg):
    dkd = make_cfg("algorithm=dkd", "algorithm.ce_weight=0", "algorithm.alpha=0", "trainer.max_epochs=30")
    assert warnings_of(dkd) == []  # NCKD alone (beta 8) is a loss
    validate_config(make_cfg("algorithm.ce_weight=0"))  # KD on the teacher's outputs alone: a real method


def test_a_chain_under_an_algorithm_that_ignores_the_teacher_is_refused(make_cfg):
    with pytest.raises(KDLabError, match=r"chain=born_again with algorithm=none: that algorithm ignores its teacher"):
        validate_config(make_cfg("chain=born_again", "algorithm=none"))
