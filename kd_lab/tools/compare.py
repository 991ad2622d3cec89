"""``kd-lab-compare <run dirs or multirun dirs>``: one table from many ``results.json`` files.

Runs are grouped by (data, teacher, student, algorithm, scheme, epoch budget, thread count, setting); each
row gives the task's headline test metric (``results.json``'s ``task.headline``: accuracy for
classification, perplexity for language models) mean and std over seeds at the best-validation epoch and
at the last epoch (both protocols, because the benchmarks disagree: RepDistiller reports the last epoch,
mdistiller the best), the gain over the vanilla student of the same data, student, setting, epoch budget
and thread count, the teacher's accuracy, student-teacher agreement, the parameter ratio, wall time and the
number of distinct seeds. A seed run several times counts once: the latest finished run is kept and the
repeats are named under the table. Failed or unfinished runs are listed, never silently dropped.
In a terminal it prints an aligned table (``rich``); into a pipe or a file, Markdown.
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
    "data.serve",  # how batches reach the model (conf/_data_serving.yaml)
    "data.device_max_mb",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "trainer.max_epochs",  # still a grouping key, but shown in its own column ("epochs"), not in "setting"
    "threads",  # likewise: the count the run used is the "threads" column (thread_count)
)
# config keys that name the method, not the conditions it ran under: a vanilla baseline may differ in them
METHOD_KEYS = ("algorithm", "scheme", "teacher", "chain", "experiment_name")  # "teacher": also a null teacher


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(node, sort_keys=True)}


def setting(config: dict[str, Any], seed_keys: frozenset[str] = frozenset()) -> tuple[tuple[str, Any], ...]:
    """The config keys that make a setting. ``seed_keys``: keys that follow the run's seed (not a setting)."""
    flat = flatten(config)
    return tuple(sorted((k, v) for k, v in flat.items() if not k.startswith(NOT_A_SETTING) and k not in seed_keys))


def keys_following_the_seed(configs: list[dict[str, Any]]) -> frozenset[str]:
    """The ``<group>.seed`` keys equal to the run's seed in every run that has them: the config's ``${seed}``
    (GKD's draws, a sampler's). They mark replicates, not settings. A seed fixed apart from the run's
    (``teacher.seed: 0``) differs from it in some run, so it stays a setting."""
    candidates: dict[str, bool] = {}
    for config in configs:
        run_seed = json.dumps(config.get("seed"), sort_keys=True)
        for k, v in flatten(config).items():
            if "." in k and k.rsplit(".", 1)[-1] == "seed":
                candidates[k] = candidates.get(k, True) and v == run_seed
    return frozenset(k for k, follows in candidates.items() if follows)


