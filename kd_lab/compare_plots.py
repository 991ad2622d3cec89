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
    return f"{row['student']}\n← {row['teacher']} ({row['data']})" if several_pairs else row["student"]


def accuracy_by_method(rows: list[dict[str, Any]], path: Path) -> Path:
    """One group of bars per student (per teacher and data, when there are several), one bar per method."""
    from matplotlib.figure import Figure

    several = len({(r["data"], r["teacher"]) for r in rows}) > 1
    students = list(dict.fromkeys(student_label(r, several) for r in rows))
    methods = list(dict.fromkeys(method_label(r) for r in rows))
    cell = {(student_label(r, several), method_label(r)): r for r in rows}
    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(6.0, 1.2 + len(students) * len(methods) * 0.45) + 3.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for m, method in enumerate(methods):
        xs, ys, errs = [], [], []
        for s, student in enumerate(students):
            row = cell.get((student, method))
            if row is not None:
                xs.append(s - 0.4 + width * (m + 0.5))
                ys.append(row["acc_best"])
                errs.append(row["std_best"])
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=method)
    ax.set_xticks(range(len(students)), students)
    low = min(r["acc_best"] - r["std_best"] for r in rows)
    ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(r["acc_best"] + r["std_best"] for r in rows) + 0.02))
    ax.set_ylabel(PROTOCOL)
    fig.legend(fontsize=7, loc="outside right upper")
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
