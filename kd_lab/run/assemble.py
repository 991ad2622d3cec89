"""``build_run(cfg)``: the one place that assembles a run from its config.

data -> teachers (untrained: the store fills their weights later) -> student -> algorithm -> scheme -> task
-> ``DistillationStep`` (the build-time checks) -> ``DistillationModule``, with the ``perf`` settings handed in
as one frozen ``PerfPlan``. Nothing is changed on an object after it is built. The run that trains is this
build: its teachers receive their trained weights (``kd_lab.run.teacher_store.fill_teachers``) in place.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from kd_lab.algorithms.base import Algorithm
from kd_lab.core.step import DistillationStep
from kd_lab.core.tasks.base import Task
from kd_lab.data.base import TensorDataModule
from kd_lab.errors import KDLabError
from kd_lab.run.builders import build, build_model, config_hash, group_option
from kd_lab.run.checkpoints import load_weights
from kd_lab.run.module import DistillationModule
from kd_lab.run.perf import PerfPlan
from kd_lab.run.teacher_cache import TeacherCache, check_cacheable
from kd_lab.run.view_store import ViewStore, describe, refusal, tensor_digest, token_store_for
from kd_lab.schemes.base import Scheme

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """A built run: every object ``train`` needs, built once."""

    datamodule: TensorDataModule
    teachers: list[nn.Module]
    student: nn.Module
    algorithm: Algorithm
    scheme: Scheme
    task: Task
    step: DistillationStep
    module: DistillationModule
    plan: PerfPlan


def perf_plan(cfg: DictConfig) -> PerfPlan:
    return build(cfg.perf) if cfg.get("perf") else PerfPlan()


def build_task(cfg: DictConfig) -> Task:
    if not cfg.get("task"):
        raise KDLabError("the config has no task: add `task: classification` to the defaults (conf/task).")
    return build(cfg.task)


def build_run(cfg: DictConfig, datamodule: TensorDataModule, scheme: Scheme | None = None) -> Run:
    """The run of ``cfg`` on ``datamodule``; teachers from the store are built untrained."""
    scheme = scheme or build(cfg.scheme)
    # Store teachers are built untrained here; their weights come from the store, a checkpoint, or training
    # from initial weights drawn from teacher.seed (kd_lab.run.teacher_store.train_teacher), never this run's seed.
    teachers = fresh_teachers(cfg) if scheme.teacher_source == "fresh" else store_teachers(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the student's init, whatever came before
    student = build_model(cfg.student.model)
    if cfg.get("quantize"):  # quantize=uniform: quantized weights in every forward (kd_lab/models/quantized.py)
        student = build(cfg.quantize).apply(student, f"student={cfg.student.name}")
    algorithm = build(cfg.algorithm)
    plan = perf_plan(cfg)
    views = Path(cfg.paths.teacher_store) / "views" if cfg.get("paths") and cfg.paths.get("teacher_store") else None
    step = build_step(datamodule, student, algorithm, scheme, build_task(cfg), teachers, plan, view_root=views)
    module = build_module(cfg, step, cfg.optim, plan)
    return Run(datamodule, teachers, student, algorithm, scheme, step.task, step, module, plan)


def build_step(
    datamodule: TensorDataModule,
    student: nn.Module,
    algorithm: Algorithm,
    scheme: Scheme,
    task: Task,
    teachers: list[nn.Module],
    plan: PerfPlan,
    trains_a_teacher: bool = False,
    view_root: Path | None = None,
) -> DistillationStep:
    """``trains_a_teacher``: the model being trained is a teacher, so it reads the teacher's modality.
    ``view_root``: where teacher view stores live (``perf.view_store``); None: no store."""
    datamodule.setup()  # loads and checks the data once (a no-op when loaded)
    for model in (student, *teachers):  # a graph model takes its graph from the data (kd_lab/models/gnn.py)
        if hasattr(model, "bind_data"):
            model.bind_data(datamodule)
    if hasattr(algorithm, "bind_data"):  # sequence-level KD takes its prompts from the training blocks
        algorithm.bind_data(datamodule)
    student_key = datamodule.teacher_input_key if trains_a_teacher else "input"
    cache = None
    if plan.cache_teacher and teachers and algorithm.needs_teacher:
        if algorithm.synthesizes_inputs:
            raise KDLabError(
                f"perf.cache_teacher=true caches the teacher on the training data, but algorithm={algorithm.name} "
                "trains on synthetic inputs; set perf.cache_teacher=false."
            )
        check_cacheable(datamodule, scheme.trains_teacher)
        inputs = datamodule.splits["train"][datamodule.teacher_input_key]
        cache = TeacherCache(inputs, datamodule.eval_batch_size)
    models = [student, *teachers]
    if plan.channels_last:
        for model in models:
            model.to(memory_format=torch.channels_last)
    step = DistillationStep(
        student=student,
        algorithm=algorithm,
        scheme=scheme,
        task=task,
        example_input=datamodule.example_input(student_key),
        teachers=teachers,
        teacher_example_input=datamodule.example_input(datamodule.teacher_input_key),
        input_key=student_key,
        teacher_input_key=datamodule.teacher_input_key,
        num_train=datamodule.num_train,
        train_targets=datamodule.train_targets,
        plan=plan.step_plan,
        teacher_cache=cache,
        datamodule=datamodule,
    )
    if view_root is not None and plan.view_store:
        # causal LM top-k: one store per sample, read like the teacher cache (docs/lm-topk-store.md)
        token_store = token_store_for(step, datamodule, scheme, plan, view_root)
        if token_store is not None:
            step.teacher_cache = token_store
        else:
            step.view_store = view_store_for(step, datamodule, scheme, plan, view_root)
    if plan.compile:  # after the probes: compiling is lazy, the first training step pays for it
        for model in models:
            model.compile(backend=plan.compile_backend)
    return step


def view_store_for(step: DistillationStep, datamodule, scheme: Scheme, plan: PerfPlan, root: Path) -> ViewStore | None:
    """The run's teacher view store, or None (and why, in one log line) where it cannot be exact."""
    reason = refusal(datamodule, scheme, step.algorithm, step.teachers, plan.cache_teacher)
    if reason is not None:
        if plan.view_store is True:
            raise KDLabError(f"perf.view_store=true, but {reason}; set perf.view_store=auto or false.")
        if step.teachers and step.algorithm.needs_teacher:
            log.info("teacher view store off: %s.", reason)
        return None
    k = plan.view_store_topk
    per_logit = 4 if k is None else 0
    sample_bytes = 0
    for logits, features in zip(step.teacher_logit_shapes, step.teacher_feature_shapes, strict=True):
        sample_bytes += logits[1:].numel() * per_logit + (0 if k is None else k * 4 + 4)
        sample_bytes += sum(shape[1:].numel() * 4 for shape in features.values())
    fixed_key = {
        "data": {
            "type": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            "batch_size": datamodule.batch_size,
            "seed": datamodule.seed,
            "augment": describe(datamodule.augment),
            "train": tensor_digest(datamodule.splits["train"]),
        },
        "batch_size": datamodule.batch_size,
        "taps": [list(r.paths) for r in step.teacher_recorders],
        "format": "dense" if k is None else f"top{k}",
        "channels_last": plan.channels_last,
        "teacher_inputs": step.teacher_input_key,
    }
    return ViewStore(root, fixed_key, step.teachers, k, sample_bytes, plan.view_store_max_mb, plan.view_store is True)


