"""``kd-lab``: the Hydra app. ``main`` only calls ``train(cfg)``, a plain function that tests call directly.

One run: seed -> data -> teacher (loaded, reused from the store, or trained and cached) -> student,
algorithm, scheme -> DistillationModule -> fit -> test the last and the best-validation weights ->
``results.json`` and a short summary.

This module imports no torch, Lightning or transformers when it is imported (``_DEFERRED``): ``kd-lab --help``
and ``kd-lab --cfg job`` are handled by Hydra before any run code is needed, and those imports took ~10 s.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kd_lab.errors import KDLabError, brief
from kd_lab.run.outcome import (
    discard_unstarted_run,
    error_record,
    exit_on_interrupt,
    exit_on_user_error,
    interrupt_handlers,
    keep_failure_record,
)

if TYPE_CHECKING:  # the same names, imported at run time by _import_run_modules()
    import lightning as L
    from lightning import seed_everything

    from kd_lab.run.assemble import Run, build_run, fresh_teacher_specs, trainer_overrides
    from kd_lab.run.builders import build, build_callbacks, build_datamodule, build_trainer, replace_nodes, to_dict
    from kd_lab.run.chain import is_chain, resolve_chain
    from kd_lab.run.checks.schema import validate_config
    from kd_lab.run.ddp import job_scope, patch_lightning_hydra_launcher
    from kd_lab.run.loggers import build_loggers, finish_loggers, quiet_lightning_console
    from kd_lab.run.module import count_parameters
    from kd_lab.run.results import interrupted_record, write_results
    from kd_lab.run.resume import continue_csv_logs, release_run_lock, rng_states, set_rng_states, start_or_resume
    from kd_lab.run.teacher_store import fill_teachers
    from kd_lab.run.threads import apply_threads

log = logging.getLogger(__name__)

# module -> the names this module uses from it. They import torch and Lightning, so they are bound on first use
# (``_import_run_modules``), as module attributes: a test can still monkeypatch ``kd_lab.run.train.<name>``.
_DEFERRED = {
    "lightning": ("seed_everything",),
    "kd_lab.run.assemble": ("build_run", "fresh_teacher_specs", "trainer_overrides"),
    "kd_lab.run.builders": (
        "build",
        "build_callbacks",
        "build_datamodule",
        "build_trainer",
        "replace_nodes",
        "to_dict",
    ),
    "kd_lab.run.chain": ("is_chain", "resolve_chain"),
    "kd_lab.run.checks.schema": ("validate_config",),
    "kd_lab.run.ddp": ("job_scope", "patch_lightning_hydra_launcher"),
    "kd_lab.run.loggers": ("build_loggers", "finish_loggers", "quiet_lightning_console"),
    "kd_lab.run.module": ("count_parameters",),
    "kd_lab.run.results": ("interrupted_record", "write_results"),
    "kd_lab.run.resume": ("continue_csv_logs", "release_run_lock", "rng_states", "set_rng_states", "start_or_resume"),
    "kd_lab.run.teacher_store": ("fill_teachers",),
    "kd_lab.run.threads": ("apply_threads",),
}


def _import_run_modules() -> None:
    """Bind every name of ``_DEFERRED`` that is not bound yet (one a test patched stays patched)."""
    for module, names in _DEFERRED.items():
        missing = [name for name in names if name not in globals()]
        if missing:
            imported = importlib.import_module(module)
            globals().update({name: getattr(imported, name) for name in missing})


def __getattr__(name: str) -> Any:
    """``kd_lab.run.train.build_callbacks`` and the other deferred names, imported when first asked for."""
    if any(name in names for names in _DEFERRED.values()):
        _import_run_modules()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConsoleFilter(logging.Filter):
    """Keeps the INFO records of libraries off the console (conf/hydra/job_logging/kd_lab.yaml); the log file
    has them. Lightning's tips and matplotlib's "generated new fontManager" buried kd-lab's lines. Warnings and
    errors, and every other logger's records, pass."""

    QUIET = ("lightning", "pytorch_lightning", "lightning_fabric", "matplotlib")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] not in self.QUIET or record.levelno > logging.INFO


