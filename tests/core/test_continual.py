import json
import os
import textwrap

import numpy as np
import pytest

from surgeon_core.bench.__main__ import main
from surgeon_core.data import load_cifar10
from surgeon_core.data.corruptions import corrupt
from surgeon_core.data.domains import open_domains
from surgeon_core.errors import DataNotFound


def test_continual_benchmark_writes_table_json_and_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path / "cache"))   # generated here, once
    out = tmp_path / "out"
    code = main(["continual", "--methods", "source,bn", "--limit", "20", "--batch-size", "10",
                 "--workers", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"source", "bn"} and len(rows["bn"]["errors"]) == 15
    assert report["meta"]["layout"] == "stacked" and report["meta"]["severity"] == 5
    assert (out / "error_vs_cache.png").stat().st_size > 1000
    assert (out / "error_along_stream.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| bn |" in table and "cache MiB max" in table and "mean keep" not in table
    assert "mean err" in capsys.readouterr().out


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """Three domains of the user's own, one severity per file (10 rows + labels)."""
    folder = tmp_path_factory.mktemp("mine")
    images, labels = load_cifar10("test", limit=10)
    for name in ("rainy_noise", "dim", "bright"):
        kind = {"rainy_noise": "gaussian_noise", "dim": "contrast", "bright": "brightness"}[name]
        np.save(folder / (name + ".npy"), corrupt(images, kind, 5, seed=0))
    np.save(folder / "labels.npy", labels)
    return folder


def _listing(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_users_folder_is_read_in_the_given_order_and_never_written(user_folder, tmp_path):
    before = _listing(user_folder)
    out = tmp_path / "out"
    code = main(["continual", "--methods", "source", "--corruption-dir", str(user_folder),
                 "--domains", "dim,rainy_noise", "--batch-size", "5", "--no-shuffle",
                 "--out", str(out)])
    assert code == 0 and _listing(user_folder) == before
    report = json.loads((out / "results.json").read_text())
    assert list(report["results"][0]["errors"]) == ["dim", "rainy_noise"]
    meta = report["meta"]
    assert meta["layout"] == "single" and meta["severity"] is None and meta["shuffle"] is False
    assert "| dim | rainy_noise |" in (out / "results.md").read_text()
    assert main(["continual", "--methods", "source", "--corruption-dir", str(user_folder),
                 "--limit", "4", "--out", str(out)]) == 0   # another limit: still fine
    assert _listing(user_folder) == before


def test_layouts_are_told_apart_by_the_labels(tmp_path):
    images, labels = load_cifar10("test", limit=10)
    np.save(tmp_path / "fog.npy", np.concatenate([images] * 5))
    np.save(tmp_path / "labels.npy", np.tile(labels, 5))
    stacked = open_domains(tmp_path)
    assert (stacked.layout, stacked.rows) == ("stacked", 10)
    np.save(tmp_path / "labels.npy", np.concatenate([labels] * 4 + [labels[::-1]]))
    single = open_domains(tmp_path)
    assert (single.layout, single.rows) == ("single", 50)


@pytest.mark.parametrize("problem, message", [
    ("missing", "has no domain snow"), ("shape", "must be uint8 images"),
    ("rows", "has 7 images but labels.npy has 10")])
def test_every_input_is_checked_before_any_work(user_folder, tmp_path, capsys, problem,
                                                message):
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in user_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    domains = "dim,snow" if problem == "missing" else "dim,bright"
    if problem == "shape":
        np.save(folder / "bright.npy", np.zeros((10, 32, 32), np.float32))
    if problem == "rows":
        np.save(folder / "bright.npy", np.zeros((7, 32, 32, 3), np.uint8))
    out = tmp_path / "out"
    code = main(["continual", "--methods", "source", "--corruption-dir", str(folder),
                 "--domains", domains, "--out", str(out)])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()   # refused before anything was written


def test_a_single_layout_folder_refuses_a_severity(user_folder, tmp_path, capsys):
    code = main(["continual", "--methods", "source", "--corruption-dir", str(user_folder),
                 "--severity", "3", "--out", str(tmp_path / "out")])
    assert code == 2 and "one severity per file" in capsys.readouterr().err


def test_continual_rejects_a_bad_option_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path / "empty-cache"))
    code = main(["continual", "--methods", "tent", "--set", "tent.lr=-1x", "--out",
                 str(tmp_path)])
    assert code == 2 and "tent.lr must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "empty-cache").exists()


FACTORY = textwrap.dedent('''
    from surgeon_core.models import resnet32

    def build(num_classes=10):
        return resnet32(num_classes=num_classes)
''')


def test_a_users_own_cifar_model_runs_from_a_factory_and_a_weights_file(user_folder, tmp_path):
    import torch

    from surgeon_core.models import resnet32

    (tmp_path / "my_models.py").write_text(FACTORY)
    torch.manual_seed(0)
    torch.save({"state_dict": resnet32().state_dict()}, tmp_path / "r32.pt")
    out = tmp_path / "out"
    code = main(["continual", "--model", "python:my_models:build", "--python-path",
                 str(tmp_path), "--weights", str(tmp_path / "r32.pt"), "--input-size", "32",
                 "--methods", "source,surgeon", "--corruption-dir", str(user_folder),
                 "--batch-size", "5", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert report["meta"]["model"] == "python:my_models:build"
    assert {r["method"] for r in report["results"]} == {"source", "surgeon"}


def test_labels_beyond_the_models_classes_are_refused(user_folder, tmp_path, capsys):
    code = main(["continual", "--model", "torchvision:resnet18", "--weights", "random",
                 "--num-classes", "3", "--input-size", "32", "--methods", "source",
                 "--corruption-dir", str(user_folder), "--out", str(tmp_path / "out")])
    assert code == 2 and "has 3 classes" in capsys.readouterr().err
    assert os.path.isdir(user_folder)


def test_open_domains_names_what_the_folder_holds(user_folder):
    with pytest.raises(DataNotFound, match="it holds: bright, dim, rainy_noise"):
        open_domains(user_folder, ["fog"])
