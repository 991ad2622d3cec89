"""PNG plots of a ``kd-lab-compare`` table: accuracy per method, and accuracy against student size.

Both plot the headline test metric at the best-validation epoch (mean ± std over seeds), the table's first
protocol. Rows of different data, teacher, epoch budget or thread count never share a panel.
Figures are drawn on matplotlib's Agg canvas (``Figure`` without pyplot): no display, no global state.
"""

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

PROTOCOL = "test accuracy at the best-val epoch (mean ± std over seeds)"
LOWER_IS_BETTER = {"ppl", "loss", "mse", "mae"}  # headline metrics where a smaller value is the better one
MARKERS = "osD^vPX*<>"  # one per student family in the size plot


def metric_label(rows: list[dict[str, Any]]) -> str:
    metric = rows[0].get("metric", "acc")
    return PROTOCOL if metric == "acc" else PROTOCOL.replace("accuracy", metric)


def short_setting(setting: str) -> str:
    """``student.model.hidden_size=64 algorithm.divergence="jsd"`` -> ``hidden_size=64 divergence=jsd``: the
    last part of each key and the value, which is what tells two bars apart."""
    return " ".join(
        f"{k.rsplit('.', 1)[-1]}={v.strip(chr(34))}" for k, _, v in (w.partition("=") for w in setting.split())
    )


def method_label(row: dict[str, Any]) -> str:
    """What distinguishes rows of one student: algorithm, scheme when not the usual one, differing settings."""
    label = row["algorithm"] if row["scheme"] == "offline" else f"{row['algorithm']} ({row['scheme']})"
    return label if row["setting"] == "-" else f"{label} {short_setting(row['setting'])}"


# Past this many bars, or labels this long, a panel's bars lie horizontally: the labels read in one line.
MAX_UPRIGHT_BARS, MAX_UPRIGHT_LABEL = 8, 24
# A lower-is-better value this many times the panel's median (perplexity 1278 against 110) is drawn cut at
# the axis end, with its value printed: otherwise one diverged run flattens every other bar.
OFF_SCALE = 4.0


