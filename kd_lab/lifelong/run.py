"""One lifelong run: checks, data, model, the sequence, the metrics and ``results.json``.

results.json holds no path of the machine: the config is saved without ``paths`` and ``data.data_dir``, so
the files of experiments/lifelong can be committed as they are.
"""

import logging
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning import seed_everything
from omegaconf import DictConfig, OmegaConf

from kd_lab.lifelong.config import check_config
from kd_lab.lifelong.loop import TaskSequence
from kd_lab.lifelong.metrics import average_accuracy, forgetting, forgetting_per_task
from kd_lab.lifelong.model import multihead_from
from kd_lab.lifelong.tasks import task_subsets
from kd_lab.run.builders import build, build_model
from kd_lab.run.results import package_versions
from kd_lab.run.threads import apply_threads
from kd_lab.utils.io import atomic_write_json

log = logging.getLogger(__name__)
PROTOCOL = "task-incremental: the task id is known at test time and selects the task's head"


def portable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the keys that hold this machine's paths."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("paths", None)
    config.get("data", {}).pop("data_dir", None)
    return config


def run_lifelong(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg`` (conf/lifelong.yaml) and write ``<paths.output_dir>/results.json``; return its content."""
    start = time.perf_counter()
    settings = check_config(cfg)  # every config mistake, before anything is loaded or built
    threads = apply_threads(cfg.get("threads"))
    seed_everything(settings.seed, verbose=False)
    datamodule = build(cfg.data)  # kd-lab's builder: the group's `name` is no constructor argument
    datamodule.setup()  # loads and checks the data (shapes, labels, NaN/Inf) once
    splits = datamodule.splits
    train = task_subsets(splits["train"]["input"], splits["train"]["target"], settings.tasks, "train")
    test = task_subsets(splits["test"]["input"], splits["test"]["target"], settings.tasks, "test")
    model = multihead_from(build_model(cfg.trunk.model), [len(t) for t in settings.tasks])
    sequence = TaskSequence(
        model,
        train,
        test,
        settings,
        make_optimizer=instantiate(cfg.optimizer),
        batch_size=int(cfg.data.batch_size),
        eval_batch_size=int(cfg.data.eval_batch_size),
    )
    fit_start = time.perf_counter()
    matrix = sequence.run()
    fit_seconds = time.perf_counter() - fit_start
    averages = average_accuracy(matrix)
    results = {
        "status": "finished",
        "method": settings.method,
        "seed": settings.seed,
        "tasks": settings.tasks,
        "protocol": PROTOCOL,
        # row i: the test accuracy of every task after learning task i (joint: one row, all tasks at once)
        "accuracy_matrix": matrix,
        "average_accuracy": averages,
        "final_average_accuracy": averages[-1],
        "forgetting": forgetting(matrix),
        "forgetting_per_task": forgetting_per_task(matrix),
        "train_samples_per_task": [len(y) for _, y in train],
        "test_samples_per_task": [len(y) for _, y in test],
        "optimizer_steps": sequence.steps,
        "params": sum(p.numel() for p in model.parameters()),
        "config": portable_config(cfg),
        "fit_seconds": fit_seconds,
        "wall_seconds": time.perf_counter() - start,
        "threads": threads,
        "versions": package_versions(),
    }
    path = Path(cfg.paths.output_dir) / "results.json"
    atomic_write_json(results, path)
    f = results["forgetting"]
    log.info(
        "%s, seed %d: final average accuracy %.4f, forgetting %s (%.1f s); results: %s",
        settings.method, settings.seed, averages[-1], "-" if f is None else f"{f:.4f}",
        results["wall_seconds"], path,
    )  # fmt: skip
    return results
