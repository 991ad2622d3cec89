"""The lifelong table: mean +- std over seeds of the final average accuracy and the forgetting, per method.

    python experiments/lifelong/table.py <sweep dir> --markdown results.md --csv results.csv

Reads every ``<sweep dir>/**/results.json`` of kd-lab-lifelong. The std is the sample standard deviation
(n - 1); with one seed it is left empty. The files name no path: only methods, seeds and numbers.
"""

import argparse
import csv
import json
import statistics
from pathlib import Path

ORDER = ("finetune", "lwf", "joint")
COLUMNS = ("method", "seeds", "final_avg_acc_mean", "final_avg_acc_std", "forgetting_mean", "forgetting_std")


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def rows(sweep: Path) -> list[dict]:
    runs: dict[str, list[dict]] = {}
    for path in sorted(sweep.glob("**/results.json")):
        result = json.loads(path.read_text())
        if result.get("status") == "finished":
            runs.setdefault(result["method"], []).append(result)
    table = []
    for method in sorted(runs, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m)):
        done = runs[method]
        acc = mean_std([r["final_average_accuracy"] for r in done])
        forget = mean_std([r["forgetting"] for r in done if r["forgetting"] is not None])
        seeds = ",".join(str(s) for s in sorted(r["seed"] for r in done))
        table.append(dict(zip(COLUMNS, (method, seeds, *acc, *forget), strict=True)))
    return table


def cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a directory holding kd-lab-lifelong results.json files")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    table = rows(args.sweep)
    if not table:
        raise SystemExit(f"no finished kd-lab-lifelong results.json under {args.sweep}")
    lines = [
        "| method | seeds | final average accuracy (%) | forgetting (points) |",
        "|---|---|---|---|",
        *(
            f"| {r['method']} | {r['seeds']} | {cell(r['final_avg_acc_mean'], r['final_avg_acc_std'])} | "
            f"{cell(r['forgetting_mean'], r['forgetting_std'])} |"
            for r in table
        ),
    ]
    print("\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(table)


if __name__ == "__main__":
    main()
