import json

from surgeon_core.bench.__main__ import main


def test_memory_benchmark_reports_every_configuration_with_ratios(capsys):
    code = main(["memory", "--arch", "resnet20", "--batch-size", "8", "--steps", "1",
                 "--budget-mb", "1.0", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["config"]: r for r in report["results"]}
    assert list(rows) == ["full", "tent", "surgeon", "surgeon-exactbn", "surgeon+budget"]
    assert rows["full"]["cache_ratio"] == 1.0 and rows["full"]["time_ratio"] == 1.0
    assert rows["surgeon"]["cache_bytes"] < rows["full"]["cache_bytes"] / 5
    assert rows["surgeon+budget"]["cache_bytes"] <= 2**20
    assert report["meta"]["device"].startswith("cpu")


def test_memory_benchmark_rejects_a_bad_budget(capsys):
    assert main(["memory", "--batch-size", "4", "--steps", "1", "--budget-mb", "-1"]) == 2
    assert "budget" in capsys.readouterr().err
