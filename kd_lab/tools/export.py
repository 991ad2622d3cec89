"""``kd-lab-export-exit RUN_DIR --exit exit1``: one exit of a multi-exit (``algorithm=byot``) run as a plain
TorchScript model: the backbone up to that exit and the exit's own head; the other heads are dropped.

    kd-lab-export-exit logs/runs/<run> --exit exit1 --out exit1.pt     # --exit student: the deepest exit
    model = torch.jit.load("exit1.pt"); logits = model(x)
"""

import argparse
import json
import logging
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kd_lab.errors import KDLabError
from kd_lab.run.assemble import build_module, build_step, build_task, perf_plan
from kd_lab.run.builders import build, build_datamodule, build_model
from kd_lab.tools.exits import executed_parameters, export_exit

log = logging.getLogger(__name__)


def load_run(run_dir: Path, which: str = "best"):
    """The run's DistillationModule, rebuilt from its ``results.json`` config, with the ``which`` weights."""
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise KDLabError(f"{results_path} does not exist: give the directory of a finished kd-lab run.")
    results = json.loads(results_path.read_text())
    cfg = OmegaConf.create(results["config"])
    ckpt = run_dir / "checkpoints" / f"{which}.ckpt"
    if not ckpt.is_file():
        raise KDLabError(f"{ckpt} does not exist; the run's checkpoints are {sorted(ckpt.parent.glob('*.ckpt'))}.")
    datamodule = build_datamodule(cfg)
    plan = perf_plan(cfg)
    step = build_step(
        datamodule, build_model(cfg.student.model), build(cfg.algorithm), build(cfg.scheme), build_task(cfg), [], plan
    )
    module = build_module(cfg, step, cfg.optim, plan)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict({k: v for k, v in state.items() if not k.startswith("teachers.")})
    return module, datamodule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kd-lab-export-exit", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--exit", default="student", help="exit1, exit2, ... or student (the deepest)")
    parser.add_argument("--weights", default="best", choices=["best", "last"])
    parser.add_argument("--out", type=Path, help="default: <run_dir>/<exit>.pt")
    args = parser.parse_args(argv)
    module, datamodule = load_run(args.run_dir, args.weights)
    if not hasattr(module.algorithm, "heads") and args.exit != "student":
        raise SystemExit(f"{args.run_dir} is not a multi-exit run (algorithm={module.algorithm.name}).")
    model = (
        export_exit(module.student, module.algorithm, args.exit)
        if hasattr(module.algorithm, "heads")
        else (module.student.eval())
    )
    example = datamodule.example_input(module.input_key)
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, but torch.export cannot trace
        warnings.simplefilter("ignore")  # the early-exit hook yet; a traced model still loads without kd-lab
        traced = torch.jit.trace(model, example)
    out = args.out or args.run_dir / f"{args.exit}.pt"
    traced.save(str(out))
    print(f"{args.exit} of {args.run_dir} -> {out} ({executed_parameters(model, example[:1]):,} parameters used)")


if __name__ == "__main__":
    main()
