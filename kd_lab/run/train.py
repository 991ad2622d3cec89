"""``kd-lab``: the Hydra app. ``main`` only calls ``train(cfg)``, a plain function that tests call directly.

One run: seed -> data -> teacher (loaded, reused from the store, or trained and cached) -> student,
algorithm, scheme -> DistillationModule -> fit -> test the last and the best-validation weights ->
``results.json`` and a short summary.
"""

import logging
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kd_lab.errors import KDLabError, brief
from kd_lab.run.assemble import Run, build_run, fresh_teacher_specs, trainer_overrides
from kd_lab.run.builders import CONFIG_DIR as BUILDERS_CONFIG_DIR
from kd_lab.run.builders import build, build_callbacks, build_datamodule, build_trainer, replace_nodes, to_dict
from kd_lab.run.chain import is_chain, resolve_chain
from kd_lab.run.checks.schema import validate_config
from kd_lab.run.ddp import job_scope, patch_lightning_hydra_launcher
from kd_lab.run.loggers import build_loggers, finish_loggers, quiet_lightning_console
from kd_lab.run.module import count_parameters
from kd_lab.run.outcome import exit_on_interrupt, exit_on_user_error, interrupt_handlers
from kd_lab.run.results import interrupted_record, write_results
from kd_lab.run.resume import (
    check_resume_dir,
    continue_csv_logs,
    quote_resume_override,
    rng_states,
    set_rng_states,
    start_or_resume,
)
from kd_lab.run.teacher_store import fill_teachers

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
    groups = ("data", "task", "teacher", "student", "algorithm", "scheme", "chain")
    results: dict[str, Any] = {
        "status": "running",
        "seed": cfg.get("seed"),
        "config": OmegaConf.to_container(cfg, resolve=False),  # resolved below, once the config is known good
        "names": {g: cfg[g].get("name") for g in groups if cfg.get(g)},
        "experiment": cfg.get("experiment_name"),
    }
    loggers: list = []
    trainer = None
    try:  # from here on a failure is recorded in results.json (status failed), so a sweep lists it
        validate_config(cfg)  # every bad key, value, file or pairing: one clear error before anything is built
        scheme = build(cfg.scheme)
        if is_chain(cfg) and cfg.chain.get("generations") is not None:
            cfg = replace_nodes(cfg, teacher=None)  # born-again: the network's earlier generation teaches it
        elif scheme.teacher_source == "none":  # the network teaches itself: no teacher config applies
            cfg = replace_nodes(cfg, teacher=None)
        results["config"] = to_dict(cfg)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = build_datamodule(cfg)
        datamodule.setup()  # loads and checks the data (NaN/Inf, labels, shapes) once, for the whole run
        if is_chain(cfg):  # teacher-assistant / born-again: earlier stages first; the last one teaches this run
            cfg, results["chain"] = resolve_chain(cfg, datamodule, train)
        # Built once, with untrained store teachers: a tap, shape or output mismatch fails here, before the
        # store trains a teacher; the teachers receive their weights below, in place.
        run = build_run(cfg, datamodule, scheme)
        generators = rng_states()  # the fit starts from the state of this build, whatever the teacher costs
        results["teacher"] = teacher_info(cfg, run)
        set_rng_states(generators)
        results["names"]["teacher"] = results["teacher"].get("name")
        if not results["names"]["teacher"]:
            results["names"].pop("teacher")
        module, teacher = run.module, run.step.teacher

        loggers = build_loggers(cfg.get("logger"))
        if resume_from:
            results["resumed_from"] = resume_from
            continue_csv_logs(loggers, resume_from)
        # where Lightning's SLURM requeue saves hpc_ckpt_<n>.ckpt and the requeued job finds it (docs/reliability.md)
        overrides = {"default_root_dir": cfg.trainer.get("default_root_dir") or str(run_dir)}
        overrides.update(trainer_overrides(cfg, module))
        trainer = build_trainer(cfg.trainer, build_callbacks(cfg.get("callbacks")), loggers or False, **overrides)
        for logger in loggers:
            logger.log_hyperparams(results["config"])
        results["params"] = {
            "student": count_parameters(run.student),
            "teacher": count_parameters(teacher) if teacher is not None else None,
            "algorithm": count_parameters(run.algorithm),
        }
        if teacher is not None:
            results["params"]["compression"] = results["params"]["teacher"] / results["params"]["student"]
        results["world_size"] = trainer.world_size
        results["task"] = {"name": run.task.name, "monitor": module.monitor, "headline": f"test/{run.task.headline}"}

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
            results["best"][module.monitor] = module.best_val
        else:  # no checkpoint (fast_dev_run, checkpointing off): the last weights are all there is
            results["best"] = dict(results["last"])
        results["algorithm"] = run.algorithm.report(run.student, datamodule.example_input(run.step.input_key))
        if trainer.is_global_zero:  # generation speed, acceptance rate: what the task measures beyond metrics
            results["report"] = run.task.report(run.student, teacher, datamodule)
        for logger in loggers:
            logger.log_metrics({"params/student": results["params"]["student"], **report_metrics(results)})
        results["status"] = "finished"
        return results, {"trainer": trainer, "module": module, "datamodule": datamodule, "teacher": teacher, "run": run}
    except BaseException as e:
        results["status"] = "failed"
        results["error"] = f"{type(e).__name__}: {e}"
        results["traceback"] = traceback.format_exc()
        results.update(interrupted_record(e, run_dir))  # SIGINT/SIGTERM: status interrupted, the resume= command
        raise
    finally:
        results["wall_seconds"] = time.perf_counter() - start
        if trainer is None or trainer.is_global_zero:
            path = write_results(run_dir, results)
            if results["status"] == "finished":
                log.info(summary(results, path))
        finish_loggers(loggers)


