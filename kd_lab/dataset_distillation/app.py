"""``kd-lab-distill-data``: learn a synthetic set, then train models from scratch on it and on baselines.

``run(cfg)`` is a plain function (tests call it). It checks the config and the data before any compute,
synthesizes, saves the set (``synthetic_set.safetensors``, atomic), evaluates and writes ``results.json``.
The recorded config leaves out ``paths`` and ``data.data_dir``: a results file meant for the repository must
not name directories of the machine it ran on.
"""

import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import kd_lab  # noqa: F401  (registers the resolvers conf/dataset_distillation.yaml uses)
from kd_lab.dataset_distillation.evaluate import evaluate_set
from kd_lab.dataset_distillation.synthesis import DEFAULT_LR, METHODS, gm_loops, initial_set, synthesize
from kd_lab.errors import KDLabError
from kd_lab.run.builders import build
from kd_lab.run.threads import apply_threads
from kd_lab.utils.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
SET_FILE = "synthetic_set.safetensors"


def _int_at_least(cfg: DictConfig, key: str, low: int, example: int, allow_null: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_null:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise KDLabError(f"{key}={value!r} is out of range: it must be an integer >= {low}; set e.g. {key}={example}.")


def check_config(cfg: DictConfig) -> None:
    """Every value the synthesis reads, before data is loaded or anything is computed."""
    if cfg.method not in METHODS:
        raise KDLabError(
            f"method={cfg.method!r} is not a dataset distillation method; set method=gm (gradient matching) "
            "or method=dm (distribution matching)."
        )
    _int_at_least(cfg, "ipc", 1, 10)
    counts = {"iterations": 100, "batch_real": 256, "eval.steps": 300, "eval.full_steps": 2000, "eval.batch_size": 256}
    for key, example in counts.items():
        _int_at_least(cfg, key, 1, example)
    _int_at_least(cfg, "log_every", 0, 10)
    for key in ("gm.outer_loop", "gm.inner_loop"):
        _int_at_least(cfg, key, 1, 10, allow_null=True)
    for key, example in (("lr", DEFAULT_LR[cfg.method]), ("gm.net_lr", 0.01), ("eval.lr", 0.01)):
        value = OmegaConf.select(cfg, key)
        if value is None and key == "lr":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
            raise KDLabError(f"{key}={value!r} is out of range: it must be > 0 and finite; set e.g. {key}={example}.")
    for key in ("momentum", "eval.momentum"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise KDLabError(f"{key}={value!r} is out of range: it must be in [0, 1); set e.g. {key}=0.5.")
    value = cfg.eval.weight_decay
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value >= 0):
        raise KDLabError(
            f"eval.weight_decay={value!r} is out of range: it must be >= 0; set e.g. eval.weight_decay=5e-4."
        )


def check_data(cfg: DictConfig, y: torch.Tensor, num_classes: int) -> None:
    """Each class must hold ``ipc`` real examples: the synthetic set starts from them."""
    counts = torch.bincount(y, minlength=num_classes)
    smallest = int(counts.min())
    if cfg.ipc > smallest:
        c = int(counts.argmin())
        raise KDLabError(
            f"ipc={cfg.ipc} asks for {cfg.ipc} real examples per class to start the synthetic set from, but class "
            f"{c} has only {smallest} in the training split of data={cfg.data.name}; set ipc to at most {smallest}."
        )


def check_model(cfg: DictConfig, model: torch.nn.Module, example: torch.Tensor, num_classes: int) -> None:
    """The model must classify the data, and for dm it must name its embedding layer."""
    name = type(model).__name__
    if cfg.method == "dm":
        tap = getattr(model, "embedding_tap", None)
        try:
            model.get_submodule(tap) if isinstance(tap, str) else None
        except AttributeError:
            tap = None
        if not isinstance(tap, str):
            raise KDLabError(
                f"method=dm embeds with the model's penultimate layer, but the student ({name}) declares no "
                "embedding_tap (a module path, as kd_lab.models.CNN1d and MLP have); pick such a student "
                "(student=cnn1d_small, mlp_small, ...), or use method=gm, which needs none."
            )
    with torch.no_grad():
        out = model.eval()(example)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(example), num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise KDLabError(
            f"the student ({name}) outputs {shape} for {len(example)} inputs, but the synthesis needs logits of "
            f"shape ({len(example)}, {num_classes}); set student.model.num_classes={num_classes} (or pick a "
            "classifier from conf/student)."
        )


def recorded_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the machine's paths."""
    out = OmegaConf.to_container(cfg, resolve=False)
    out.pop("paths", None)
    out.get("data", {}).pop("data_dir", None)
    return OmegaConf.to_container(OmegaConf.create(out), resolve=True)


def save_set(x: torch.Tensor, y: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(save({"x": x.contiguous(), "y": y.contiguous()}, metadata=metadata), path)


def load_set(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A saved synthetic set: inputs ``x`` and labels ``y``."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return tensors["x"], tensors["y"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Synthesize, save, evaluate; returns what results.json holds."""
    start = time.perf_counter()
    check_config(cfg)
    apply_threads(cfg.get("threads"))
    out_dir = Path(cfg.paths.output_dir)
    datamodule = build(cfg.data)  # as kd-lab builds it: the same splits
    datamodule.setup()
    train, test = datamodule.splits["train"], datamodule.splits["test"]
    x, y = train["input"], train["target"]
    num_classes = datamodule.num_classes
    check_data(cfg, y, num_classes)

    def make_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build(cfg.student.model)  # as kd-lab builds a student

    probe = make_model(cfg.seed)
    check_model(cfg, probe, x[:2], num_classes)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    default_loops = gm_loops(cfg.ipc)
    loops = (cfg.gm.outer_loop or default_loops[0], cfg.gm.inner_loop or default_loops[1])
    log.info("%s: ipc %d, %d iterations, lr %g, on %d real examples", cfg.method, cfg.ipc, cfg.iterations, lr, len(y))
    result = synthesize(
        cfg.method, x, y, num_classes, cfg.ipc, make_model, cfg.iterations, lr, cfg.momentum, cfg.seed,
        cfg.batch_real, cfg.gm.net_lr, loops, cfg.log_every,
    )  # fmt: skip
    if not torch.isfinite(result.x).all():
        raise KDLabError(
            f"the synthetic set became NaN or Inf during {cfg.method} synthesis (lr {lr}): "
            f"lower lr (e.g. lr={lr / 10:g})."
        )
    meta = {"method": cfg.method, "ipc": str(cfg.ipc), "seed": str(cfg.seed), "data": str(cfg.data.name)}
    save_set(result.x, result.y, out_dir / SET_FILE, meta)

    recipe = {k: cfg.eval[k] for k in ("steps", "lr", "momentum", "weight_decay", "batch_size")}
    x_test, y_test = test["input"], test["target"]
    eval_seed = cfg.seed + 1_000_000  # another init than any synthesis network
    results: dict[str, Any] = {
        "status": "finished",
        "method": cfg.method,
        "ipc": cfg.ipc,
        "seed": cfg.seed,
        "data": cfg.data.name,
        "model": cfg.student.name,
        "params": sum(p.numel() for p in probe.parameters()),
        "config": recorded_config(cfg),
        "synthesis": {
            "seconds": result.seconds,
            "iterations": cfg.iterations,
            "lr": lr,
            "loops": list(loops) if cfg.method == "gm" else None,
            "first_loss": result.losses[0],
            "last_loss": result.losses[-1],
        },
        "set_file": SET_FILE,
        "synthetic": evaluate_set(make_model, eval_seed, result.x, result.y, x_test, y_test, **recipe),
    }
    if cfg.eval.random_real:
        # the synthetic set's own starting examples (the same seed draws them): only the learning differs
        x_real, y_real = initial_set(x, y, num_classes, cfg.ipc, torch.Generator().manual_seed(cfg.seed))
        results["random_real"] = evaluate_set(make_model, eval_seed, x_real, y_real, x_test, y_test, **recipe)
    if cfg.eval.full:
        full_recipe = {**recipe, "steps": cfg.eval.full_steps}  # a larger set takes more steps to converge
        results["full"] = evaluate_set(make_model, eval_seed, x, y, x_test, y_test, **full_recipe)
    results["wall_seconds"] = time.perf_counter() - start
    results["versions"] = {"torch": torch.__version__}
    atomic_write_json(results, out_dir / "results.json")
    log.info("%s", summary(results))
    return results


def summary(results: dict[str, Any]) -> str:
    parts = [f"synthetic {results['synthetic']['acc']:.4f}"]
    parts += [f"{k.replace('_', ' ')} {results[k]['acc']:.4f}" for k in ("random_real", "full") if k in results]
    return (
        f"{results['method']} ipc {results['ipc']} seed {results['seed']} ({results['model']} on {results['data']}): "
        f"test acc {' | '.join(parts)}; synthesis {results['synthesis']['seconds']:.1f}s"
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="dataset_distillation")
def main(cfg: DictConfig) -> None:
    """The ``kd-lab-distill-data`` command: a KDLabError is one line on stderr and exit status 1."""
    try:
        run(cfg)
    except KDLabError as e:
        print(f"kd-lab-distill-data: {e}", file=sys.stderr)
        discard_unstarted(Path(cfg.paths.output_dir))
        sys.exit(1)


def discard_unstarted(run_dir: Path) -> None:
    """Remove a run directory that holds only Hydra's files and the log: a mistake found before any compute
    leaves no run behind (as kd-lab's runs, docs/errors.md). Any other file keeps it."""
    entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
    if all(p.name == ".hydra" or p.suffix == ".log" for p in entries):
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
