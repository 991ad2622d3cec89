"""The teacher top-k token store of language models: bytes per token, what a sweep saves, and the student's
perplexity against dense teacher logits (docs/lm-topk-store.md).

    python scripts/bench_topk_store.py                       # experiment=lm, 3 epochs, seeds 0 1, k = 8 32 128
    python scripts/bench_topk_store.py --epochs 5 --out DIR  # the LM survey's recipe

Every run is a whole ``train(cfg)`` of ``experiment=lm`` (token_kd, forward KL) on CPU, with its own output
directory under ``--out`` and one shared teacher store, so the teacher is trained once, by the first run.

- ``dense``: perf.view_store=false, the teacher runs live on every batch (the reference).
- ``top<k>``: perf.view_store_topk=k. The first seed fills the store (one teacher pass over the training
  split), every later seed reads it and runs no teacher forward in training.

Printed and written to ``<out>/results.json``: each run's test perplexity and wall time, the store's bytes
per token (measured on its files), and the wall-time ratios fill / read and live / read at k = 8.
"""

import argparse
import json
import os
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import kd_lab
from kd_lab.run.train import train

CONFIG_DIR = str(Path(kd_lab.__file__).parent / "conf")


def run(out: Path, name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=lm", "trainer.accelerator=cpu", "logger=none", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out / "runs" / name)
        cfg.paths.teacher_store = str(out / "teachers")
        cfg.paths.log_dir = str(out / "logs")
    start = time.perf_counter()
    results, objects = train(cfg)
    wall = time.perf_counter() - start
    store = objects["module"].step.teacher_cache
    row = {
        "run": name,
        "overrides": overrides,
        "status": results["status"],
        "test_ppl": results["best"]["test/ppl"],
        "wall_s": round(wall, 2),
        "store": getattr(store, "stats", None),
        "bytes_per_token": getattr(store, "bytes_per_token", None),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--out", type=Path, default=Path("bench_topk_store"))
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    base = [f"trainer.max_epochs={args.epochs}", *args.extra]
    rows = []
    for seed in args.seeds:  # the first dense run also trains the teacher (in the teacher store)
        rows.append(run(args.out, f"dense-s{seed}", [*base, f"seed={seed}", "perf.view_store=false"]))
    for k in args.ks:
        for seed in args.seeds:
            overrides = [*base, f"seed={seed}", "perf.view_store=true", f"perf.view_store_topk={k}"]
            rows.append(run(args.out, f"top{k}-s{seed}", overrides))
    by_name = {r["run"]: r for r in rows}
    dense = {s: by_name[f"dense-s{s}"]["test_ppl"] for s in args.seeds}
    summary = {
        "epochs": args.epochs,
        "seeds": args.seeds,
        "bytes_per_token": {k: by_name[f"top{k}-s{args.seeds[0]}"]["bytes_per_token"] for k in args.ks},
        "ppl_minus_dense": {
            k: {s: by_name[f"top{k}-s{s}"]["test_ppl"] - dense[s] for s in args.seeds} for k in args.ks
        },
    }
    k0 = args.ks[0]
    if len(args.seeds) > 1:  # the same recipe: a run that fills the store against one that reads it
        fill, read = by_name[f"top{k0}-s{args.seeds[0]}"], by_name[f"top{k0}-s{args.seeds[1]}"]
        live = by_name[f"dense-s{args.seeds[1]}"]  # the teacher already stored: a live teacher's cost only
        summary["wall_s"] = {"fill": fill["wall_s"], "read": read["wall_s"], "live_dense": live["wall_s"]}
        summary["ratio_fill_over_read"] = round(fill["wall_s"] / read["wall_s"], 3)
        summary["ratio_live_over_read"] = round(live["wall_s"] / read["wall_s"], 3)
    print(json.dumps(summary, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
