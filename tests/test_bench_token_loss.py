"""scripts/bench_token_loss.py at tiny size: both variants run and are printed (timings are not asserted)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_token_loss.py"
TINY = ["--vocab", "64", "--tokens", "32", "--chunk-size", "10", "--reps", "1"]


def _main():
    spec = importlib.util.spec_from_file_location("bench_token_loss", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_prints_both_variants_and_the_ratio(capsys):
    rows = _main()([*TINY, "--in-process", "--kind", "jsd", "--dtype", "bf16"])
    out = capsys.readouterr().out
    assert [r["variant"] for r in rows] == ["naive", "chunked"]
    for name in ("naive", "chunked", "chunked/naive"):
        assert any(line.startswith(name) for line in out.splitlines())


@pytest.mark.slow
def test_cpu_memory_is_measured_in_subprocesses(capsys):
    rows = _main()(TINY)
    assert all(r["peak_mib"] is not None and r["time_s"] > 0 for r in rows)
    assert "n/a" not in capsys.readouterr().out