def report_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The task's report as flat metrics for the loggers (W&B, CSV): ``report/speculative/greedy`` ..."""
    report = results.get("report") or {}
    metrics = {
        f"report/generation/{k}_tokens_per_s": v["tokens_per_second"] for k, v in report.get("generation", {}).items()
    }
    metrics.update({f"report/speculative/{k}": v["acceptance_rate"] for k, v in report.get("speculative", {}).items()})
    return metrics


def teacher_info(cfg: DictConfig, run: Run) -> dict[str, Any]:
    """Weights for the run's store teachers (loaded, reused or trained now), and what results.json records."""
    if run.scheme.teacher_source == "fresh":
        specs = fresh_teacher_specs(cfg)
        return {"name": specs[0].name, "params": count_parameters(run.teachers[0]), "source": "online"}
    if not run.teachers:
        return {}
    return fill_teachers(cfg, run.teachers, run.datamodule)


def summary(results: dict[str, Any], path: Path) -> str:
    """A few lines for the terminal: the task's headline metric of the student, and how it relates to the
    teacher (the task's teacher metrics), the other models evaluated with it, and the chain's stages."""
    names = results["names"]
    best, teacher = results["best"], results.get("teacher") or {}
    head = results["task"]["headline"]  # e.g. test/acc
    metric = head.split("/")[-1]
    lines = [
        f"{names.get('algorithm')} ({names.get('scheme')}): {names.get('student')} <- {names.get('teacher', '-')}"
        f" on {names.get('data')}, seed {results['seed']}",
        f"  student test {metric} {best[head]:.4f} at best val epoch {best.get('epoch')}"
        f" | {results['last'][head]:.4f} at last epoch",
    ]
    compared = {k.removeprefix("test/"): v for k, v in best.items() if k.startswith("test/") and k != head}
    if compared:
        origin = {True: "reused from the store", False: "trained now"}.get(teacher.get("reused"), teacher.get("source"))
        shown = " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in compared.items())
        lines.append(f"  vs teacher ({origin}): {shown}")
    others = {k.split("/")[0]: v for k, v in best.items() if k.endswith(f"/{head}")}
    if others:  # models evaluated next to the student: learning teachers, peers, exits, their ensemble
        lines.append("  also: " + " | ".join(f"{name} {value:.4f}" for name, value in others.items()))
    report = results.get("report") or {}
    if report.get("generation"):
        speeds = " | ".join(f"{k} {v['tokens_per_second']:.0f}" for k, v in report["generation"].items())
        lines.append(f"  generation tokens/s (KV cache): {speeds}")
    if report.get("speculative"):
        rates = " | ".join(f"{k} {v['acceptance_rate']:.3f}" for k, v in report["speculative"].items())
        lines.append(f"  student as a draft for the teacher, acceptance rate: {rates}")
    for stage in results.get("chain", []):
        lines.append(f"  chain stage {stage['stage']}: test {metric} {stage['metrics'][head]:.4f}")
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
    """One job. A KDLabError is one message on stderr and exit status 1, except in a multirun, which goes on
    and reports its failed jobs at the end (kd_lab/run/outcome.py); SIGINT/SIGTERM exit with 130/143."""
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch 2.13 + Lightning 2.6 noise, every fit
    quiet_lightning_console()
    patch_lightning_hydra_launcher()
    run_dir = cfg.paths.output_dir
    with job_scope(), interrupt_handlers():  # one job of a multirun must not leak its DDP state into the next
        try:
            cfg, resume_from = start_or_resume(cfg, list(HydraConfig.get().overrides.task))
            results, _ = train(cfg, resume_from)
        except Exception as e:
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                exit_on_user_error(e, run_dir)
                raise
            # a sweep goes on: this job's results.json says "failed" with the error, so comparisons list it
            log.error("job failed: %s (%s)", brief(e), run_dir)
            return None
        except BaseException as e:  # SIGINT, SIGTERM: the run stops, even in a multirun
            exit_on_interrupt(e, run_dir)
            raise
    return results["best"].get(results["task"]["monitor"])  # what a sweeper optimizes: validation, never test


def cli() -> None:
    """The ``kd-lab`` command: ``main`` with ``resume=<dir>`` quoted for Hydra (kd_lab/run/resume.py)."""
    resume = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("resume=")), None)
    if resume and resume.strip("'\"") not in ("", "null") and "-m" not in sys.argv and "--multirun" not in sys.argv:
        try:  # before Hydra sets up the run directory's log file (a read-only directory fails there, unexplained)
            check_resume_dir(resume.strip("'\""))
        except KDLabError as e:
            print(f"kd-lab: {e}", file=sys.stderr)
            sys.exit(1)
    sys.argv = quote_resume_override(sys.argv)
    main()


if __name__ == "__main__":
    cli()
