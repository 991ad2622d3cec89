"""Chains of distillation stages: teacher-assistant and born-again generations.

A chain is a config group of its own (``conf/chain``): it says which earlier stages teach the run, and the
run's algorithm is the method of every stage.

* ``chain=teacher_assistant`` (Mirzadeh et al., AAAI 2020, "Improved Knowledge Distillation via Teacher
  Assistant", https://arxiv.org/abs/1902.03393): teacher -> assistant(s) -> student, largest first. The
  paper's point: a mid-sized assistant bridges a capacity gap that plain KD handles badly.
* ``chain=born_again`` (Furlanello et al., ICML 2018, "Born-Again Neural Networks",
  https://arxiv.org/abs/1805.04770): generation 0 is the student's architecture trained on the labels;
  generation k teaches generation k + 1 of the same architecture.
* ``chain=tinybert`` (``carry: student``, Jiao et al. 2020, https://arxiv.org/abs/1909.10351): the teacher
  stays; each stage's student starts the next stage, and ``chain.stages`` / ``chain.last`` set the algorithm
  of each stage (TinyBERT: intermediate layers, then predictions). See ``_student_stages``.

Each stage is a complete kd-lab run (``train``, handed in by the caller) of the run's algorithm, whose
student, at its best-validation weights, becomes the next stage's frozen teacher. The last stage is the run
itself. Finished stages are cached in the teacher store under a key that chains the keys of the stages before
it, so a second run reuses them and an interrupted chain resumes at the first unfinished stage. Every stage
uses the run's seed, optimizer and epochs."""

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lab.errors import KDLabError
from kd_lab.run.builders import group_option, replace_nodes, to_dict
from kd_lab.run.ddp import global_rank
from kd_lab.run.teacher_store import cached_entry, headline, learning_context, short_hash, teacher_key
from kd_lab.utils.io import atomic_torch_save

log = logging.getLogger(__name__)


def is_chain(cfg: DictConfig) -> bool:
    return bool(cfg.get("chain"))


def _with_algorithm(cfg: DictConfig, name: str | None) -> DictConfig:
    """``cfg`` with the algorithm replaced by ``conf/algorithm/<name>.yaml`` (None: the run's own)."""
    return cfg if name is None else group_option(cfg, "algorithm", name, "algorithm")


def _as_teacher(cfg: DictConfig, student: DictConfig, ckpt_path: str) -> DictConfig:
    """The teacher node that loads a finished stage: its student's architecture and weights."""
    base = {k: v for k, v in to_dict(cfg.teacher).items() if k not in ("name", "model", "ckpt_path")}
    node = OmegaConf.merge(base, {"name": student.name, "ckpt_path": ckpt_path})
    with open_dict(node):
        node.model = student.model  # kept unresolved: interpolations resolve against the whole config
    return node


def plan(cfg: DictConfig) -> list[tuple[str, DictConfig, str | None]]:
    """``(name, student, algorithm option or None for the run's own)`` of every stage before the run's own."""
    c = cfg.chain
    if c.get("assistants") is not None:
        if not c.assistants:
            raise KDLabError("chain.assistants is empty: name at least one student config, e.g. [cnn1d_small].")
        return [
            (f"assistant{i + 1}-{name}", group_option(cfg, "student", name, "student").student, None)
            for i, name in enumerate(c.assistants)
        ]
    generations = int(c.get("generations", 0))
    if generations < 1:
        raise KDLabError(f"chain.generations={generations}: born-again needs at least 1 generation after gen0.")
    return [(f"gen0-{cfg.student.name}", cfg.student, "none")] + [
        (f"gen{k}-{cfg.student.name}", cfg.student, None) for k in range(1, generations)
    ]


def stage_key(parent: str, stage: DictConfig) -> str:
    spec = {
        "parent": parent,
        "student": to_dict(stage.student.model),
        "algorithm": to_dict(stage.algorithm),
        "optim": to_dict(stage.optim),
        "max_epochs": stage.trainer.max_epochs,
        "seed": stage.seed,
        **learning_context(stage),
    }
    return short_hash(spec)


