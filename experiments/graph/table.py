"""The summary table of experiments/graph/run.sh: per setting, the MLP alone, the GCN teacher and the distilled
MLP (GLNN), test accuracy mean ± std over the seeds, at the epoch of best validation accuracy.

    python experiments/graph/table.py <run.sh's output dir> > experiments/graph/results.md

kd-lab-compare groups runs by their settings, and teacher.seed differs by seed here (each seed has its own
GCN), so it lists one row per seed (results_runs.md); this script averages over them.
"""

import json
import statistics
import sys
from pathlib import Path


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def main(root: Path) -> None:
    runs: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(root.glob("*/*/results.json")):
        r = json.loads(path.read_text())
        if r.get("status") == "finished":
            runs.setdefault((r["config"]["data"]["name"], r["config"]["algorithm"]["name"]), []).append(r)
    print("| data | setting | MLP alone (algorithm=none) | GCN teacher | GLNN MLP (algorithm=glnn) | seeds |")
    print("|---|---|---|---|---|---|")
    for data in sorted({d for d, _ in runs}):
        none, glnn = runs.get((data, "none"), []), runs.get((data, "glnn"), [])
        setting = glnn[0]["config"]["data"]["setting"] if glnn else "?"
        teacher = [r["best"]["test/teacher_acc"] for r in glnn]
        cells = [mean_std([r["best"]["test/acc"] for r in rs]) if rs else "-" for rs in (none, glnn)]
        seeds = sorted({r["seed"] for r in none + glnn})
        print(f"| {data} | {setting} | {cells[0]} | {mean_std(teacher) if teacher else '-'} | {cells[1]} | {seeds} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
