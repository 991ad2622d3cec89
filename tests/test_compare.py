import json
from pathlib import Path

from kd_lab.compare import main, summarize


def write(run: Path, algorithm: str, seed: int, acc: float, status: str = "finished", temperature: float = 4.0) -> None:
    run.mkdir(parents=True)
    names = {"data": "d", "teacher": "t", "student": "s", "algorithm": algorithm, "scheme": "offline"}
    metrics = {"test/acc": acc, "test/teacher_acc": 0.9, "test/agreement": acc}
    results = {
        "status": status,
        "names": names,
        "seed": seed,
        "config": {"seed": seed, "algorithm": {"name": algorithm, "temperature": temperature}},
        "best": metrics,
        "last": {**metrics, "test/acc": acc - 0.01},
        "params": {"student": 10, "teacher": 40},
        "wall_seconds": 2.0,
        "error": "KDLabError: boom" if status == "failed" else None,
    }
    (run / "results.json").write_text(json.dumps(results))


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
