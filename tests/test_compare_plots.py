"""kd-lab-compare's plots: what a reader needs is on them, and nothing on them suggests what is not there."""

from pathlib import Path

from matplotlib.container import BarContainer
from test_compare import write

from kd_lab.tools.compare import main, summarize
from kd_lab.tools.compare_plots import accuracy_by_method_figure, accuracy_vs_student_size_figure, family


def rows_of(root: Path) -> list[dict]:
    return summarize(sorted(root.rglob("results.json")))[0]


def one_student(root: Path) -> None:
    for algorithm, acc in (("none", 0.60), ("fitnet", 0.62), ("dkd", 0.70), ("kd", 0.66)):
        for seed, delta in ((0, -0.01), (1, 0.01)):
            write(root / f"{algorithm}{seed}", algorithm, seed, acc + delta)


def test_methods_are_sorted_with_values_error_bars_and_labelled_reference_lines(tmp_path):
    one_student(tmp_path)
    (ax,) = accuracy_by_method_figure(rows_of(tmp_path)).axes
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    heights = [round(p.get_height(), 4) for p in bars.patches]
    assert heights == [0.70, 0.66, 0.62]  # best first; the vanilla student is a line, not a bar
    assert [t.get_text() for t in ax.get_xticklabels()] == ["dkd", "kd", "fitnet"]
    assert [t.get_text() for t in ax.texts] == ["0.700", "0.660", "0.620"]  # the values on the bars
    (segments,) = [c.get_segments() for c in bars.errorbar.lines[2]]
    assert [round(s[1][1] - s[0][1], 4) for s in segments] == [0.0283] * 3  # 2 std over the two seeds
    lines = {line.get_label(): line.get_ydata()[0] for line in ax.lines if line.get_label().startswith(("v", "t"))}
    assert lines == {"vanilla student 0.600": 0.60, "teacher 0.900": 0.9}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["vanilla student 0.600", "teacher 0.900"]
    assert ax.get_ylim() == (0.0, 1.0)  # from 0: a bar's height is proportional to its accuracy


def test_budgets_get_their_own_panels_and_no_foreign_reference_line(tmp_path):
    one_student(tmp_path)
    write(tmp_path / "kd300", "kd", 0, 0.88, epochs=300)
    axes = accuracy_by_method_figure(rows_of(tmp_path)).axes
    titles = [ax.get_title() for ax in axes]
    assert titles == ["s ← t (d), 20 epochs", "s ← t (d), 300 epochs"]
    labels = [line.get_label() for line in axes[1].lines if not line.get_label().startswith("_")]
    assert labels == ["teacher 0.900"]  # the 20-epoch vanilla student is no reference for 300 epochs


def test_the_size_plot_is_skipped_for_one_student_with_a_note(tmp_path, capsys):
    one_student(tmp_path / "runs")
    stale = tmp_path / "plots" / "accuracy_vs_student_size.png"
    stale.parent.mkdir()
    stale.write_bytes(b"an older table's plot")
    assert main([str(tmp_path / "runs"), "--plots", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy_by_method.png"]
    err = capsys.readouterr().err
    assert "plot skipped: accuracy vs student size for d, teacher t, 20 epochs: one student (s); it needs two" in err


def test_the_size_plot_joins_points_only_within_one_architecture(tmp_path):
    students = (("mlp_small", 10, 0.60), ("mlp_medium", 100, 0.65), ("cnn1d_tiny", 50, 0.70))
    for student, size, acc in students:
        for algorithm, gain in (("none", 0.0), ("kd", 0.03)):
            write(tmp_path / f"{student}-{algorithm}", algorithm, 0, acc + gain, student=student, student_params=size)
    figure, notes = accuracy_vs_student_size_figure(rows_of(tmp_path))
    assert notes == []
    (ax,) = [a for a in figure.axes if a.get_xscale() == "log"]
    data = [line for line in ax.lines if line.get_marker() != "_"]  # not the error bars' caps
    joined = sorted(tuple(line.get_xdata()) for line in data if line.get_linestyle() != "None")
    assert joined == [(10, 100), (10, 100)]  # kd and none through the two MLPs; the CNN joins nothing
    markers = {tuple(line.get_xdata()): line.get_marker() for line in data}
    assert markers[(10, 100)] != markers[(50,)]
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["kd", "none", "cnn1d", "mlp"]  # methods by colour, families by marker


def test_student_families():
    names = ("resnet20", "resnet8x4", "wrn_16_2", "mlp_small", "cnn1d_tiny", "gpt2_student", "MobileNetV2")
    assert [family(n) for n in names] == ["resnet", "resnet", "wrn", "mlp", "cnn1d", "gpt", "MobileNetV"]


def test_many_methods_lie_flat_and_a_diverged_one_is_cut_with_its_value(tmp_path):
    """Ten methods: horizontal bars, best on top. A lower-is-better run far off scale (ppl 1300 against
    about 100) is drawn at the axis end with its value printed, so it does not flatten the others."""
    ppl = {f"m{i}": 100.0 + i for i in range(9)} | {"bad": 1300.0}
    for algorithm, value in ppl.items():
        write(tmp_path / algorithm, algorithm, 0, value)
    rows = rows_of(tmp_path)
    for r in rows:
        r["metric"] = "ppl"
    (ax,) = accuracy_by_method_figure(rows).axes
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["m0", "m1"]  # the lowest ppl on top
    widths = [p.get_width() for p in bars.patches]
    assert widths[:9] == [100.0 + i for i in range(9)]
    assert widths[-1] < 200 and ax.texts[-1].get_text() == "1300.000 (off scale)"
    assert ax.get_xlim()[0] == 0.0  # from 0: a bar's length is proportional to its value


def test_flat_panels_are_as_tall_as_their_bars_and_different_teachers_read_as_a_mean(tmp_path):
    """A one-bar panel next to a ten-bar one is drawn smaller, not stretched to the same height. A panel whose
    rows had different teachers (peers, a chain's earlier stage) labels its line as their mean."""
    for i in range(10):
        write(tmp_path / f"m{i}", f"m{i}", 0, 0.50 + 0.01 * i)
    write(tmp_path / "kd300", "kd", 0, 0.70, epochs=300)
    write(tmp_path / "dkd300", "dkd", 0, 0.72, epochs=300)
    rows = rows_of(tmp_path)
    for r in rows:
        if r["algorithm"] == "dkd":
            r["teacher_acc"] = 0.8
    axes = {ax.get_title(): ax for ax in accuracy_by_method_figure(rows).axes}
    many, few = axes["s ← t (d), 20 epochs"], axes["s ← t (d), 300 epochs"]
    assert few.get_position().height < 0.6 * many.get_position().height  # 2 bars against 10
    labels = [line.get_label() for line in few.lines if not line.get_label().startswith("_")]
    assert labels == ["teachers' mean 0.850"]
    assert [line.get_label() for line in many.lines if not line.get_label().startswith("_")] == ["teacher 0.900"]