def resolve_chain(
    cfg: DictConfig, datamodule, train: Callable[[DictConfig], tuple[dict, dict]]
) -> tuple[DictConfig, list[dict[str, Any]]]:
    """Train or reuse every stage before the run's own with ``train`` (a whole run per stage); return the run's
    config (its teacher is the last stage) and what each stage scored."""
    if cfg.scheme.name != "offline":
        raise KDLabError(
            f"chain={cfg.chain.name} needs scheme=offline: each stage's student becomes the next stage's frozen "
            f"teacher; drop scheme={cfg.scheme.name}."
        )

    if datamodule.teacher_input_key != "input":
        raise KDLabError(
            f"chain={cfg.chain.name} chains models that read the same input; paired "
            "(cross-modal) data has two. Use a single-modality data config."
        )
    if cfg.chain.get("carry") == "student":  # TinyBERT: the teacher stays, the student passes on
        return _student_stages(cfg, train)
    stages = plan(cfg)
    if cfg.chain.get("assistants") is not None:
        teacher = cfg.teacher
        parent = teacher.ckpt_path if teacher.get("ckpt_path") else teacher_key(cfg)
    else:
        teacher, parent = None, "born-again"
    infos = []
    store = Path(cfg.paths.teacher_store)
    for name, student, algorithm in stages:
        # a stage starts fresh: the run's own ckpt_path (a checkpoint of the run) is not the stage's
        stage = replace_nodes(
            _with_algorithm(cfg, algorithm), student=student, teacher=teacher, logger=None, ckpt_path=None, chain=None
        )
        key = stage_key(parent, stage)
        entry = store / f"{cfg.chain.name}-{name}-{key}"

        def run_stage(staging: Path, stage: DictConfig = stage, name: str = name) -> dict[str, Any]:
            log.info("Chain stage %s: training it (%s)", name, stage.algorithm.name)
            with open_dict(stage):
                stage.paths.output_dir = str(staging)
            results, objs = train(stage)
            if global_rank() == 0:  # one writer; the store renames the entry into place, then all ranks go on
                atomic_torch_save(objs["module"].student.state_dict(), staging / "teacher.pt")
                shutil.rmtree(staging / "checkpoints", ignore_errors=True)  # the weights above are what is kept
            return {"metrics": results["best"], "last": results["last"], "stage": name, "seed": results["seed"]}

        meta, reused = cached_entry(entry, run_stage)
        if reused:
            log.info("Chain stage %s: reusing %s (%s)", name, entry, headline(meta["metrics"]))
        infos.append({"stage": name, "reused": reused, "path": str(entry), "key": key, **meta})
        teacher, parent = _as_teacher(cfg, student, str(entry / "teacher.pt")), key
    return replace_nodes(cfg, teacher=teacher), infos


def _student_stages(
    cfg: DictConfig, train: Callable[[DictConfig], tuple[dict, dict]]
) -> tuple[DictConfig, list[dict[str, Any]]]:
    """A chain whose stages distil the run's teacher into one student (``carry: student``, TinyBERT's two
    stages): ``chain.stages`` are the algorithm settings of each earlier stage, ``chain.last`` those of the
    run. Each stage starts from the student the stage before it saved (``save_pretrained``, loaded through
    ``student.model.pretrained``), so only Hugging Face students carry."""
    c = cfg.chain
    settings = [to_dict(s) for s in c.get("stages") or []] + [to_dict(c.get("last") or {})]
    if len(settings) < 2:
        raise KDLabError(f"chain={c.name}: chain.stages is empty; list the algorithm settings of each earlier stage.")
    unknown = sorted({k for s in settings for k in s if k not in cfg.algorithm})
    if unknown:
        raise KDLabError(
            f"chain={c.name} sets algorithm.{unknown[0]} in its stages, which algorithm={cfg.algorithm.name} does "
            f"not have: use the algorithm the chain is made for (e.g. chain=tinybert with algorithm=tinybert)."
        )
    if "pretrained" not in cfg.student.model:
        raise KDLabError(
            f"chain={c.name} carries the student's weights from stage to stage with save_pretrained, but "
            f"student={cfg.student.name} is not a Hugging Face model (no student.model.pretrained): use one from "
            "kd_lab.models.hf (e.g. student=gpt2_student)."
        )
    parent = cfg.teacher.ckpt_path if cfg.teacher.get("ckpt_path") else teacher_key(cfg)
    student, infos = cfg.student, []
    for i, overrides in enumerate(settings[:-1], start=1):
        name = f"stage{i}-{cfg.student.name}"
        algorithm = OmegaConf.merge(cfg.algorithm, overrides)
        stage = replace_nodes(cfg, algorithm=algorithm, student=student, logger=None, ckpt_path=None, chain=None)
        key = stage_key(parent, stage)
        entry = Path(cfg.paths.teacher_store) / f"{c.name}-{name}-{key}"

        def run_stage(staging: Path, stage: DictConfig = stage, name: str = name, sets: dict = overrides) -> dict:
            log.info("Chain stage %s: training it (%s %s)", name, stage.algorithm.name, sets)
            with open_dict(stage):
                stage.paths.output_dir = str(staging)
            results, objs = train(stage)
            student = objs["module"].student
            # The stage's last weights, not its best-validation ones: an intermediate stage does not train the
            # predictions, so the run's monitored metric does not measure what it distils (TinyBERT carries the
            # end of stage 1). Without a checkpoint (fast_dev_run) the module holds the last weights already.
            last = staging / "checkpoints" / "last.ckpt"
            if last.is_file():
                state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
                own = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
                student.load_state_dict(own)
            if global_rank() == 0:  # the next stage loads student/ as its student; the store checks teacher.pt
                student.save_pretrained(staging / "student")
                atomic_torch_save(student.state_dict(), staging / "teacher.pt")
                shutil.rmtree(staging / "checkpoints", ignore_errors=True)
            return {"metrics": results["best"], "last": results["last"], "stage": name, "seed": results["seed"]}

        meta, reused = cached_entry(entry, run_stage)
        if reused:
            log.info("Chain stage %s: reusing %s (%s)", name, entry, headline(meta["metrics"]))
        infos.append({"stage": name, "reused": reused, "path": str(entry), "key": key, **meta})
        student = OmegaConf.merge(student, {"model": {"pretrained": str(entry / "student")}})
        parent = key
    return replace_nodes(cfg, algorithm=OmegaConf.merge(cfg.algorithm, settings[-1]), student=student), infos
