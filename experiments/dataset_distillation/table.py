"""The dataset-distillation table from the results.json files under the given directories.

One row per (method, ipc): test accuracy of a model trained from scratch on the learned set, on the same
number of real examples drawn at random (the set's starting point), and on the full training split, as
mean +- standard deviation over seeds; and the synthesis time.
    python experiments/dataset_distillation/table.py <dirs> [--markdown f.md] [--csv f.csv]
"""

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def load(dirs: list[str]) -> list[dict]:
    runs = []
    for d in dirs:
        for path in sorted(Path(d).rglob("results.json")):
            r = json.loads(path.read_text())
            if r.get("status") == "finished" and "synthetic" in r:
                runs.append(r)
    return runs


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def rows(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["method"], r["ipc"], r["model"])].append(r)
    full = [r["full"]["acc"] for r in runs if "full" in r]
    out = []
    for (method, ipc, model), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        out.append(
            {
                "method": method,
                "ipc": ipc,
                "model": model,
                "seeds": ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"])),
                "iterations": rs[0]["synthesis"]["iterations"],
                "lr": rs[0]["synthesis"].get("lr", "-"),
                "synthetic acc %": mean_std([r["synthetic"]["acc"] for r in rs]),
                "random real acc %": mean_std([r["random_real"]["acc"] for r in rs if "random_real" in r]),
                "full split acc %": mean_std(full),
                "synthesis s": f"{statistics.mean(r['synthesis']['seconds'] for r in rs):.1f}",
            }
        )
    return out


def markdown(table: list[dict]) -> str:
    if not table:
        return "no finished runs\n"
    keys = list(table[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in table]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--markdown")
    parser.add_argument("--csv")
    args = parser.parse_args(argv)
    table = rows(load(args.dirs))
    text = markdown(table)
    sys.stdout.write(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.csv and table:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)


if __name__ == "__main__":
    main()
