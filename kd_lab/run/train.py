"""``kd-lab``: the Hydra app. ``main`` only calls ``train(cfg)``, a plain function that tests call directly.

One run: seed -> data -> teacher (loaded, reused from the store, or trained and cached) -> student,
algorithm, scheme -> DistillationModule -> fit -> test the last and the best-validation weights ->
``results.json`` and a short summary.
"""

import logging
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kd_lab.errors import KDLabError, brief
from kd_lab.run.builders import CONFIG_DIR as BUILDERS_CONFIG_DIR
from kd_lab.run.builders import (
    build,
    build_callbacks,
    build_datamodule,
    build_model,
    build_module,
    build_trainer,
    group_option,
    replace_nodes,
    to_dict,
)
from kd_lab.run.chain import is_chain, resolve_chain
from kd_lab.run.checkpoints import load_weights
from kd_lab.run.checks.schema import validate_config
from kd_lab.run.ddp import job_scope, patch_lightning_hydra_launcher
from kd_lab.run.fused_steps import manual_step_overrides
from kd_lab.run.loggers import build_loggers, finish_loggers, quiet_lightning_console
from kd_lab.run.module import count_parameters
from kd_lab.run.results import write_results
from kd_lab.run.resume import continue_csv_logs, start_or_resume
from kd_lab.run.teacher_store import resolve_teacher

log = logging.getLogger(__name__)


def _test(trainer: L.Trainer, module, datamodule, ckpt_path: str | None, suffix: str) -> dict[str, float]:
    module.test_suffix = suffix
    metrics = trainer.test(module, datamodule, ckpt_path=ckpt_path, verbose=False)[0]
    return {k.replace(suffix, "") if suffix else k: float(v) for k, v in metrics.items()}