def value_axis_end(values: list[float], references: list[float], metric: str) -> float:
    """Where the value axis ends. Accuracy ends at 1 (its upper bound). Other metrics end a little above the
    largest value that is not off scale."""
    if metric == "acc":
        return 1.0
    ordered = sorted(values + references)
    median = ordered[len(ordered) // 2]
    return 1.1 * max(v for v in ordered if v <= OFF_SCALE * median)


def budget_label(key: tuple) -> str:
    epochs, threads = key
    return f"{'-' if epochs is None else epochs} epochs" + ("" if threads is None else f", {threads} threads")


def family(student: str) -> str:
    """A student's architecture family: its name before the first ``_``, without a trailing depth or width
    (``resnet20``, ``resnet8x4``: resnet; ``mlp_small``, ``mlp_medium``: mlp; ``cnn1d_tiny``: cnn1d)."""
    stem = student.split("_")[0]
    match = re.fullmatch(r"(.*?[A-Za-z])\d+(?:x\d+)?", stem)
    return match.group(1) if match else stem


def method_panels(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows by (data, teacher, student, epochs, threads). A row without a teacher (self-distillation) joins
    the one panel of its student under the same budget, so its bar stands next to the vanilla student."""
    panels: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["teacher"] != "-":
            panels[(r["data"], r["teacher"], r["student"], r["epochs"], r["threads"])].append(r)
    for r in rows:
        if r["teacher"] == "-":
            same = [
                k for k in panels if (k[0], k[2], k[3], k[4]) == (r["data"], r["student"], r["epochs"], r["threads"])
            ]
            key = same[0] if len(same) == 1 else (r["data"], "-", r["student"], r["epochs"], r["threads"])
            panels[key].append(r)
    return dict(panels)


def accuracy_by_method_figure(rows: list[dict[str, Any]]):
    """One panel per student (and data, teacher, budget): one bar per method, best first, with the std over
    seeds as error bars and the value written on the bar; the vanilla student and the teacher are labelled
    lines, so a bar reads against both. Many methods or long labels: the bars lie horizontally."""
    from matplotlib.figure import Figure

    panels = method_panels(rows)
    metric = rows[0].get("metric", "acc")
    lower_better = metric in LOWER_IS_BETTER
    labels = [method_label(r) for r in rows]
    widest = max(len(v) for v in panels.values())
    flat = widest > MAX_UPRIGHT_BARS or max(map(len, labels)) > MAX_UPRIGHT_LABEL
    ncols = 1 if flat else min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    if flat:  # one column; each panel as tall as its bars need, so a one-bar panel stays small
        heights = [1.2 + 0.3 * len(v) for v in panels.values()]
        fig = Figure(figsize=(9.0, sum(heights)), layout="constrained")
        grid = fig.add_gridspec(nrows, 1, height_ratios=heights)
    else:
        fig = Figure(figsize=(max(5.0, 1.0 + 0.55 * widest) * ncols + 1.6, 4.2 * nrows), layout="constrained")
        grid = fig.add_gridspec(nrows, ncols)
    for i, (key, panel) in enumerate(panels.items()):
        data, teacher, student, *budget = key
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        vanilla = [r for r in panel if r["algorithm"] == "none"]
        # one vanilla row is the reference line; several (different settings) stay bars, told apart by label
        bars = [r for r in panel if not (len(vanilla) == 1 and r is vanilla[0])]
        bars.sort(key=lambda r: r["acc_best"], reverse=not lower_better)  # the best method first
        references = []
        if len(vanilla) == 1:
            references.append(("vanilla student", vanilla[0]["acc_best"], ":", "tab:gray"))
        teachers = [r["teacher_acc"] for r in panel if r.get("teacher_acc") is not None]
        if teachers:  # rows of one panel can have different teachers (peers, a chain's earlier stage)
            name = "teacher" if max(teachers) - min(teachers) < 5e-4 else "teachers' mean"
            references.append((name, sum(teachers) / len(teachers), "--", "black"))
        # The value axis starts at 0, so a bar's length is proportional to its value: a gap of 0.01 looks like
        # one. The printed values carry the small differences.
        end = value_axis_end([r["acc_best"] + r["std_best"] for r in panel], [v for _, v, _, _ in references], metric)
        shown = [min(r["acc_best"], end) for r in bars]
        errors = [0.0 if r["acc_best"] > end else r["std_best"] for r in bars]
        values = [f"{r['acc_best']:.3f}" + (" (off scale)" if r["acc_best"] > end else "") for r in bars]
        colours = ["tab:gray" if r["algorithm"] == "none" else "tab:blue" for r in bars]
        at = range(len(bars))
        if flat:
            container = ax.barh(at, shown, xerr=errors, capsize=3, color=colours)
            ax.bar_label(container, labels=values, padding=3, fontsize=7)
            ax.set_yticks(at, [method_label(r) for r in bars], fontsize=7)
            ax.invert_yaxis()  # the best method on top
            ax.set_xlim(0.0, end * (1.25 if metric != "acc" else 1.0))  # room for the printed values
            ax.set_xlabel(metric, fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        else:
            container = ax.bar(at, shown, yerr=errors, capsize=3, color=colours)
            ax.bar_label(container, labels=values, label_type="center", rotation=90, color="white", fontsize=8)
            ax.set_xticks(at, [method_label(r) for r in bars], rotation=35, ha="right", fontsize=7)
            ax.set_ylim(0.0, end)
            ax.set_ylabel(metric, fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
        for name, value, style, colour in references:
            line = ax.axvline if flat else ax.axhline
            line(value, color=colour, linestyle=style, linewidth=1.5, label=f"{name} {value:.3f}")
        ax.set_title(f"{student} ← {teacher} ({data}), {budget_label(tuple(budget))}", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.supxlabel(metric_label(rows) + (", lower is better" if lower_better else ""), fontsize=8)
    return fig


def accuracy_vs_student_size_figure(rows: list[dict[str, Any]]):
    """Accuracy against the student's parameter count (log scale), one panel per (data, teacher, budget).

    Returns ``(figure or None, notes)``: a panel with fewer than two students says nothing about size and is
    left out (a note says so). Each method has a colour, each student family a marker. Lines join a method's
    points only within one family: a line between two architectures would suggest a trend that is not there.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("student_params"):
            panels[(r["data"], r["teacher"], r["epochs"], r["threads"])].append(r)
    notes, kept = [], {}
    for key, panel in panels.items():
        students = sorted({r["student"] for r in panel})
        where = f"{key[0]}, teacher {key[1]}, {budget_label(key[2:])}"
        if len(students) < 2:
            notes.append(f"accuracy vs student size for {where}: one student ({students[0]}); it needs two or more")
        else:
            kept[key] = panel
    if not panels:
        notes.append("accuracy vs student size: no results.json records the student's parameter count")
    if not kept:
        return None, notes
    methods = sorted({method_label(r) for p in kept.values() for r in p})
    families = sorted({family(r["student"]) for p in kept.values() for r in p})
    colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    marker = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(families)}
    fig = Figure(figsize=(9.0, 4.2 * len(kept)), layout="constrained")
    for i, (key, panel) in enumerate(kept.items()):
        ax = fig.add_subplot(len(kept), 1, i + 1)
        series: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in panel:
            series[(method_label(r), family(r["student"]))].append(r)
        for (method, fam), points in series.items():
            points.sort(key=lambda r: r["student_params"])
            ax.errorbar(
                [r["student_params"] for r in points],
                [r["acc_best"] for r in points],
                yerr=[r["std_best"] for r in points],
                color=colour[method],
                marker=marker[fam],
                linestyle="-" if len(points) > 1 else "none",  # points of one family only (see above)
                capsize=3,
            )
        ax.set_xscale("log")
        ax.set_xlabel("student parameters", fontsize=8)
        ax.set_ylabel(metric_label(rows).replace(" (", "\n("), fontsize=8)
        ax.set_title(f"{key[0]}, teacher {key[1]}, {budget_label(key[2:])}", fontsize=8)
    handles = [Line2D([], [], color=colour[m], linewidth=3, label=m) for m in methods]
    handles += [Line2D([], [], color="black", marker=marker[f], linestyle="none", label=f) for f in families]
    fig.legend(handles=handles, fontsize=7, loc="outside right upper", title="method / family", title_fontsize=7)
    return fig, notes


def write_plots(rows: list[dict[str, Any]], directory: Path, prefix: str = "") -> tuple[list[Path], list[str]]:
    """``<directory>/<prefix>accuracy_by_method.png`` and ``...accuracy_vs_student_size.png``; returns the
    written paths and a note for each plot (or panel) left out, with the reason."""
    if not rows:
        return [], []
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{prefix}accuracy_by_method.png"
    accuracy_by_method_figure(rows).savefig(path, dpi=120)
    written = [path]
    size, notes = accuracy_vs_student_size_figure(rows)
    path = directory / f"{prefix}accuracy_vs_student_size.png"
    if size is None:
        path.unlink(missing_ok=True)  # an older file of this name would read as this table's plot
    else:
        size.savefig(path, dpi=120)
        written.append(path)
    return written, notes