def conditions(chosen: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """The part of a setting a vanilla baseline must share: everything but the method's own keys."""
    return tuple((k, v) for k, v in chosen if not k.startswith(METHOD_KEYS))


def find_results(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        found += [p] if p.name == "results.json" else sorted(p.rglob("results.json"))
    return found


def headline(r: dict[str, Any]) -> str:
    """The run's headline metric key (``test/acc`` for runs written before results.json named it)."""
    return (r.get("task") or {}).get("headline", "test/acc")


def epoch_budget(r: dict[str, Any]) -> int | None:
    """``trainer.max_epochs`` of the run's resolved config (None when not recorded)."""
    value = ((r.get("config") or {}).get("trainer") or {}).get("max_epochs")
    return value if isinstance(value, int) else None


def thread_count(r: dict[str, Any]) -> int | None:
    """results.json's ``threads`` (torch's thread count). A file without it whose config set ``threads=N``
    ran with N threads (kd_lab.run.threads applies it); None when neither is recorded (older files)."""
    for value in (r.get("threads"), (r.get("config") or {}).get("threads")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def seed_of(r: dict[str, Any]) -> tuple[Any, Any]:
    """What makes two runs different replicates: the seed, and data.seed where it was set apart."""
    data_seed = ((r.get("config") or {}).get("data") or {}).get("seed", r.get("seed"))
    return r.get("seed"), data_seed


def seed_name(seed: tuple[Any, Any]) -> str:
    return f"{seed[0]}" if seed[1] == seed[0] else f"{seed[0]} (data.seed {seed[1]})"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def one_run_per_seed(found: list[tuple[Path, dict[str, Any]]]) -> tuple[list[dict[str, Any]], dict[Any, int]]:
    """The latest finished run of each seed, and how many runs of each repeated seed were dropped.

    Latest means the newest results.json modification time: the file is written when the run ends. Equal
    times (a copied tree) fall back to the path, so the choice does not depend on the file system's order.
    """
    by_seed: dict[Any, list[tuple[float, str, dict[str, Any]]]] = defaultdict(list)
    for path, r in found:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = 0.0
        by_seed[seed_of(r)].append((mtime, str(path), r))
    kept, dropped = [], {}
    for seed, runs in sorted(by_seed.items(), key=lambda kv: str(kv[0])):
        runs.sort(key=lambda t: (t[0], t[1]))
        kept.append(runs[-1][2])
        if len(runs) > 1:
            dropped[seed] = len(runs) - 1
    return kept, dropped


def summarize(files: list[Path]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    groups: dict[tuple, list[tuple[Path, dict]]] = defaultdict(list)
    problems: list[tuple[str, str]] = []
    finished: list[tuple[Path, dict]] = []
    for f in files:
        try:
            r = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            problems.append((str(f.parent), f"unreadable results.json ({e})"))
            continue
        if r.get("status") != "finished":
            problems.append((str(f.parent), f"{r.get('status')}: {r.get('error', '')}"[:200]))
            continue
        finished.append((f, r))
    seed_keys = keys_following_the_seed([r["config"] for _, r in finished])
    for f, r in finished:
        names = tuple(r["names"].get(k, "-") for k in KEY)
        groups[(*names, epoch_budget(r), thread_count(r), setting(r["config"], seed_keys))].append((f, r))

    # settings of one (data, teacher, student, algorithm, scheme) differ in these keys: show them
    varying: dict[tuple, set[str]] = defaultdict(set)
    by_names: dict[tuple, list[dict]] = defaultdict(list)
    for key in groups:
        by_names[key[: len(KEY)]].append(dict(key[-1]))
    for names, settings in by_names.items():
        for k in set().union(*settings):
            if len({s.get(k) for s in settings}) > 1:
                varying[names].add(k)

    rows, contexts = [], []
    for key, found in sorted(groups.items(), key=lambda kv: order(kv[0][:-1])):
        runs, dropped = one_run_per_seed(found)
        row: dict[str, Any] = dict(zip(KEY, key[: len(KEY)], strict=True))
        chosen = dict(key[-1])
        row["setting"] = " ".join(f"{k}={chosen.get(k, '-')}" for k in sorted(varying[key[: len(KEY)]])) or "-"
        row["epochs"], row["threads"] = key[len(KEY)], key[len(KEY) + 1]
        head = headline(runs[0])
        row["metric"] = head.split("/", 1)[1]
        for protocol in ("best", "last"):
            row[f"acc_{protocol}"], row[f"std_{protocol}"] = mean_std([r[protocol][head] for r in runs])
        row["gain_best"], row["gain_note"] = None, None  # filled below, once every row is known
        teacher_key = f"test/teacher_{row['metric']}"
        teacher = [r["best"][teacher_key] for r in runs if teacher_key in r["best"]]
        agree = [r["best"]["test/agreement"] for r in runs if "test/agreement" in r["best"]]
        row["teacher_acc"] = statistics.fmean(teacher) if teacher else None
        row["agreement"] = statistics.fmean(agree) if agree else None
        p = runs[0].get("params", {})
        row["param_ratio"] = p["student"] / p["teacher"] if p.get("teacher") else None
        row["student_params"] = p.get("student")  # the x axis of the accuracy-against-size plot
        row["others"] = other_models(runs)
        # the student's own time: a run that trained the teacher first spent longer, but not on this method
        row["wall_s"] = statistics.fmean(r.get("student_seconds", r["wall_seconds"]) for r in runs)
        row["seeds"] = len(runs)  # distinct seeds: repeats of one seed are dropped above
        row["repeats_dropped"] = sum(dropped.values())
        row["repeats_note"] = (
            "; ".join(f"seed {seed_name(s)}: {n + 1} runs" for s, n in dropped.items()) if dropped else None
        )
        row["draft_acceptance"] = acceptance(runs)
        rows.append(row)
        contexts.append(conditions(key[-1]))
    for row, context in zip(rows, contexts, strict=True):
        row["gain_best"], row["gain_note"] = gain(row, context, rows, contexts)
    return rows, problems


def order(key: tuple) -> tuple:
    """Sort rows by their names, then budget and threads; an unrecorded (None) value sorts first."""
    return tuple((value is not None, value) for value in key)


def gain(
    row: dict[str, Any], context: tuple, rows: list[dict[str, Any]], contexts: list[tuple]
) -> tuple[float | None, str | None]:
    """The row's gain over its vanilla student (algorithm none), and why there is none when there is none.

    The baseline must share data, student, the epoch budget, the thread count and every other config key but
    the method's own (``METHOD_KEYS``). A vanilla student never uses its teacher config: a vanilla row of the
    same teacher is preferred, and any other fits rows taught by another model (a chain's stage, a cohort).
    A gain over a baseline of another budget measures the budget, not the method.
    """
    vanilla = [
        (v, c)
        for v, c in zip(rows, contexts, strict=True)
        if v["algorithm"] == "none" and (v["data"], v["student"]) == (row["data"], row["student"])
    ]
    same_teacher = [(v, c) for v, c in vanilla if v["teacher"] == row["teacher"]]
    if same_teacher:
        vanilla = same_teacher
    if not vanilla:
        return None, f"no vanilla run (algorithm none) of {row['student']} on {row['data']}"
    fits = [v for v, c in vanilla if (v["epochs"], v["threads"], c) == (row["epochs"], row["threads"], context)]
    if len(fits) == 1:
        return row["acc_best"] - fits[0]["acc_best"], None
    if len(fits) > 1:
        return None, f"{len(fits)} vanilla rows fit ({', '.join(v['teacher'] for v in fits)}): pick one teacher"
    same_epochs = [(v, c) for v, c in vanilla if v["epochs"] == row["epochs"]]
    if not same_epochs:
        have = ", ".join(sorted({fmt(v["epochs"], "") for v, _ in vanilla}))
        return None, f"no vanilla run with {fmt(row['epochs'], '')} epochs (vanilla: {have} epochs)"
    same_threads = [(v, c) for v, c in same_epochs if v["threads"] == row["threads"]]
    if not same_threads:
        have = ", ".join(sorted({fmt(v["threads"], "") for v, _ in same_epochs}))
        return None, f"no vanilla run with {fmt(row['threads'], '')} threads (vanilla: {have} threads)"
    keys = sorted({k for _, c in same_threads for k, _ in set(c) ^ set(context)})
    return None, "the vanilla runs differ in " + ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")


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


def metric_of(rows: list[dict[str, Any]]) -> str:
    return (rows[0].get("metric", "acc") if rows else "acc") if len({r.get("metric") for r in rows}) <= 1 else "value"


def caption(m: str) -> str:
    what = {"acc": "Test accuracy", "ppl": "Test perplexity (lower is better)"}.get(m, f"Test {m}")
    return f"{what}: mean ± std over seeds, at the epoch of best validation {m} and at the last epoch."


def row_label(row: dict[str, Any]) -> str:
    """One row named in a note: its method, student, data, budget and setting."""
    parts = [
        f"{row['algorithm']} ({row['scheme']})",
        f"{row['student']} ← {row['teacher']} on {row['data']}",
        f"{fmt(row['epochs'], '')} epochs",
        f"{fmt(row['threads'], '')} threads",
    ]
    return ", ".join(parts + ([row["setting"]] if row["setting"] != "-" else []))


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """The lines under the table: repeated seeds dropped, and why a gain is missing."""
    lines = []
    repeated = [r for r in rows if r["repeats_dropped"]]
    if repeated:
        lines += ["", "Repeated seeds: each seed counts once, with its latest finished run; the others are dropped."]
        lines += [f"- {row_label(r)}: {r['repeats_dropped']} dropped ({r['repeats_note']})" for r in repeated]
    missing = [r for r in rows if r["gain_note"]]
    if missing:
        lines += [
            "",
            "Gain vs vanilla is '-' where no vanilla run has the same data, student, setting, epochs and threads:",
        ]
        lines += [f"- {row_label(r)}: {r['gain_note']}" for r in missing]
    return lines


def markdown(rows: list[dict[str, Any]], problems: list[tuple[str, str]]) -> str:
    m = metric_of(rows)
    head = (
        f"| data | teacher | student | algorithm | scheme | setting | epochs | threads | test {m} (best val) "
        f"| test {m} (last) | gain vs vanilla | teacher {m} | agreement | student/teacher params "
        f"| other models (test {m}) | wall s | seeds |"
    )
    drafts = any(r.get("draft_acceptance") for r in rows)  # language models: the acceptance-rate column
    if drafts:
        head = head.replace("| wall s |", "| draft acceptance (greedy / sampled) | wall s |")
    lines = [caption(m), "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['teacher']} | {r['student']} | {r['algorithm']} | {r['scheme']} | {r['setting']} "
            f"| {fmt(r['epochs'], '')} | {fmt(r['threads'], '')} "
            f"| {r['acc_best']:.4f} ± {r['std_best']:.4f} | {r['acc_last']:.4f} ± {r['std_last']:.4f} "
            f"| {fmt(r['gain_best'], '+.4f')} | {fmt(r['teacher_acc'])} | {fmt(r['agreement'])} "
            f"| {fmt(r['param_ratio'], '.3f')} | {r['others']} "
            + (f"| {r.get('draft_acceptance') or '-'} " if drafts else "")
            + f"| {r['wall_s']:.1f} | {r['seeds']} |"
        )
    lines += notes(rows)
    if problems:  # named by their last two path parts: a kept table names no path of the machine that made it
        lines += ["", "Runs not in the table:", *[f"- {short_path(run)}: {why}" for run, why in problems]]
    return "\n".join(lines)


# The terminal table leaves out the wide columns (agreement, parameter ratio, other models, wall time, draft
# acceptance) so that it fits 120 columns; --markdown and --csv keep every column. On a narrower terminal it
# drops the last-epoch and teacher columns, then puts mean and std on two lines; names wrap last.
IDENTITY = ("data", "teacher", "scheme")  # shown once above the table when every row has the same value
NAME_WIDTH = 12  # name columns wrap, but never below this many characters (or their longest value)


def terminal_table(rows: list[dict[str, Any]], problems: list[tuple[str, str]], width: int = 120) -> str:
    """The table as a terminal shows it: aligned, cells wrapped to the terminal's width (``rich``)."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    m = metric_of(rows)
    same = {k: rows[0][k] for k in IDENTITY if rows and len({r[k] for r in rows}) == 1}
    names = [k for k in IDENTITY[:2] if k not in same] + ["student", "algorithm"]
    names += [k for k in IDENTITY[2:] if k not in same]
    names += ["setting"] if any(r["setting"] != "-" for r in rows) else []
    name_widths = {k: max(len(k), min(NAME_WIDTH, max((len(str(r[k])) for r in rows), default=1))) for k in names}

    def cells(r: dict[str, Any], sep: str) -> dict[str, str]:
        return {
            "epochs": fmt(r["epochs"], ""),
            "threads": fmt(r["threads"], ""),
            "best val": f"{r['acc_best']:.4f}{sep}±{r['std_best']:.4f}",
            "last": f"{r['acc_last']:.4f}{sep}±{r['std_last']:.4f}",
            "gain": fmt(r["gain_best"], "+.4f"),
            "teacher": fmt(r["teacher_acc"]),
            "seeds": str(r["seeds"]),
        }

    full = ["epochs", "threads", "best val", "last", "gain", "teacher", "seeds"]
    short = ["epochs", "threads", "best val", "gain", "seeds"]
    for numbers, sep in ((full, ""), (short, ""), (short, "\n")):  # the first layout that fits
        needed = sum(name_widths.values()) + 2 * (len(names) + len(numbers) - 1)
        needed += sum(max(len(n), *(len(line) for r in rows for line in cells(r, sep)[n].split("\n"))) for n in numbers)
        if needed <= width:
            break
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for name in names:
        table.add_column(name, overflow="fold", min_width=name_widths[name])
    for name in numbers:
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        row_cells = cells(r, sep)
        table.add_row(*(str(r[k]) for k in names), *(row_cells[n] for n in numbers))
    left_out = ["agreement", "parameter ratio", "other models", "wall time"]
    left_out = [c for c in ("last", "teacher") if c not in numbers] + left_out
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False, markup=False, emoji=False)
    console.print(caption(m) + " Gain: best val over the vanilla student.")
    if same:
        console.print("All rows: " + ", ".join(f"{k} {v}" for k, v in same.items()))
    console.print(table)
    console.print(f"More columns ({', '.join(left_out)}): --markdown or --csv.")
    for line in notes(rows):
        console.print(line)
    if problems:
        console.print("\nRuns not in the table:")
        for run, why in problems:
            console.print(f"- {short_path(run)}: {why}")
    return out.getvalue().rstrip("\n")


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
    if sys.stdout.isatty():  # a person reads it: aligned columns at the terminal's width
        import shutil

        print(terminal_table(rows, problems, shutil.get_terminal_size().columns))
    else:  # a pipe or a file: Markdown, as --markdown writes it
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
        plots, skipped = write_plots(rows, directory, prefix)
        for path in plots:
            print(f"plot: {path}", file=sys.stderr)
        for note in skipped:
            print(f"plot skipped: {note}", file=sys.stderr)
    if args.wandb:
        from kd_lab.tools.compare_wandb import log_comparison

        run_dir = log_comparison(rows, problems, plots, args.wandb_project, args.wandb_group, args.wandb_name)
        print(f"W&B run: {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
