"""``kd-lab-bench``: kd-lab's epoch against a hand-written PyTorch loop doing the same work, in one process.

Variants, run interleaved round after round (a, b, c, d, a, b, ...) so that the load of a shared machine falls
on all of them alike; each run's first ``--warmup`` epochs are dropped and the median of the rest is kept:

  a  plain KD loop (``kd_lab.tools.bench_loops``): same models, data tensors, batch size, optimizer, schedule,
     augmentation, validation and checkpoints as the kd-lab run
  b  kd-lab KD through Lightning, built by kd-lab's own builders from the composed config   -> ratio b / a
  c  plain vanilla student loop (no teacher), augmentation off
  d  kd-lab KD with cached teacher outputs (``perf.cache_teacher=true``), augmentation off  -> ratio d / c
  c_kd  plain KD loop reading cached teacher logits, augmentation off: the floor of d with KD's own loss
     math included (log-softmaxes and a KL per step, which c does not pay)                  -> ratio d / c_kd
  e  kd-lab training the vanilla student (algorithm=none), augmentation off: the framework's own cost on
     the smallest step there is                                                              -> ratio e / c
  v  kd-lab training the vanilla student with b's augmentation
  f  kd-lab KD with b's augmentation, its teacher outputs read from a teacher view store
     (``perf.view_store``) that one run filled before the clock started                     -> ratios f / v, f / b

``--cifar`` swaps in CIFAR-shaped synthetic data (3x32x32, 100 classes) with a resnet32x4 teacher and a
resnet8x4 student and reports images per second; it adds ``a_dataloader``, the plain fp32 loop fed by a
per-sample DataLoader (the reference code's way), and runs a and c with kd-lab's precision settings.

    kd-lab-bench --out bench.json                               # CPU, the default MNIST-1D experiment
    kd-lab-bench --cifar --device cuda --out bench-gpu.json     # a GPU
"""

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from kd_lab.run.assemble import build_run, trainer_overrides
from kd_lab.run.builders import CONFIG_DIR, build, build_callbacks, build_datamodule, build_model, build_trainer
from kd_lab.run.loggers import build_loggers, finish_loggers, quiet_lightning_console
from kd_lab.tools.bench_loops import PlainRun, run_epoch
from kd_lab.tools.bench_sources import per_sample_loader

CIFAR = [
    "data=fake",
    "data.input_shape=[3,32,32]",
    "data.num_classes=100",
    "data.batch_size=64",
    "data.eval_batch_size=1000",
    "optim=sgd_multistep",
]
CIFAR_AUGMENT = "data.augment={_target_:kd_lab.data.ImageAugment,padding:4,flip:true}"
NO_AUGMENT = "data.augment=null"


class EpochTimer(L.Callback):
    """Marks each epoch's start, the start of its validation, and the end of training (device synced)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.val_starts: list[float] = []
        self.end = 0.0

    def _now(self, module: L.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, module) -> None:
        self.starts.append(self._now(module))

    def on_validation_epoch_start(self, trainer, module) -> None:
        if not trainer.sanity_checking and len(self.val_starts) < len(self.starts):
            self.val_starts.append(self._now(module))

    def on_train_end(self, trainer, module) -> None:
        self.end = self._now(module)

    def times(self) -> list[dict[str, float]]:
        ends = [*self.starts[1:], self.end]
        vals = self.val_starts + ends[len(self.val_starts) :]  # no validation: the training is the epoch
        return [{"train": v - s, "epoch": e - s} for s, v, e in zip(self.starts, vals, ends, strict=True)]


def compose_config(overrides: list[str], out_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.teacher_store = str(out_dir.parent / "teachers")  # view stores too: in the bench's temp dir
    return cfg


def kdlab_times(
    cfg: DictConfig, teacher: torch.nn.Module, epochs: int, store_stats: dict | None = None
) -> list[dict[str, float]]:
    """One kd-lab fit, built as ``kd-lab`` builds it (the teacher given, not trained by the store).
    ``store_stats``: filled with the view store's epoch counts (read / filled / live), when it has one."""
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg)
    run = build_run(cfg, datamodule)  # as train() builds it; the store's teacher replaced by the given one
    for model in run.teachers:
        model.load_state_dict(teacher.state_dict())
    timer = EpochTimer()
    loggers = build_loggers(cfg.get("logger"))
    callbacks = [*build_callbacks(cfg.get("callbacks")), timer]
    overrides = trainer_overrides(cfg, run.module)  # as train() does
    trainer = build_trainer(cfg.trainer, callbacks, loggers or False, max_epochs=epochs, **overrides)
    try:
        trainer.fit(run.module, datamodule)
    finally:
        finish_loggers(loggers)
    if store_stats is not None and run.step.view_store is not None:
        store_stats.update(run.step.view_store.stats)
    return timer.times()


