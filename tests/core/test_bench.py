import json

from surgeon_core.bench.__main__ import main


def test_memory_benchmark_reports_every_configuration_with_ratios(capsys):
    code = main(["memory", "--arch", "resnet20", "--batch-size", "8", "--steps", "1",
                 "--budget-mb", "1.0", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["config"]: r for r in report["results"]}
    assert list(rows) == ["full", "tent", "surgeon", "surgeon-fp16", "surgeon-exactbn",
                          "surgeon+budget", "daemon"]
    assert rows["daemon"]["cache_bytes"] < rows["full"]["cache_bytes"] / 5
    assert rows["full"]["cache_ratio"] == 1.0 and rows["full"]["time_ratio"] == 1.0
    assert rows["surgeon"]["cache_bytes"] < rows["full"]["cache_bytes"] / 5
    assert rows["surgeon+budget"]["cache_bytes"] <= 2**20
    assert report["meta"]["device"].startswith("cpu")
    assert report["meta"]["model"] == "cifar:resnet20"


def test_memory_benchmark_measures_the_users_model_with_its_breakdown(capsys):
    code = main(["memory", "--model", "torchvision:mobilenet_v3_small", "--weights", "random",
                 "--num-classes", "4", "--input-size", "64", "--batch-size", "4", "--steps", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "torchvision:mobilenet_v3_small at 64 px, batch 4" in out
    assert "hardswish/input_grad" in out and "| surgeon-fp16 |" in out


def test_memory_benchmark_rejects_a_bad_budget(capsys):
    assert main(["memory", "--batch-size", "4", "--steps", "1", "--budget-mb", "-1"]) == 2
    assert "budget" in capsys.readouterr().err


def test_a_cifar_model_without_published_weights_names_the_option(capsys):
    assert main(["memory", "--model", "resnet32", "--batch-size", "4", "--steps", "1"]) == 2
    assert "--weights" in capsys.readouterr().err