def build_module(
    cfg: DictConfig, step: DistillationStep, optim_cfg: DictConfig, plan: PerfPlan, role: str = "student"
) -> DistillationModule:
    """``role``: which model the module trains, for messages (``teacher``: the teacher store trains it)."""
    clip = None
    if step.algorithm.adversary() is not None and cfg.trainer.get("gradient_clip_val"):
        # Lightning refuses trainer.gradient_clip_val when the module steps its optimizers itself
        clip = (float(cfg.trainer.gradient_clip_val), cfg.trainer.get("gradient_clip_algorithm") or "norm")
    return DistillationModule(
        step,
        optimizer=build(optim_cfg.optimizer, _partial_=True),
        scheduler=build(optim_cfg.scheduler, _partial_=True) if optim_cfg.get("scheduler") else None,
        config_hash=config_hash(cfg),
        check_finite_every=plan.check_finite_every,
        gradient_clip=clip,
        role=role,
    )


def trainer_overrides(cfg: DictConfig, module: DistillationModule) -> dict[str, Any]:
    """What the Trainer of ``module`` needs beyond ``cfg.trainer``."""
    overrides: dict[str, Any] = {}
    if module.adversary is not None:
        overrides.update(gradient_clip_val=None, gradient_clip_algorithm=None)  # the module clips (build_module)
        if cfg.trainer.get("strategy") == "ddp":
            overrides["strategy"] = "ddp_find_unused_parameters_true"  # each backward touches one player only
    return overrides


def store_teachers(cfg: DictConfig) -> list[nn.Module]:
    """The run's teacher and the algorithm's extra teachers, untrained (``fill_teachers`` gives them weights)."""
    if not cfg.get("teacher"):
        return []
    teachers = [build_model(cfg.teacher.model)]
    for name in cfg.algorithm.get("extra_teachers") or []:
        teachers.append(build_model(extra_teacher_cfg(cfg, name).teacher.model))
    return teachers


def extra_teacher_cfg(cfg: DictConfig, name: str) -> DictConfig:
    """``cfg`` with ``conf/teacher/<name>.yaml`` as its teacher (the run's teacher recipe kept)."""
    return group_option(cfg, "teacher", name, "teacher", keep=("optim",))


def fresh_teachers(cfg: DictConfig) -> list[nn.Module]:
    """Teachers that learn in the run: the teacher config, or a cohort's peers (``algorithm.peers`` - 1 models
    from ``algorithm.peer_models``, student configs, by default copies of the student's architecture). Each
    gets its own seed, so peers of one architecture start from different weights."""
    teachers = []
    for k, spec in enumerate(fresh_teacher_specs(cfg), start=1):
        torch.manual_seed(cfg.seed + 100_003 * k)  # not the student's init stream
        teacher = build_model(spec.model)
        if spec.get("ckpt_path"):  # a warm start for an online teacher
            load_weights(teacher, spec.ckpt_path, "teacher")
        teachers.append(teacher)
    return teachers


def fresh_teacher_specs(cfg: DictConfig) -> list[DictConfig]:
    peers = cfg.algorithm.get("peers")
    if peers is None:
        return [cfg.teacher]
    names = list(cfg.algorithm.get("peer_models") or [cfg.student.name] * (peers - 1))
    if len(names) != peers - 1:
        raise KDLabError(
            f"algorithm.peer_models names {len(names)} models for algorithm.peers={peers}: give peers - 1 "
            "student configs (the student is peer 0), or leave it empty for copies of the student."
        )
    return [cfg.student if n == cfg.student.name else group_option(cfg, "student", n, "student").student for n in names]
