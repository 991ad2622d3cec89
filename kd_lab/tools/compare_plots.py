"""PNG plots of a ``kd-lab-compare`` table: accuracy per method with error bars, and accuracy against student size.

Both plot test accuracy at the best-validation epoch (mean ± std over seeds), the table's first protocol.
Figures are drawn on matplotlib's Agg canvas (``Figure`` without pyplot): no display, no global state.
"""

from collections import defaultdict
from pathlib import Path
from typing import Any

PROTOCOL = "test accuracy at the best-val epoch\n(mean ± std over seeds)"


def method_label(row: dict[str, Any]) -> str:
    """What distinguishes rows of one student: algorithm, scheme when not the usual one, differing settings."""
    label = row["algorithm"] if row["scheme"] == "offline" else f"{row['algorithm']} ({row['scheme']})"
    return label if row["setting"] == "-" else f"{label} {row['setting']}"


def student_label(row: dict[str, Any], several_pairs: bool) -> str:
    return f"{row['student']} ← {row['teacher']} ({row['data']})" if several_pairs else row["student"]


def accuracy_by_method(rows: list[dict[str, Any]], path: Path) -> Path:
    """One panel per student (per teacher and data, when there are several), one horizontal bar per method
    that ran with it: readable however many methods a survey has."""
    from matplotlib.figure import Figure

    several = len({(r["data"], r["teacher"]) for r in rows}) > 1
    panels: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        panels.setdefault(student_label(r, several), []).append(r)
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    tallest = max(len(v) for v in panels.values())
    fig = Figure(figsize=(4.8 * ncols, (0.6 + 0.26 * tallest) * nrows + 0.6), layout="constrained")
    low = min(r["acc_best"] - r["std_best"] for r in rows)
    high = max(r["acc_best"] + r["std_best"] for r in rows)
    if rows[0].get("metric", "acc") == "acc":  # accuracies: a margin, within [0, 1]
        low, high = max(0.0, low - 0.05), min(1.0, high + 0.02)
    else:  # another metric (perplexity): 5% of its range on each side
        pad = 0.05 * (high - low or abs(high) or 1.0)
        low, high = low - pad, high + pad
    for i, (student, panel) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ys = range(len(panel))
        ax.barh(ys, [r["acc_best"] for r in panel], xerr=[r["std_best"] for r in panel], capsize=2,
                color=["tab:gray" if r["algorithm"] == "none" else "tab:blue" for r in panel])  # fmt: skip
        ax.set_yticks(ys, [method_label(r) for r in panel], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(low, high)
        ax.set_title(student, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    metric = rows[0].get("metric", "acc")
    label = PROTOCOL.replace("\n", " ")
    fig.supxlabel(label if metric == "acc" else label.replace("accuracy", metric), fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def accuracy_vs_student_size(rows: list[dict[str, Any]], path: Path) -> Path:
    """One line per method through its students, by parameter count (log scale)."""
    from matplotlib.figure import Figure

    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("student_params"):
            by_method[method_label(row)].append(row)
    fig = Figure(figsize=(9.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for method, points in by_method.items():
        points.sort(key=lambda r: r["student_params"])
        ax.errorbar(
            [r["student_params"] for r in points],
            [r["acc_best"] for r in points],
            yerr=[r["std_best"] for r in points],
            marker="o",
            capsize=3,
            label=method,
        )
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel(PROTOCOL)
    if by_method:
        fig.legend(fontsize=7, loc="outside right upper")
    fig.savefig(path, dpi=120)
    return path


def write_plots(rows: list[dict[str, Any]], directory: Path, prefix: str = "") -> list[Path]:
    """Both plots as ``<directory>/<prefix>accuracy_by_method.png`` and ``...accuracy_vs_student_size.png``."""
    if not rows:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    return [
        accuracy_by_method(rows, directory / f"{prefix}accuracy_by_method.png"),
        accuracy_vs_student_size(rows, directory / f"{prefix}accuracy_vs_student_size.png"),
    ]