def _test(trainer: L.Trainer, module, datamodule, ckpt_path: str | None, suffix: str) -> dict[str, float]:
    module.test_suffix = suffix
    metrics = trainer.test(module, datamodule, ckpt_path=ckpt_path, verbose=False)[0]
    return {k.replace(suffix, "") if suffix else k: float(v) for k, v in metrics.items()}


def train(cfg: DictConfig, resume_from: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one student as ``cfg`` says; returns ``(results, objects)``. ``resume_from``: a checkpoint of this
    run to continue from (``kd-lab resume=<run dir>``, kd_lab/run/resume.py)."""
    _import_run_modules()
    start = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    groups = ("data", "task", "teacher", "student", "algorithm", "scheme", "chain")
    results: dict[str, Any] = {
        "status": "running",
        # where the run was when it ended: "checks" (config, data, build: no compute spent yet), "chain",
        # "teacher", "fit", "test". A failure in "checks" leaves no run directory (kd_lab/run/outcome.py).
        "stage": "checks",
        "seed": cfg.get("seed"),
        "config": OmegaConf.to_container(cfg, resolve=False),  # resolved below, once the config is known good
        "names": {g: cfg[g].get("name") for g in groups if cfg.get(g)},
        "experiment": cfg.get("experiment_name"),
    }
    loggers: list = []
    trainer = None
    try:  # from here on a failure is recorded in results.json (status failed), so a sweep lists it
        validate_config(cfg)  # every bad key, value, file or pairing: one clear error before anything is built
        apply_threads(cfg.get("threads"))  # before any compute: the teacher store, chain stages and DDP ranks too
        scheme = build(cfg.scheme)
        if is_chain(cfg) and cfg.chain.get("generations") is not None:
            cfg = replace_nodes(cfg, teacher=None)  # born-again: the network's earlier generation teaches it
        elif scheme.teacher_source == "none":  # the network teaches itself: no teacher config applies
            cfg = replace_nodes(cfg, teacher=None)
        results["config"] = to_dict(cfg)
        seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = build_datamodule(cfg)
        datamodule.setup()  # loads and checks the data (NaN/Inf, labels, shapes) once, for the whole run
        if is_chain(cfg):  # teacher-assistant / born-again: earlier stages first; the last one teaches this run
            results["stage"] = "chain"
            chain_start = time.perf_counter()
            cfg, results["chain"] = resolve_chain(cfg, datamodule, train)
            results["chain_seconds"] = time.perf_counter() - chain_start
        # Built once, with untrained store teachers: a tap, shape or output mismatch fails here, before the
        # store trains a teacher; the teachers receive their weights below, in place.
        run = build_run(cfg, datamodule, scheme)
        # student.init_from_teacher: checked now, before the store trains a teacher; applied once it has weights
        init_plan = importlib.import_module("kd_lab.models.init_from_teacher").plan_from_config(cfg, run)
        generators = rng_states()  # the fit starts from the state of this build, whatever the teacher costs
        results["stage"] = "teacher"
        teacher_start = time.perf_counter()
        results["teacher"] = teacher_info(cfg, run)
        if init_plan is not None:  # before the student's first step: which teacher layers it starts from
            results["init_from_teacher"] = init_plan.apply()
        if run.teachers and run.scheme.teacher_source != "fresh":  # loaded, reused or trained before the fit
            results["teacher_seconds"] = time.perf_counter() - teacher_start
        set_rng_states(generators)
        results["names"]["teacher"] = results["teacher"].get("name")
        if not results["names"]["teacher"]:
            results["names"].pop("teacher")
        module, teacher = run.module, run.step.teacher
        student_start = time.perf_counter()  # the student's part of the run: loggers, fit, tests, report

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
        if getattr(run.student, "latency", None):  # a student that timed its forward at build (models/search_space.py)
            results["latency"] = run.student.latency
        if cfg.get("quantize"):  # bits, bucket size and packed bytes next to the fp32 bytes (models/quantized.py)
            results["quantize"] = importlib.import_module("kd_lab.models.quantized").size_report(run.student)
        results["world_size"] = trainer.world_size
        results["task"] = {"name": run.task.name, "monitor": module.monitor, "headline": f"test/{run.task.headline}"}

        results["stage"] = "fit"
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule, ckpt_path=resume_from or cfg.get("ckpt_path"))
        results["fit_seconds"] = time.perf_counter() - fit_start

        # Epochs are counted from 1 wherever a user reads them (console, summary, results.json): "epoch 3" is
        # the third. Lightning counts from 0 (trainer.current_epoch, metrics.csv's "epoch" column).
        results["stage"] = "test"
        results["last"] = _test(trainer, module, datamodule, None, "_last")
        results["last"]["epoch"] = trainer.current_epoch  # the epochs done (Lightning's count after the fit)
        # the monitored checkpoint holds the best-validation weights (callbacks.last_checkpoint holds the last)
        best = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
        best_path = best.best_model_path if best else ""
        if best_path:
            results["best"] = _test(trainer, module, datamodule, best_path, "")
            results["best"]["epoch"] = module.best_val_epoch + 1 if module.best_val_epoch >= 0 else None
            results["best"][module.monitor] = module.best_val
        else:  # no checkpoint (fast_dev_run, checkpointing off): the last weights are all there is
            results["best"] = dict(results["last"])
        results["algorithm"] = run.algorithm.report(run.student, datamodule.example_input(run.step.input_key))
        if trainer.is_global_zero:  # generation speed, acceptance rate: what the task measures beyond metrics
            results["report"] = run.task.report(run.student, teacher, datamodule)
        for logger in loggers:
            logger.log_metrics({"params/student": results["params"]["student"], **report_metrics(results)})
        results["status"] = "finished"
        results["student_seconds"] = time.perf_counter() - student_start
        return results, {"trainer": trainer, "module": module, "datamodule": datamodule, "teacher": teacher, "run": run}
    except BaseException as e:
        results["status"] = "failed"
        results["error"] = error_record(e)
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


def teacher_origin(teacher: dict[str, Any]) -> str | None:
    """How the run got its teacher, as the summary says it: "trained now", "reused from the store", ..."""
    if teacher.get("source") == "checkpoint":
        return "loaded from teacher.ckpt_path"
    return {True: "reused from the store", False: "trained now"}.get(teacher.get("reused"), teacher.get("source"))


def timing(results: dict[str, Any]) -> str:
    """``time: teacher 85.2s (trained now) | student 7.4s (fit 3.3s) | total 92.6s``: the teacher's training
    (or load) and earlier chain stages apart from the student's own run, so a first run of a sweep, which
    trains the shared teacher, does not look slower than the others."""
    parts = []
    if "chain_seconds" in results:
        parts.append(f"earlier chain stages {results['chain_seconds']:.1f}s")
    if "teacher_seconds" in results:
        teacher = results.get("teacher") or {}
        origin = teacher_origin(teacher)
        if teacher.get("reused") and teacher.get("train_seconds"):
            origin += f", where it took {teacher['train_seconds']:.1f}s to train"
        parts.append(f"teacher {results['teacher_seconds']:.1f}s ({origin})")
    if "student_seconds" in results:
        fit = f" (fit {results['fit_seconds']:.1f}s)" if "fit_seconds" in results else ""
        parts.append(f"student {results['student_seconds']:.1f}s{fit}")
    parts.append(f"total {results['wall_seconds']:.1f}s")
    return "  time: " + " | ".join(parts)


def _epoch(value: Any, of: Any) -> str:
    return f"{value}/{of}" if value is not None and isinstance(of, int) and of > 0 else str(value)


def summary(results: dict[str, Any], path: Path) -> str:
    """A few lines for the terminal: the task's headline metric of the student, and how it relates to the
    teacher (the task's teacher metrics), the other models evaluated with it, the chain's stages and where
    the time went."""
    names = results["names"]
    best, teacher = results["best"], results.get("teacher") or {}
    head = results["task"]["headline"]  # e.g. test/acc
    metric = head.split("/")[-1]
    epochs = ((results.get("config") or {}).get("trainer") or {}).get("max_epochs")
    lines = [
        f"{names.get('algorithm')} ({names.get('scheme')}): {names.get('student')} <- {names.get('teacher', '-')}"
        f" on {names.get('data')}, seed {results['seed']}",
        f"  student test {metric} {best[head]:.4f} at best val epoch {_epoch(best.get('epoch'), epochs)}"
        f" | {results['last'][head]:.4f} at last epoch {_epoch(results['last'].get('epoch'), epochs)}",
    ]
    compared = {k.removeprefix("test/"): v for k, v in best.items() if k.startswith("test/") and k != head}
    if compared:
        shown = " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in compared.items())
        lines.append(f"  vs teacher ({teacher_origin(teacher)}): {shown}")
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
    )
    lines.append(timing(results))
    lines.append(f"  results: {path}")
    return "\n".join(lines)


CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # kd_lab/conf, as kd_lab.run.builders has it


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra's task function: ``run_job``. It only forwards: joblib's workers receive it by value (the module
    attribute ``main`` is Hydra's wrapper, not this function), without the names bound later in this module's
    globals; ``run_job`` is found by reference and runs with them."""
    return run_job(cfg)


def run_job(cfg: DictConfig) -> float | None:
    """One job. A KDLabError is one message on stderr and exit status 1, except in a multirun, which goes on
    and reports its failed jobs at the end (kd_lab/run/outcome.py); SIGINT/SIGTERM exit with 130/143. A
    mistake found before any compute leaves no run directory (``discard_unstarted_run``)."""
    _import_run_modules()
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch 2.13 + Lightning 2.6 noise, every fit
    quiet_lightning_console()
    patch_lightning_hydra_launcher()
    run_dir = cfg.paths.output_dir
    fresh = cfg.get("resume") is None  # a resume's directory is the original run's: never removed
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    with job_scope(), interrupt_handlers():  # one job of a multirun must not leak its DDP state into the next
        try:
            cfg, resume_from = start_or_resume(cfg, list(HydraConfig.get().overrides.task))
            results, _ = train(cfg, resume_from)
        except Exception as e:
            log_name = f"{HydraConfig.get().job.name}.log"  # Hydra's job log in the run dir
            record = discard_unstarted_run(run_dir, e, before=release_run_lock, log_name=log_name) if fresh else None
            if not multirun:
                exit_on_user_error(e, run_dir, discarded=record is not None)
                raise
            if record is not None:  # the sweep report still lists this job (SweepReport reads the record)
                keep_failure_record(HydraConfig.get().sweep.dir, run_dir, record)
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
    if resume is not None:  # kd_lab.run.resume imports torch: only a resume pays for it before Hydra starts
        from kd_lab.run.resume import check_resume_dir, quote_resume_override

        if resume.strip("'\"") not in ("", "null") and "-m" not in sys.argv and "--multirun" not in sys.argv:
            try:  # before Hydra sets up the run directory's log file (a read-only directory fails there, unexplained)
                check_resume_dir(resume.strip("'\""))
            except KDLabError as e:
                print(f"kd-lab: {e}", file=sys.stderr)
                sys.exit(1)
        sys.argv = quote_resume_override(sys.argv)
    main()


if __name__ == "__main__":
    cli()
