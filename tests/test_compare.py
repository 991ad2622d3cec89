import csv
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from kd_lab.tools.compare import main, summarize


def write(
    run: Path,
    algorithm: str,
    seed: int,
    acc: float,
    status: str = "finished",
    temperature: float = 4.0,
    student: str = "s",
    student_params: int = 10,
    epochs: int | None = 20,
    threads: int | None = None,
) -> None:
    """A tiny results.json; ``epochs`` is trainer.max_epochs, ``threads`` the top-level field (None: left out,
    as in files written before it was recorded)."""
    run.mkdir(parents=True)
    names = {"data": "d", "teacher": "t", "student": student, "algorithm": algorithm, "scheme": "offline"}
    metrics = {"test/acc": acc, "test/teacher_acc": 0.9, "test/agreement": acc}
    results = {
        "status": status,
        "names": names,
        "seed": seed,
        "config": {"seed": seed, "algorithm": {"name": algorithm, "temperature": temperature}},
        "best": metrics,
        "last": {**metrics, "test/acc": acc - 0.01},
        "params": {"student": student_params, "teacher": 40},
        "wall_seconds": 2.0,
        "error": "KDLabError: boom" if status == "failed" else None,
    }
    if epochs is not None:
        results["config"]["trainer"] = {"max_epochs": epochs}
    if threads is not None:
        results["threads"] = threads
    (run / "results.json").write_text(json.dumps(results))