def plain_times(
    cfg: DictConfig, teacher: torch.nn.Module | None, epochs: int, device: torch.device, ckpt_dir: Path, **extra
) -> list[dict[str, float]]:
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    on_device = {s: {k: t.to(device) for k, t in datamodule.splits[s].items()} for s in ("train", "val")}
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student.model).to(device)
    if teacher is not None:
        teacher = copy.deepcopy(teacher).to(device).eval().requires_grad_(False)
    if extra.pop("cached_logits", False):  # one teacher pass over the training split, before the clock starts
        with torch.no_grad():
            x = on_device["train"]["input"]
            extra["teacher_logits"] = torch.cat([teacher(x[i : i + 1000]) for i in range(0, len(x), 1000)])
        teacher = None
    if extra.get("channels_last"):
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last) if teacher is not None else None
    optimizer = build(cfg.optim.optimizer, _partial_=True)(student.parameters())
    steps = len(on_device["train"]["target"]) // datamodule.batch_size
    scheduler = build(cfg.optim.scheduler, _partial_=True)(optimizer, epochs, steps)
    a = cfg.algorithm
    run = PlainRun(
        student=student,
        optimizer=optimizer,
        scheduler=scheduler,
        train=on_device["train"],
        val=on_device["val"],
        batch_size=datamodule.batch_size,
        eval_batch_size=datamodule.eval_batch_size,
        ckpt_dir=ckpt_dir,
        teacher=teacher,
        kd=(float(a.get("ce_weight", 1.0)), float(a.get("kd_weight", 0.0)), float(a.get("temperature", 1.0))),
        augment=datamodule.augment,
        seed=cfg.seed,
        **extra,
    )
    if extra.get("loader") == "per_sample":
        run.loader = per_sample_loader(run, datamodule, device)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(epochs):
        run_epoch(run)
    return run.times


