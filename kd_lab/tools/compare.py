"""``kd-lab-compare <run dirs or multirun dirs>``: one table from many ``results.json`` files.

Runs are grouped by (data, teacher, student, algorithm, scheme); each row gives the task's headline test
metric (``results.json``'s ``task.headline``: accuracy for classification, perplexity for language models) mean and std
over seeds at the best-validation epoch and at the last epoch (both protocols, because the benchmarks
disagree: RepDistiller reports the last epoch, mdistiller the best), the gain over the vanilla student of
the same (data, teacher, student), the teacher's accuracy, student-teacher agreement, the parameter ratio,
wall time and the number of seeds. Failed or unfinished runs are listed, never silently dropped.
It also draws PNG plots (``kd_lab.tools.compare_plots``) and logs the table to W&B (``kd_lab.tools.compare_wandb``).
"""

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

KEY = ("data", "teacher", "student", "algorithm", "scheme")
# config keys that do not make two runs different settings of one method
NOT_A_SETTING = (
    "seed",
    "data.seed",
    "paths.",
    "logger.",
    "callbacks.",
    "run_name",
    "hydra.",
    "trainer.enable_progress_bar",
    "perf.",  # speed switches leave the math alone (kd_lab.run.perf)
    "data.serve",  # how batches reach the model (conf/data/_serving.yaml)
    "data.device_max_mb",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(node, sort_keys=True)}


def setting(config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    flat = flatten(config)
    return tuple(sorted((k, v) for k, v in flat.items() if not k.startswith(NOT_A_SETTING)))


def find_results(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        found += [p] if p.name == "results.json" else sorted(p.rglob("results.json"))
    return found


def headline(r: dict[str, Any]) -> str:
    """The run's headline metric key (``test/acc`` for runs written before results.json named it)."""
    return (r.get("task") or {}).get("headline", "test/acc")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(files: list[Path]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    problems: list[tuple[str, str]] = []
    for f in files:
        try:
            r = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            problems.append((str(f.parent), f"unreadable results.json ({e})"))
            continue
        if r.get("status") != "finished":
            problems.append((str(f.parent), f"{r.get('status')}: {r.get('error', '')}"[:200]))
            continue
        groups[(*(r["names"].get(k, "-") for k in KEY), setting(r["config"]))].append(r)

    # settings of one (data, teacher, student, algorithm, scheme) differ in these keys: show them
    varying: dict[tuple, set[str]] = defaultdict(set)
    by_names: dict[tuple, list[dict]] = defaultdict(list)
    for key in groups:
        by_names[key[:-1]].append(dict(key[-1]))
    for names, settings in by_names.items():
        for k in set().union(*settings):
            if len({s.get(k) for s in settings}) > 1:
                varying[names].add(k)

    rows = []
    for key, runs in sorted(groups.items(), key=lambda kv: kv[0][:-1]):
        row: dict[str, Any] = dict(zip(KEY, key[:-1], strict=True))
        chosen = dict(key[-1])
        row["setting"] = " ".join(f"{k}={chosen.get(k, '-')}" for k in sorted(varying[key[:-1]])) or "-"
        head = headline(runs[0])
        row["metric"] = head.split("/", 1)[1]
        for protocol in ("best", "last"):
            row[f"acc_{protocol}"], row[f"std_{protocol}"] = mean_std([r[protocol][head] for r in runs])
        teacher_key = f"test/teacher_{row['metric']}"
        teacher = [r["best"][teacher_key] for r in runs if teacher_key in r["best"]]
        agree = [r["best"]["test/agreement"] for r in runs if "test/agreement" in r["best"]]
        row["teacher_acc"] = statistics.fmean(teacher) if teacher else None
        row["agreement"] = statistics.fmean(agree) if agree else None
        p = runs[0].get("params", {})
        row["param_ratio"] = p["student"] / p["teacher"] if p.get("teacher") else None
        row["student_params"] = p.get("student")  # the x axis of the accuracy-against-size plot
        row["others"] = other_models(runs)
        row["wall_s"] = statistics.fmean(r["wall_seconds"] for r in runs)
        row["seeds"] = len(runs)
        row["draft_acceptance"] = acceptance(runs)
        rows.append(row)
    vanilla = {(r["data"], r["teacher"], r["student"]): r for r in rows if r["algorithm"] == "none"}
    for row in rows:
        base = vanilla.get((row["data"], row["teacher"], row["student"]))
        if base is None and row["teacher"] == "-":  # self-distillation: the vanilla student of any teacher row
            same = [v for (d, _, s), v in vanilla.items() if (d, s) == (row["data"], row["student"])]
            base = same[0] if len(same) == 1 else None
        row["gain_best"] = row["acc_best"] - base["acc_best"] if base else None
    return rows, problems


def acceptance(runs: list[dict[str, Any]]) -> str | None:
    """The student's speculative-decoding acceptance rate as a draft for the teacher (language models):
    ``greedy mean / sampled mean`` over the seeds, or None when the runs did not measure it."""
    rates = defaultdict(list)
    for r in runs:
        for mode, values in ((r.get("report") or {}).get("speculative") or {}).items():
            rates[mode].append(values["acceptance_rate"])
    if not rates:
        return None
    return " / ".join(f"{statistics.fmean(rates[m]):.3f}" for m in ("greedy", "sampled") if m in rates)


def other_models(runs: list[dict[str, Any]]) -> str:
    """Models evaluated next to the student (a learning teacher, peers, exits, their ensemble: ``<name>/test/acc``
    at the best-validation epoch) and the stages of a chain: ``name mean±std`` over the seeds."""
    accs: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        head = headline(r)
        for key, value in r["best"].items():
            if key.endswith(f"/{head}"):
                accs[key.split("/")[0]].append(value)
        for stage in r.get("chain", []):
            accs[f"stage {stage['stage']}"].append(stage["metrics"][head])
    stats = {name: mean_std(v) for name, v in accs.items()}
    return ", ".join(f"{name} {mean:.4f}±{std:.4f}" for name, (mean, std) in stats.items()) or "-"


def fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]], problems: list[tuple[str, str]]) -> str:
    m = (rows[0].get("metric", "acc") if rows else "acc") if len({r.get("metric") for r in rows}) <= 1 else "value"
    head = (
        f"| data | teacher | student | algorithm | scheme | setting | test {m} (best val) | test {m} (last) "
        f"| gain vs vanilla | teacher {m} | agreement | student/teacher params | other models (test {m}) "
        "| wall s | seeds |"
    )
    drafts = any(r.get("draft_acceptance") for r in rows)  # language models: the acceptance-rate column
    if drafts:
        head = head.replace("| wall s |", "| draft acceptance (greedy / sampled) | wall s |")
    what = {"acc": "Test accuracy", "ppl": "Test perplexity (lower is better)"}.get(m, f"Test {m}")
    lines = [
        f"{what}: mean ± std over seeds, at the epoch of best validation {m} and at the last epoch.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['teacher']} | {r['student']} | {r['algorithm']} | {r['scheme']} | {r['setting']} "
            f"| {r['acc_best']:.4f} ± {r['std_best']:.4f} | {r['acc_last']:.4f} ± {r['std_last']:.4f} "
            f"| {fmt(r['gain_best'], '+.4f')} | {fmt(r['teacher_acc'])} | {fmt(r['agreement'])} "
            f"| {fmt(r['param_ratio'], '.3f')} | {r['others']} "
            + (f"| {r.get('draft_acceptance') or '-'} " if drafts else "")
            + f"| {r['wall_s']:.1f} | {r['seeds']} |"
        )
    if problems:  # named by their last two path parts: a kept table names no path of the machine that made it
        lines += ["", "Runs not in the table:", *[f"- {short_path(run)}: {why}" for run, why in problems]]
    return "\n".join(lines)