def edit(run: Path, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to a written run's results.json."""
    path = run / "results.json"
    results = json.loads(path.read_text())
    change(results)
    path.write_text(json.dumps(results))


def test_groups_seeds_and_computes_gain_and_lists_failures(tmp_path, capsys):
    for seed, acc in enumerate([0.70, 0.72, 0.74]):
        write(tmp_path / f"kd{seed}", "kd", seed, acc)
    for seed, acc in enumerate([0.60, 0.62]):
        write(tmp_path / f"none{seed}", "none", seed, acc)
    write(tmp_path / "kd_t2", "kd", 0, 0.5, temperature=2.0)
    write(tmp_path / "broken", "kd", 3, 0.0, status="failed")
    rows, problems = summarize(sorted(tmp_path.rglob("results.json")))
    kd = next(r for r in rows if r["algorithm"] == "kd" and r["seeds"] == 3)
    assert abs(kd["acc_best"] - 0.72) < 1e-9 and abs(kd["std_best"] - 0.02) < 1e-9
    assert abs(kd["acc_last"] - 0.71) < 1e-9
    assert abs(kd["gain_best"] - (0.72 - 0.61)) < 1e-9
    assert kd["param_ratio"] == 0.25 and kd["setting"] == "algorithm.temperature=4.0"
    assert len(rows) == 3  # kd T=4, kd T=2, none
    assert problems == [(str(tmp_path / "broken"), "failed: KDLabError: boom")]
    assert main([str(tmp_path), "--csv", str(tmp_path / "t.csv"), "--markdown", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    assert "0.7200 ± 0.0200" in out and "Runs not in the table" in out and "broken" in out
    assert (tmp_path / "t.csv").read_text().startswith("data,teacher,student,algorithm,scheme")
    assert (tmp_path / "t.md").read_text().strip() == out.strip()


def two_students_two_methods(root: Path) -> None:
    for student, size, base in (("small", 10, 0.60), ("large", 1000, 0.70)):
        for algorithm, gain in (("none", 0.0), ("kd", 0.05)):
            for seed in (0, 1):
                acc = base + gain + 0.01 * seed
                run = root / f"{student}-{algorithm}-{seed}"
                write(run, algorithm, seed, acc, student=student, student_params=size)
    write(root / "broken", "kd", 3, 0.0, status="failed")


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_next_to_the_markdown_and_in_a_plots_dir(tmp_path):
    two_students_two_methods(tmp_path / "runs")
    assert main([str(tmp_path / "runs"), "--markdown", str(tmp_path / "out" / "table.md")]) == 0
    for name in ("table_accuracy_by_method.png", "table_accuracy_vs_student_size.png"):
        assert is_png(tmp_path / "out" / name), name
    assert main([str(tmp_path / "runs"), "--plots", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "accuracy_by_method.png",
        "accuracy_vs_student_size.png",
    ]
    assert all(is_png(p) for p in (tmp_path / "plots").iterdir())
    rows, _ = summarize(sorted((tmp_path / "runs").rglob("results.json")))
    assert sorted({(r["student"], r["student_params"]) for r in rows}) == [("large", 1000), ("small", 10)]


def test_wandb_offline_run_holds_the_table_and_the_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    two_students_two_methods(tmp_path / "runs")
    args = [str(tmp_path / "runs"), "--plots", str(tmp_path / "plots"), "--wandb", "--wandb-group", "g"]
    assert main(args) == 0
    (run,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    (table,) = run.glob("files/media/table/comparison_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"][:5] == ["data", "teacher", "student", "algorithm", "scheme"]
    assert sorted((r[2], r[3]) for r in logged["data"]) == [
        ("large", "kd"),
        ("large", "none"),
        ("small", "kd"),
        ("small", "none"),
    ]
    acc = logged["columns"].index("acc_best")
    assert sorted(round(r[acc], 4) for r in logged["data"]) == [0.605, 0.655, 0.705, 0.755]
    (missing,) = run.glob("files/media/table/not_in_table_*.table.json")
    assert json.loads(missing.read_text())["data"] == [[str(tmp_path / "runs" / "broken"), "failed: KDLabError: boom"]]
    assert len(list(run.glob("files/media/images/plots/*.png"))) == 2


def test_other_models_and_chain_stages_are_reported(tmp_path):
    for seed, (peer, ensemble) in enumerate([(0.50, 0.60), (0.54, 0.64)]):
        write(tmp_path / f"codist{seed}", "codistillation", seed, 0.55)

        def others(results: dict, peer=peer, ensemble=ensemble, seed=seed) -> None:
            results["best"].update({"peer1/test/acc": peer, "ensemble/test/acc": ensemble})
            results["chain"] = [{"stage": "gen0-s", "metrics": {"test/acc": 0.4 + seed / 10}}]

        edit(tmp_path / f"codist{seed}", others)
    (row,) = summarize(sorted(tmp_path.rglob("results.json")))[0]
    assert row["others"] == "peer1 0.5200±0.0283, ensemble 0.6200±0.0283, stage gen0-s 0.4500±0.0707"


def test_self_distillation_rows_gain_over_the_vanilla_student(tmp_path):
    for seed, acc in enumerate([0.60, 0.62]):
        write(tmp_path / f"none{seed}", "none", seed, acc)
        write(tmp_path / f"byot{seed}", "byot", seed, acc + 0.05)
        edit(tmp_path / f"byot{seed}", lambda results: results["names"].pop("teacher"))  # scheme=self: no teacher
    rows, _ = summarize(sorted(tmp_path.rglob("results.json")))
    byot = next(r for r in rows if r["algorithm"] == "byot")
    assert byot["teacher"] == "-" and abs(byot["gain_best"] - 0.05) < 1e-9


def test_speed_switches_and_data_serving_do_not_split_a_method(tmp_path):
    """perf.* and data.serve/num_workers/... leave the math alone: runs differing only there are one row."""
    write(tmp_path / "kd0", "kd", 0, 0.70)
    write(tmp_path / "kd1", "kd", 1, 0.72)
    for name, extra in (("kd0", {"perf": {"cache_teacher": True}}), ("kd1", {"data": {"serve": "tensors"}})):
        edit(tmp_path / name, lambda results, extra=extra: results["config"].update(extra))
    rows, _ = summarize(sorted(tmp_path.rglob("results.json")))
    assert len(rows) == 1 and rows[0]["seeds"] == 2 and rows[0]["setting"] == "-"


def test_a_group_seed_that_follows_the_run_seed_does_not_split_a_method(tmp_path):
    """GKD's ``algorithm.seed: ${seed}`` resolves to each run's seed: the seeds are replicates of one row.
    A group seed fixed apart from the run's seed is a setting."""
    for seed in (0, 1):
        write(tmp_path / f"gkd{seed}", "gkd", seed, 0.70)
        edit(tmp_path / f"gkd{seed}", lambda results, seed=seed: results["config"]["algorithm"].update(seed=seed))
    rows, _ = summarize(sorted(tmp_path.rglob("results.json")))
    assert len(rows) == 1 and rows[0]["seeds"] == 2 and rows[0]["setting"] == "-"
    edit(tmp_path / "gkd1", lambda results: results["config"]["algorithm"].update(seed=7))
    rows, _ = summarize(sorted(tmp_path.rglob("results.json")))
    assert len(rows) == 2 and "algorithm.seed=7" in {r["setting"] for r in rows}


def test_a_fixed_group_seed_equal_to_one_run_seed_does_not_split_a_method(tmp_path):
    """``teacher.seed: 0`` in runs of seeds 0, 1, 2 is one setting, though it equals the seed of run 0."""
    for seed in (0, 1, 2):
        write(tmp_path / f"kd{seed}", "kd", seed, 0.70)
        edit(tmp_path / f"kd{seed}", lambda results: results["config"].update(teacher={"seed": 0}))
    rows, _ = summarize(sorted(tmp_path.rglob("results.json")))
    assert len(rows) == 1 and rows[0]["seeds"] == 3 and rows[0]["setting"] == "-"


def age(run: Path, seconds_ago: float) -> None:
    """Set the modification time of a run's results.json: the rule for repeats keeps the newest."""
    stamp = time.time() - seconds_ago
    os.utime(run / "results.json", (stamp, stamp))


def test_a_seed_run_several_times_counts_once_with_its_latest_run(tmp_path, capsys):
    """Seeds 0 and 1, run 7 times in all: 2 seeds, not 7; each seed's latest finished run is the one kept."""
    runs = [(0, 0.70, 50), (0, 0.90, 10), (0, 0.10, 40), (1, 0.72, 30), (1, 0.60, 60), (1, 0.62, 70), (1, 0.64, 80)]
    for i, (seed, acc, seconds_ago) in enumerate(runs):
        write(tmp_path / f"kd{i}", "kd", seed, acc)
        age(tmp_path / f"kd{i}", seconds_ago)
    write(tmp_path / "kd_failed", "kd", 0, 0.0, status="failed")  # the newest, but not finished: not kept
    (row,) = summarize(sorted(tmp_path.rglob("results.json")))[0]
    assert row["seeds"] == 2 and row["repeats_dropped"] == 5
    assert abs(row["acc_best"] - (0.90 + 0.72) / 2) < 1e-9
    assert row["repeats_note"] == "seed 0: 3 runs; seed 1: 4 runs"
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Repeated seeds: each seed counts once, with its latest finished run" in out
    assert "kd (offline), s ← t on d, 20 epochs, - threads: 5 dropped (seed 0: 3 runs; seed 1: 4 runs)" in out
    assert out.splitlines()[4].endswith("| 2 |")  # the seeds column of the one row


def test_no_repeats_means_no_repeat_note(tmp_path, capsys):
    write(tmp_path / "kd0", "kd", 0, 0.70)
    write(tmp_path / "kd1", "kd", 1, 0.72)
    (row,) = summarize(sorted(tmp_path.rglob("results.json")))[0]
    assert row["seeds"] == 2 and row["repeats_dropped"] == 0 and row["repeats_note"] is None
    assert main([str(tmp_path)]) == 0
    assert "Repeated seeds" not in capsys.readouterr().out


def rows_by(rows: list[dict], **match) -> dict:
    (row,) = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return row


def test_gain_only_against_a_vanilla_run_of_the_same_epoch_budget(tmp_path, capsys):
    """+0.277 for a 300-epoch run over a 20-epoch baseline measured the budget: the gain is '-' with a note."""
    write(tmp_path / "kd300", "kd", 0, 0.887, epochs=300)
    write(tmp_path / "none20", "none", 0, 0.610, epochs=20)
    rows, _ = summarize(sorted(tmp_path.rglob("results.json")))
    kd = rows_by(rows, algorithm="kd")
    assert kd["epochs"] == 300 and kd["gain_best"] is None
    assert kd["gain_note"] == "no vanilla run with 300 epochs (vanilla: 20 epochs)"
    assert rows_by(rows, algorithm="none")["gain_best"] == 0.0
    assert main([str(tmp_path), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "+0.2770" not in out
    assert "| d | t | s | kd | offline | - | 300 | - | 0.8870 ± 0.0000 | 0.8770 ± 0.0000 | - |" in out
    assert "- kd (offline), s ← t on d, 300 epochs, - threads: no vanilla run with 300 epochs (vanilla: 20" in out
    with (tmp_path / "t.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["algorithm"], r["epochs"], r["gain_best"]) for r in table] == [("kd", "300", ""), ("none", "20", "0.0")]

    write(tmp_path / "none300", "none", 0, 0.800, epochs=300)  # the baseline of the same budget: a gain
    kd = rows_by(summarize(sorted(tmp_path.rglob("results.json")))[0], algorithm="kd")
    assert abs(kd["gain_best"] - 0.087) < 1e-9 and kd["gain_note"] is None


def test_the_epochs_and_threads_columns_are_there_when_every_row_has_the_same(tmp_path, capsys):
    write(tmp_path / "kd0", "kd", 0, 0.70)
    assert main([str(tmp_path), "--csv", str(tmp_path / "t.csv")]) == 0
    header = capsys.readouterr().out.splitlines()[2]
    assert "| setting | epochs | threads |" in header
    assert (tmp_path / "t.csv").read_text().startswith("data,teacher,student,algorithm,scheme,setting,epochs,threads,")


def test_gain_needs_the_same_setting_apart_from_the_method(tmp_path):
    write(tmp_path / "kd", "kd", 0, 0.70)
    write(tmp_path / "none", "none", 0, 0.60)
    edit(tmp_path / "none", lambda results: results["config"].update({"optim": {"lr": 0.1}}))
    kd = rows_by(summarize(sorted(tmp_path.rglob("results.json")))[0], algorithm="kd")
    assert kd["gain_best"] is None and kd["gain_note"] == "the vanilla runs differ in optim.lr"


def test_without_any_vanilla_run_the_gain_note_says_so(tmp_path):
    write(tmp_path / "kd", "kd", 0, 0.70)
    (row,) = summarize(sorted(tmp_path.rglob("results.json")))[0]
    assert row["gain_best"] is None and row["gain_note"] == "no vanilla run (algorithm none) of s on d"


def test_runs_of_different_thread_counts_are_not_pooled(tmp_path, capsys):
    write(tmp_path / "kd_1t", "kd", 0, 0.70, threads=1)
    write(tmp_path / "kd_4t", "kd", 1, 0.72, threads=4)
    write(tmp_path / "kd_old", "kd", 2, 0.74)  # written before results.json recorded threads
    write(tmp_path / "none_1t", "none", 0, 0.60, threads=1)
    rows, _ = summarize(sorted(tmp_path.rglob("results.json")))
    kd = {r["threads"]: r for r in rows if r["algorithm"] == "kd"}
    assert sorted(kd, key=str) == [1, 4, None] and all(r["seeds"] == 1 for r in kd.values())
    assert abs(kd[1]["gain_best"] - 0.10) < 1e-9
    assert kd[4]["gain_best"] is None and kd[4]["gain_note"] == "no vanilla run with 4 threads (vanilla: 1 threads)"
    assert kd[None]["gain_note"] == "no vanilla run with - threads (vanilla: 1 threads)"
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| kd | offline | - | 20 | 4 | 0.7200 ± 0.0000 |" in out
    assert "| kd | offline | - | 20 | - | 0.7400 ± 0.0000 |" in out


def test_the_thread_count_is_a_column_not_a_setting(tmp_path):
    """The config key ``threads`` does not show in "setting"; without the results.json field it gives the count."""
    write(tmp_path / "kd_1t", "kd", 0, 0.70, threads=1)
    write(tmp_path / "kd_2t", "kd", 0, 0.72)
    edit(tmp_path / "kd_1t", lambda results: results["config"].update({"threads": 1}))
    edit(tmp_path / "kd_2t", lambda results: results["config"].update({"threads": 2}))  # no top-level field
    rows, _ = summarize(sorted(tmp_path.rglob("results.json")))
    assert [(r["threads"], r["setting"], r["seeds"]) for r in rows] == [(1, "-", 1), (2, "-", 1)]
