"""``kd-lab-pareto <sweep dir>``: the Pareto front of a student search (``hparams_search=student_nas``).

Each finished trial is a point: its best validation accuracy against its parameter count, and against its
batch-1 forward time. A trial is Pareto-optimal when no other trial is at least as accurate and at least as
small (or fast), and better in one of them. Validation accuracy decides the front, as it decided the search;
test accuracy is only reported. Failed trials (a budget refusal, an error) are listed under the table.
"""

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd_lab.run.outcome import RECORDS_DIR

SCALARS = ("depth", "width", "kernel_size", "widen")  # student.model keys of conf/student/cnn1d_search.yaml


def pareto_mask(points: Sequence[Sequence[float]], senses: Sequence[str]) -> list[bool]:
    """For each point, whether no other point dominates it. ``senses``: ``"max"`` or ``"min"`` per axis.

    ``a`` dominates ``b`` when ``a`` is as good on every axis and better on one. Equal points do not
    dominate each other: both stay on the front."""
    if any(s not in ("max", "min") for s in senses):
        raise ValueError(f"senses must be 'max' or 'min', not {list(senses)}")
    signs = [1.0 if s == "max" else -1.0 for s in senses]
    scored = [[sign * v for sign, v in zip(signs, p, strict=True)] for p in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))

    return [not any(dominates(other, p) for other in scored if other is not p) for p in scored]


def _trial(name: str, results: dict[str, Any]) -> dict[str, Any]:
    model = ((results.get("config") or {}).get("student") or {}).get("model") or {}
    best = results.get("best") or {}
    task = results.get("task") or {}
    latency = results.get("latency") or {}
    return {
        "trial": name,
        **{k: model.get(k) for k in SCALARS},
        "params": (results.get("params") or {}).get("student"),
        "latency_b1_ms": latency.get("batch_1_ms"),
        "latency_b256_ms": latency.get("batch_256_ms"),
        "val": best.get(task.get("monitor", "val/acc")),
        "test": best.get(task.get("headline", "test/acc")),
    }


def _error(results: dict[str, Any]) -> str:
    """The reason a trial failed. A model's KDLabError reaches results.json wrapped in Hydra's
    InstantiationException, whose first line names only the target: the KDLabError's own message is shown."""
    text = str(results.get("error") or results.get("status") or "no status")
    inner = re.search(r"KDLabError\((['\"])(.*)\1\)", text, flags=re.DOTALL)
    return f"KDLabError: {inner.group(2)}" if inner else text.splitlines()[0]


def _label(name: str, results: dict[str, Any]) -> str:
    """``trial_2 (depth=3, width=32, kernel_size=5, widen=1.5)``: which architecture failed."""
    model = ((results.get("config") or {}).get("student") or {}).get("model") or {}
    shown = ", ".join(f"{k}={model[k]}" for k in SCALARS if k in model)
    return f"{name} ({shown})" if shown else name