def variants(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, Any]]:
    """name -> how to run it: ``kind`` (plain / kdlab), config overrides, teacher or not, loop settings."""
    base = [f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", f"logger={args.logger}"]
    if args.cifar:
        base += [*CIFAR, f"teacher={args.teacher}", f"student={args.student}", f"data.num_train={args.num_train}"]
        base += [f"data.num_test={args.num_train // 5}", f"data.val_size={args.num_train // 10}"]
        base += [f"trainer.precision={args.precision}", "trainer.deterministic=false"]
        base += [f"perf.channels_last={str(args.channels_last).lower()}"]
    base += [f"data.batch_size={args.batch_size}"] if args.batch_size else []
    base += args.set
    augment = [CIFAR_AUGMENT] if args.cifar and args.augment else [] if args.augment else [NO_AUGMENT]
    fast = {"autocast": torch.bfloat16 if "bf16" in args.precision else None, "channels_last": args.channels_last}
    found = {
        "a": {"kind": "plain", "overrides": base + augment, "teacher": True, "loop": fast},
        "b": {"kind": "kdlab", "overrides": [*base, *augment, "perf.view_store=false"]},  # a live teacher
        "c": {"kind": "plain", "overrides": [*base, NO_AUGMENT], "teacher": False, "loop": fast},
        "d": {"kind": "kdlab", "overrides": [*base, NO_AUGMENT, "perf.cache_teacher=true"]},
        "e": {"kind": "kdlab", "overrides": [*base, NO_AUGMENT, "algorithm=none"]},
        "v": {"kind": "kdlab", "overrides": [*base, *augment, "algorithm=none"]},
        "f": {"kind": "kdlab", "overrides": [*base, *augment, "perf.view_store=true"], "prefill": True},
        "c_kd": {
            "kind": "plain",
            "overrides": [*base, NO_AUGMENT],
            "teacher": True,
            "loop": {**fast, "cached_logits": True},
        },
    }
    if args.cifar:  # the reference code's loop: fp32, per-sample DataLoader with workers
        found["a_dataloader"] = {
            "kind": "plain",
            "overrides": base + augment,
            "teacher": True,
            "loop": {"loader": "per_sample"},
        }
    return found


def summarize(name: str, times: list[dict[str, float]], images_per_epoch: int) -> dict[str, Any]:
    train, epoch = [t["train"] for t in times], [t["epoch"] for t in times]
    med_train, med_epoch = statistics.median(train), statistics.median(epoch)
    return {
        "train_s": train,
        "epoch_s": epoch,
        "median_train_s": med_train,
        "median_epoch_s": med_epoch,
        "train_images_per_s": images_per_epoch / med_train,
    }


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
        "load_average": os.getloadavg(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kd-lab-bench-") as work:  # checkpoints of every run, then gone
        return _run_bench(args, device, Path(work))


def _run_bench(args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    plan = variants(args, device)
    if args.only:
        plan = {k: v for k, v in plan.items() if k in args.only}
    configs = {name: compose_config(v["overrides"], work / name) for name, v in plan.items()}
    first = next(iter(configs.values()))
    torch.manual_seed(first.teacher.seed)
    teacher = build_model(first.teacher.model)  # untrained: timing does not depend on the weights
    epochs = args.warmup + args.epochs
    times: dict[str, list[dict[str, float]]] = {name: [] for name in plan}
    stats: dict[str, dict] = {}  # view store epochs per kd-lab variant (the last round's)
    for name, v in plan.items():
        if v.get("prefill"):  # one run fills the view store with every epoch the timed runs read
            kdlab_times(configs[name], teacher, epochs)
    load_before = os.getloadavg()
    for round_ in range(args.rounds):
        for name, v in plan.items():
            cfg = configs[name]
            if v["kind"] == "kdlab":
                got = kdlab_times(cfg, teacher, epochs, stats.setdefault(name, {}))
            else:
                t = teacher if v["teacher"] else None
                got = plain_times(cfg, t, epochs, device, work / name / f"round{round_}", **v["loop"])
            times[name] += got[args.warmup :]
            shown = " ".join(f"{x['epoch'] * 1e3:.0f}" for x in got)
            print(f"round {round_ + 1}/{args.rounds} {name}: epochs (ms) {shown}", flush=True)
    datamodule = build_datamodule(first)
    images = datamodule.num_train // datamodule.batch_size * datamodule.batch_size
    results = {name: summarize(name, t, images) for name, t in times.items()}
    for name, counts in stats.items():
        if counts:
            results[name]["view_store"] = counts
    ratios = {}
    for num, den in (
        ("b", "a"),
        ("d", "c"),
        ("d", "c_kd"),
        ("d", "e"),
        ("e", "c"),
        ("b", "a_dataloader"),
        ("f", "v"),
        ("f", "b"),
    ):
        if num in results and den in results:
            for part in ("epoch", "train"):
                ratios[f"{num}/{den} {part}"] = results[num][f"median_{part}_s"] / results[den][f"median_{part}_s"]
    env = environment(device)
    env["load_average_before"] = load_before
    shape = {"batch_size": datamodule.batch_size, "steps_per_epoch": images // datamodule.batch_size}
    return {"args": vars(args), "environment": env, "data": shape, "variants": results, "ratios": ratios}


def table(report: dict[str, Any]) -> str:
    lines = [f"{'variant':<14}{'epoch ms':>10}{'train ms':>10}{'train img/s':>13}{'n':>4}"]
    for name, r in report["variants"].items():
        lines.append(
            f"{name:<14}{r['median_epoch_s'] * 1e3:>10.1f}{r['median_train_s'] * 1e3:>10.1f}"
            f"{r['train_images_per_s']:>13.0f}{len(r['epoch_s']):>4}"
        )
    lines += [f"{name:<14}{value:>10.3f}" for name, value in report["ratios"].items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kd-lab-bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--cifar", action="store_true", help="CIFAR-shaped synthetic data, resnet teacher and student")
    p.add_argument("--teacher", default="resnet32x4", help="--cifar: a conf/teacher option")
    p.add_argument("--student", default="resnet8x4", help="--cifar: a conf/student option")
    p.add_argument("--num-train", type=int, default=50_000, help="--cifar: synthetic training images")
    p.add_argument("--precision", default=None, help="--cifar: trainer.precision (default bf16-mixed on cuda)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True, help="a and b augment")
    p.add_argument("--batch-size", type=int, default=None, help="default: the data config's")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=4, help="measured epochs per run")
    p.add_argument("--warmup", type=int, default=1, help="epochs dropped at the start of every run")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--logger", default="none", help="a conf/logger option (none, csv)")
    p.add_argument("--only", nargs="*", default=None, help="run only these variants (a b c d c_kd e v f a_dataloader)")
    p.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every variant")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    return args


def main(argv: list[str] | None = None) -> None:
    """The console entry (``kd-lab-bench``): prints the table, writes ``--out``."""
    bench(argv)


def bench(argv: list[str] | None = None) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # each round's fit reuses its dir
    quiet_lightning_console()
    logging.getLogger("lightning").setLevel(logging.WARNING)
    args = parse_args(argv)
    report = run_bench(args)
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