def train(cfg: DictConfig, resume_from: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one student as ``cfg`` says; returns ``(results, objects)``. ``resume_from``: a checkpoint of this
    run to continue from (``kd-lab resume=<run dir>``, kd_lab/run/resume.py)."""
    start = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    results: dict[str, Any] = {
        "status": "running",
        "seed": cfg.get("seed"),
        "config": OmegaConf.to_container(cfg, resolve=False),  # resolved below, once the config is known good
        "names": {g: cfg[g].get("name") for g in ("data", "teacher", "student", "algorithm", "scheme") if cfg.get(g)},
        "experiment": cfg.get("experiment_name"),
    }
    loggers: list = []
    trainer = None
    try:  # from here on a failure is recorded in results.json (status failed), so a sweep lists it
        # every bad key, value, file or pairing: one clear error before anything is built
        validated_data = validate_config(cfg)
        scheme = build(cfg.scheme)
        if scheme.teacher_source == "none":  # the network (or its earlier generation) teaches itself
            results["names"].pop("teacher", None)
            if not is_chain(cfg):
                cfg = replace_nodes(cfg, teacher=None)  # no teacher config applies
        results["config"] = to_dict(cfg)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = validated_data if validated_data is not None else build_datamodule(cfg)  # loaded once
        if is_chain(cfg):  # teacher-assistant / born-again: earlier stages first; the last one teaches this run
            cfg, results["chain"] = resolve_chain(cfg, datamodule)
        teachers, results["teacher"] = build_teachers(cfg, scheme, datamodule)
        teacher = teachers[0] if teachers else None

        L.seed_everything(cfg.seed, workers=True, verbose=False)  # same student init, cached teacher or not
        student = build_model(cfg.student.model)
        algorithm = build(cfg.algorithm)
        module = build_module(cfg, datamodule, student, algorithm, scheme, cfg.optim, teachers)
        log.info("%d optimizer step(s) per Lightning batch (perf.steps_per_batch: %s)",
                 datamodule.steps_per_batch, module.steps_per_batch_reason)  # fmt: skip

        loggers = build_loggers(cfg.get("logger"))
        if resume_from:
            results["resumed_from"] = resume_from
            continue_csv_logs(loggers, resume_from)
        # where Lightning's SLURM requeue saves hpc_ckpt_<n>.ckpt and the requeued job finds it (docs/reliability.md)
        overrides = {"default_root_dir": cfg.trainer.get("default_root_dir") or str(run_dir)}
        if algorithm.manual_optimization and cfg.trainer.get("strategy") == "ddp":
            overrides["strategy"] = "ddp_find_unused_parameters_true"  # each backward touches one player only
        overrides.update(
            manual_step_overrides(cfg.trainer, module, datamodule.steps_per_batch)
        )  # kd_lab.run.fused_steps
        trainer = build_trainer(cfg.trainer, build_callbacks(cfg.get("callbacks")), loggers or False, **overrides)
        for logger in loggers:
            logger.log_hyperparams(results["config"])
        results["params"] = {
            "student": count_parameters(student),
            "teacher": count_parameters(teacher) if teacher is not None else None,
            "algorithm": count_parameters(algorithm),
        }
        if teacher is not None:
            results["params"]["compression"] = results["params"]["teacher"] / results["params"]["student"]
        results["world_size"] = trainer.world_size

        fit_start = time.perf_counter()
        trainer.fit(module, datamodule, ckpt_path=resume_from or cfg.get("ckpt_path"))
        results["fit_seconds"] = time.perf_counter() - fit_start

        results["last"] = _test(trainer, module, datamodule, None, "_last")
        results["last"]["epoch"] = trainer.current_epoch - 1
        # the monitored checkpoint holds the best-validation weights (callbacks.last_checkpoint holds the last)
        best = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
        best_path = best.best_model_path if best else ""
        if best_path:
            results["best"] = _test(trainer, module, datamodule, best_path, "")
            results["best"]["epoch"] = module.best_val_epoch
            results["best"]["val/acc"] = float(module.val_acc_best.compute())
        else:  # no checkpoint (fast_dev_run, checkpointing off): the last weights are all there is
            results["best"] = dict(results["last"])
        results["algorithm"] = algorithm.report(module.student, datamodule.example_input(module.input_key))
        for logger in loggers:
            logger.log_metrics({"params/student": results["params"]["student"]})
        results["status"] = "finished"
        return results, {"trainer": trainer, "module": module, "datamodule": datamodule, "teacher": teacher}
    except BaseException as e:
        results["status"] = "failed"
        results["error"] = f"{type(e).__name__}: {e}"
        results["traceback"] = traceback.format_exc()
        raise
    finally:
        results["wall_seconds"] = time.perf_counter() - start
        if trainer is None or trainer.is_global_zero:
            path = write_results(run_dir, results)
            if results["status"] == "finished":
                log.info(summary(results, path))
        finish_loggers(loggers)


def build_teachers(cfg: DictConfig, scheme, datamodule) -> tuple[list, dict[str, Any]]:
    """The run's teachers and what results.json records about the first: from the store (frozen) or, when the
    scheme trains them, freshly initialized (a cohort's peers, for algorithms that declare ``peers``)."""
    if scheme.teacher_source == "fresh":
        return fresh_teachers(cfg)
    if not cfg.get("teacher"):
        return [], {}
    teacher, info = resolve_teacher(cfg, datamodule)
    teachers = [teacher]
    for i, name in enumerate(cfg.algorithm.get("extra_teachers") or [], start=1):
        extra, info[f"extra_{i}"] = resolve_teacher(
            group_option(cfg, "teacher", name, "teacher", keep=("optim",)), datamodule
        )
        teachers.append(extra)
    return teachers, info


def fresh_teachers(cfg: DictConfig) -> tuple[list, dict[str, Any]]:
    """Teachers that learn in the run: the teacher config, or a cohort's peers (``algorithm.peers`` - 1 models
    from ``algorithm.peer_models``, student configs, by default copies of the student's architecture). Each
    gets its own seed, so peers of one architecture start from different weights."""
    peers = cfg.algorithm.get("peers")
    if peers is None:
        specs = [cfg.teacher]
    else:
        names = list(cfg.algorithm.get("peer_models") or [cfg.student.name] * (peers - 1))
        if len(names) != peers - 1:
            raise KDLabError(
                f"algorithm.peer_models names {len(names)} models for algorithm.peers={peers}: give peers - 1 "
                "student configs (the student is peer 0), or leave it empty for copies of the student."
            )
        specs = [cfg.student if n == cfg.student.name else group_option(cfg, "student", n, "student").student
                 for n in names]  # fmt: skip
    teachers = []
    for k, spec in enumerate(specs, start=1):
        torch.manual_seed(cfg.seed + 100_003 * k)  # not the student's init stream
        teacher = build_model(spec.model)
        if spec.get("ckpt_path"):  # a warm start for an online teacher
            load_weights(teacher, spec.ckpt_path, "teacher")
        teachers.append(teacher)
    info = {"name": specs[0].name, "params": count_parameters(teachers[0]), "source": "online"}
    return teachers, info


def summary(results: dict[str, Any], path: Path) -> str:
    names = results["names"]
    best, teacher = results["best"], results.get("teacher") or {}
    lines = [
        f"{names.get('algorithm')} ({names.get('scheme')}): {names.get('student')} <- {names.get('teacher', '-')}"
        f" on {names.get('data')}, seed {results['seed']}",
        f"  student test acc {best['test/acc']:.4f} at best val epoch {best.get('epoch')}"
        f" | {results['last']['test/acc']:.4f} at last epoch",
    ]
    if "test/teacher_acc" in best:
        origin = {True: "reused from the store", False: "trained now"}.get(teacher.get("reused"), teacher.get("source"))
        lines.append(
            f"  teacher test acc {best['test/teacher_acc']:.4f} ({origin})"
            f" | agreement {best['test/agreement']:.4f} | KL to teacher {best['test/kl_to_teacher']:.4f}"
        )
    others = {k.split("/")[0]: v for k, v in best.items() if k.endswith("/test/acc")}
    if others:  # models evaluated next to the student: learning teachers, peers, exits, their ensemble
        lines.append("  also: " + " | ".join(f"{name} {acc:.4f}" for name, acc in others.items()))
    for stage in results.get("chain", []):
        lines.append(f"  chain stage {stage['stage']}: test acc {stage['metrics']['test/acc']:.4f}")
    p = results["params"]
    lines.append(
        f"  params: student {p['student']:,}"
        + (f", teacher {p['teacher']:,} ({p['compression']:.1f}x)" if p.get("teacher") else "")
        + f" | {results['wall_seconds']:.1f}s | {path}"
    )
    return "\n".join(lines)


CONFIG_DIR = str(BUILDERS_CONFIG_DIR)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch 2.13 + Lightning 2.6 noise, every fit
    quiet_lightning_console()
    patch_lightning_hydra_launcher()
    with job_scope():  # one job of a multirun must not leak its DDP state into the next
        try:
            cfg, resume_from = start_or_resume(cfg, list(HydraConfig.get().overrides.task))
            results, _ = train(cfg, resume_from)
        except Exception as e:
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                raise
            # a sweep goes on: this job's results.json says "failed" with the error, so comparisons list it
            log.error("job failed: %s (%s)", brief(e), cfg.paths.output_dir)
            return None
    return results["best"].get("val/acc")  # what a sweeper optimizes: validation, never test


if __name__ == "__main__":
    main()