def load_trials(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The finished trials under ``sweep_dir`` and ``(trial, reason)`` for the others: failed, unfinished,
    or refused before compute (``.failed_before_compute/``, where kd-lab keeps the record of a trial whose
    directory it removed). Names are relative to the sweep directory, so no machine path is printed."""
    root = Path(sweep_dir)
    trials, failed = [], []
    for path in sorted(root.rglob("results.json")):
        name = str(path.parent.relative_to(root))
        results = json.loads(path.read_text())
        if results.get("status") != "finished":
            failed.append((_label(name, results), _error(results)))
            continue
        trial = _trial(name, results)
        if trial["val"] is None:
            reason = "finished without a validation metric (fast_dev_run or no checkpoint)"
            failed.append((_label(name, results), reason))
        else:
            trials.append(trial)
    for record in sorted((root / RECORDS_DIR).glob("*.json")):
        results = json.loads(record.read_text())
        failed.append((_label(record.stem, results), _error(results) + " (refused before compute)"))
    return trials, sorted(failed, key=lambda f: _natural(f[0]))


def _natural(name: str) -> list:
    """``trial_2`` before ``trial_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def mark_fronts(trials: list[dict[str, Any]]) -> None:
    """Adds ``front_params`` and ``front_latency``: on the (val, params) and (val, batch-1 latency) fronts.
    A trial without a latency is off the latency front (None)."""
    for trial, on in zip(trials, pareto_mask([(t["val"], t["params"]) for t in trials], ("max", "min")), strict=True):
        trial["front_params"] = on
    timed = [t for t in trials if t["latency_b1_ms"] is not None]
    for t in trials:
        t["front_latency"] = None
    mask = pareto_mask([(t["val"], t["latency_b1_ms"]) for t in timed], ("max", "min"))
    for trial, on in zip(timed, mask, strict=True):
        trial["front_latency"] = on


def _cell(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    return format(value, spec)


def markdown(trials: list[dict[str, Any]], failed: list[tuple[str, str]]) -> str:
    """The trials by parameter count; the two front columns; the failed trials below."""
    head = [
        "trial",
        "depth",
        "width",
        "kernel",
        "widen",
        "params",
        "latency b1 (ms)",
        "latency b256 (ms)",
        "val acc (best)",
        "test acc (at best val)",
        "front: params",
        "front: latency",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in sorted(trials, key=lambda t: (t["params"], -t["val"], t["trial"])):
        cells = [
            t["trial"],
            _cell(t["depth"]),
            _cell(t["width"]),
            _cell(t["kernel_size"]),
            _cell(t["widen"]),
            _cell(t["params"], ","),
            _cell(t["latency_b1_ms"], ".3f"),
            _cell(t["latency_b256_ms"], ".3f"),
            _cell(t["val"], ".4f"),
            _cell(t["test"], ".4f"),
            _cell(t["front_params"]),
            _cell(t["front_latency"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if failed:
        text += f"\nNot in the table ({len(failed)} trials):\n\n"
        text += "".join(f"- {name}: {reason}\n" for name, reason in failed)
    return text


def plot(trials: list[dict[str, Any]], path: str | Path) -> None:
    """Two panels: val accuracy against params (log scale) and against batch-1 latency; the front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, front, label in (
        (axes[0], "params", "front_params", "student parameters"),
        (axes[1], "latency_b1_ms", "front_latency", "batch-1 forward (ms, median)"),
    ):
        points = [t for t in trials if t[key] is not None]
        xs, ys = [t[key] for t in points], [t["val"] for t in points]
        ax.scatter(xs, ys, c="lightgray", edgecolors="gray", label="trial")
        best = sorted((t for t in points if t[front]), key=lambda t: t[key])
        xs, ys = [t[key] for t in best], [t["val"] for t in best]
        ax.step(xs, ys, where="post", c="C3", marker="o", label="Pareto front")
        if key == "params":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of a short log axis overlap
        ax.set_xlabel(label)
        ax.set_ylabel("best validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("student search: validation accuracy against size and latency")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kd-lab-pareto", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the search's sweep directory (trial_<n>/results.json under it)")
    parser.add_argument("--markdown", help="write the table here too")
    parser.add_argument("--png", help="draw the two fronts here")
    args = parser.parse_args(argv)
    if not Path(args.sweep_dir).is_dir():
        print(f"kd-lab-pareto: {args.sweep_dir} is not a directory; pass a search's sweep directory.", file=sys.stderr)
        return 2
    trials, failed = load_trials(args.sweep_dir)
    if not trials:
        reasons = f" ({len(failed)} failed: {failed[0][1]})" if failed else ""
        print(f"kd-lab-pareto: no finished trial in {args.sweep_dir}{reasons}.", file=sys.stderr)
        return 1
    mark_fronts(trials)
    text = markdown(trials, failed)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.png:
        plot(trials, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
