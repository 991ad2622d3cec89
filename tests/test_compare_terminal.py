"""kd-lab-compare in a terminal: an aligned ``rich`` table that fits the terminal, Markdown everywhere else."""

import re
import sys

from test_compare import write

from kd_lab.tools.compare import main, summarize, terminal_table


def a_survey(root) -> None:
    """Three methods on two students, a temperature sweep and a failed run: a table wider than 120 columns
    as Markdown."""
    for student in ("mlp_small_student", "cnn1d_tiny"):
        for algorithm, gain in (("none", 0.0), ("kd", 0.05), ("dkd", 0.07)):
            for seed in (0, 1):
                run = root / f"{student}-{algorithm}-{seed}"
                write(run, algorithm, seed, 0.6 + gain + 0.01 * seed, student=student, threads=2)
    write(root / "kd-t2", "kd", 0, 0.66, student="cnn1d_tiny", temperature=2.0, threads=2)
    write(root / "broken", "kd", 3, 0.0, status="failed")


def columns(header: str) -> list[str]:
    """A header line's column names: separated by two spaces or more."""
    return re.split(r"\s{2,}", header.strip())


def in_a_terminal(monkeypatch, columns: int) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", str(columns))  # what shutil.get_terminal_size reads first


def test_a_terminal_gets_an_aligned_table_that_fits_120_columns(tmp_path, monkeypatch, capsys):
    a_survey(tmp_path / "runs")
    in_a_terminal(monkeypatch, 120)
    assert main([str(tmp_path / "runs"), "--markdown", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert "|" not in out  # no Markdown pipes
    header = next(line for line in lines if line.startswith("student"))
    wide = ["student", "algorithm", "setting", "epochs", "threads", "best val", "last", "gain", "teacher", "seeds"]
    assert columns(header) == wide
    row = next(line for line in lines if line.startswith("cnn1d_tiny") and " dkd " in line)
    assert row.split()[2:] == ["-", "20", "2", "0.6750±0.0071", "0.6650±0.0071", "+0.0700", "0.9000", "2"]
    assert "All rows: data d, teacher t, scheme offline" in out
    assert "Runs not in the table:" in out and "runs/broken: failed: KDLabError: boom" in out
    assert (tmp_path / "t.md").read_text().count("|") > 100  # the file stays Markdown, every column


def test_a_pipe_gets_markdown(tmp_path, capsys):
    a_survey(tmp_path / "runs")
    assert main([str(tmp_path / "runs")]) == 0  # capsys' stdout is no terminal
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| data | teacher | student | algorithm | scheme | setting | epochs | threads |")


def test_a_narrow_terminal_drops_columns_before_it_wraps_names(tmp_path):
    a_survey(tmp_path / "runs")
    rows, problems = summarize(sorted((tmp_path / "runs").rglob("results.json")))
    text = terminal_table(rows, problems, width=90)
    assert max(len(line) for line in text.splitlines()) <= 90
    header = next(line for line in text.splitlines() if line.startswith("student"))
    assert columns(header) == ["student", "algorithm", "setting", "epochs", "threads", "best val", "gain", "seeds"]
    assert "More columns (last, teacher, agreement, parameter ratio, other models, wall time)" in text
    assert "mlp_small_st" in text  # a long name wraps, but not below 12 characters a line


def test_cells_are_printed_as_they_are_not_as_rich_markup(tmp_path):
    write(tmp_path / "kd0", "kd", 0, 0.7)
    write(tmp_path / "kd1", "kd", 0, 0.7, student="[bold]s")
    rows, problems = summarize(sorted(tmp_path.rglob("results.json")))
    assert "[bold]s" in terminal_table(rows, problems)