def short_path(run: str) -> str:
    return "/".join(Path(run).parts[-2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kd-lab-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run directories, multirun directories or results.json files")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV here")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    parser.add_argument(
        "--plots",
        type=Path,
        help="write PNG plots (accuracy per method, accuracy against student size) into this directory "
        "(default: next to --markdown, named after it; none without either)",
    )
    parser.add_argument("--wandb", action="store_true", help="log the table and plots to a W&B run (offline here)")
    parser.add_argument("--wandb-project", default="kd-lab", help="W&B project (default: kd-lab)")
    parser.add_argument("--wandb-group", help="W&B group, e.g. the experiment_name of the compared runs")
    parser.add_argument("--wandb-name", help="W&B run name (default: W&B's own)")
    args = parser.parse_args(argv)
    rows, problems = summarize(find_results(args.paths))
    if not rows and not problems:
        print(f"no results.json under {args.paths}", file=sys.stderr)
        return 1
    table = markdown(rows, problems)
    print(table)
    for path in (args.markdown, args.csv):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(KEY))
            writer.writeheader()
            writer.writerows(rows)
    plots = []
    if args.plots or args.markdown:
        from kd_lab.tools.compare_plots import write_plots

        directory, prefix = (args.plots, "") if args.plots else (args.markdown.parent, f"{args.markdown.stem}_")
        plots = write_plots(rows, directory, prefix)
        for path in plots:
            print(f"plot: {path}", file=sys.stderr)
    if args.wandb:
        from kd_lab.tools.compare_wandb import log_comparison

        run_dir = log_comparison(rows, problems, plots, args.wandb_project, args.wandb_group, args.wandb_name)
        print(f"W&B run: {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
