"""A task is one file and one YAML: a toy task of the tests' own distills through kd offline and online, and
its metrics, monitored value and headline reach the checkpoint callback, results.json and the summary."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kd_lab.run.builders import replace_nodes
from kd_lab.run.train import train

TOY = Path(__file__).parent / "toy_task" / "top_two.yaml"


@pytest.mark.parametrize("scheme", ["offline", "online"])
def test_a_toy_task_distills_through_kd(make_cfg, scheme):
    cfg = make_cfg("algorithm=kd", f"scheme={scheme}", "callbacks=default")
    cfg = replace_nodes(cfg, task=OmegaConf.load(TOY))
    results, objs = train(cfg)
    assert results["status"] == "finished"
    assert results["task"] == {"name": "top_two", "monitor": "val/nll", "headline": "test/top2"}
    best = results["best"]
    assert 0.0 <= best["test/top2"] <= 1.0 and best["test/nll"] > 0 and "test/teacher_top2" in best
    assert "test/acc" not in best  # no accuracy unless the task asks for one
    checkpoint = next(c for c in objs["trainer"].checkpoint_callbacks if c.monitor)
    assert (checkpoint.monitor, checkpoint.mode) == ("val/nll", "min")
    # the best epoch is the one of the lowest validation NLL
    assert best["val/nll"] == pytest.approx(float(checkpoint.best_model_score), rel=1e-6)


def test_the_core_knows_no_classification():
    """The step and the LightningModule mention no class count and no accuracy metric."""
    root = Path(__file__).parents[1] / "kd_lab"
    for path in (root / "core" / "step.py", root / "run" / "module.py"):
        text = path.read_text()
        for word in ("num_classes", "Accuracy", "argmax", "cross_entropy"):
            assert word not in text, f"{path.name} mentions {word}"
