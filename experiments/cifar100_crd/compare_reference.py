"""Line up kd-lab's CIFAR-100 results with the published CRD/RepDistiller table (``reference.csv``).

    kd-lab-compare logs/cifar100_crd --csv table.csv
    python experiments/cifar100_crd/compare_reference.py table.csv [--protocol last|best] [--markdown gap.md]

Each row of kd-lab-compare's CSV with data=cifar100 and an algorithm the reference has (none, kd, fitnet,
attention, sp, rkd, pkt, crd, crd_kd; dkd against mdistiller) becomes one line: our test accuracy in % (mean ± std over
seeds) at the chosen protocol, the reference, and the gap. RepDistiller reports the LAST epoch of one run per
cell (the CRD paper: mean of 5 / 3 runs), mdistiller the BEST epoch, mean of 5; our ``best`` protocol is the
epoch of best *validation* accuracy, never test. The teachers' accuracies are compared on the same lines.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def percent(value: str | None) -> float | None:
    return None if value in (None, "", "None") else 100 * float(value)


def compare(table: list[dict[str, str]], reference: list[dict[str, str]], protocol: str) -> list[dict]:
    published = {(r["teacher"], r["student"], r["algorithm"]): r for r in reference if r["algorithm"]}
    lines = []
    for row in table:
        if row.get("data") != "cifar100":
            continue
        pair = (row["teacher"], row["student"])
        ref = published.get((*pair, row["algorithm"]))
        ours, std = percent(row[f"acc_{protocol}"]), percent(row[f"std_{protocol}"])
        teacher_ref = published.get((*pair, "teacher"))
        lines.append(
            {
                "teacher": pair[0],
                "student": pair[1],
                "algorithm": row["algorithm"],
                "setting": row.get("setting", "-"),
                "ours": ours,
                "std": std,
                "seeds": int(row["seeds"]),
                "reference": float(ref["top1"]) if ref else None,
                "reference_protocol": ref["protocol"] if ref else None,
                "gap": ours - float(ref["top1"]) if ref else None,
                "teacher_ours": percent(row.get("teacher_acc")),
                "teacher_reference": float(teacher_ref["top1"]) if teacher_ref else None,
            }
        )
    return sorted(lines, key=lambda r: (r["teacher"], r["student"], r["algorithm"]))


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(lines: list[dict], protocol: str) -> str:
    out = [
        f"Top-1 test accuracy (%) on CIFAR-100, ours at the {protocol} epoch (mean ± std over seeds) against "
        "reference.csv.",
        "",
        "| teacher | student | algorithm | setting | ours | seeds | reference | ref. protocol | gap | teacher ours "
        "| teacher ref. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in lines:
        out.append(
            f"| {r['teacher']} | {r['student']} | {r['algorithm']} | {r['setting']} | {fmt(r['ours'])} ± "
            f"{fmt(r['std'])} | {r['seeds']} | {fmt(r['reference'])} | {r['reference_protocol'] or '-'} "
            f"| {fmt(r['gap'], '+.2f')} | {fmt(r['teacher_ours'])} | {fmt(r['teacher_reference'])} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", type=Path, help="the CSV written by kd-lab-compare --csv")
    parser.add_argument("--reference", type=Path, default=HERE / "reference.csv")
    parser.add_argument("--protocol", choices=("last", "best"), default="last", help="RepDistiller reports last")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="also write the lines as JSON here")
    args = parser.parse_args(argv)
    for path in (args.table, args.reference):
        if not path.is_file():
            print(f"{path} does not exist (write the table with: kd-lab-compare <runs> --csv {path})", file=sys.stderr)
            return 1
    lines = compare(read_csv(args.table), read_csv(args.reference), args.protocol)
    if not lines:
        print(f"{args.table} has no cifar100 rows", file=sys.stderr)
        return 1
    text = markdown(lines, args.protocol)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(lines, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
