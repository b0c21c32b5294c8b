import json

from surgeon_core.bench.__main__ import main


def test_continual_benchmark_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["continual", "--methods", "source,bn", "--limit", "20", "--batch-size", "10",
                 "--corruption-dir", str(tmp_path / "c10c"), "--workers", "1",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"source", "bn"} and len(rows["bn"]["errors"]) == 15
    assert (out / "error_vs_cache.png").stat().st_size > 1000
    assert (out / "error_along_stream.png").stat().st_size > 1000
    assert "| bn |" in (out / "results.md").read_text()
    assert "mean err" in capsys.readouterr().out


def test_continual_rejects_a_bad_option_before_any_work(tmp_path, capsys):
    code = main(["continual", "--methods", "tent", "--set", "tent.lr=-1x", "--out",
                 str(tmp_path)])
    assert code == 2
