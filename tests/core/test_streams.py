"""Stream protocols: their windows, the Dirichlet class order, the camera's ring buffer, rdumb,
and the margin over the frozen model, on a small folder of real CIFAR-10 images."""

import json

import numpy as np
import pytest
import torch

from surgeon_core.bench.__main__ import main
from surgeon_core.bench.camera import run_camera
from surgeon_core.bench.continual import margins, run_stream
from surgeon_core.bench.streams import build_stream, dirichlet_order
from surgeon_core.data import load_cifar10
from surgeon_core.data.corruptions import corrupt
from surgeon_core.data.domains import open_domains
from surgeon_core.methods import args_for, get_method
from surgeon_core.models import cifar_resnet_by_name


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two corruptions in the stacked layout (five severities of the same 60 images)."""
    root = tmp_path_factory.mktemp("stacked")
    images, labels = load_cifar10("test", limit=60)
    for name in ("gaussian_noise", "contrast"):
        np.save(root / (name + ".npy"),
                np.concatenate([corrupt(images, name, s, seed=0) for s in range(1, 6)]))
    np.save(root / "labels.npy", np.tile(labels, 5))
    return open_domains(root)


def _runs_of(labels):
    return 1 + int(np.count_nonzero(labels[1:] != labels[:-1]))


def test_dirichlet_order_correlates_classes_more_as_alpha_shrinks():
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(0)
    sorted_runs = _runs_of(labels[dirichlet_order(labels, 0.0, rng)])
    runs = {a: _runs_of(labels[dirichlet_order(labels, a, np.random.default_rng(1))])
            for a in (0.01, 0.1, 1.0, 100.0)}
    shuffled = _runs_of(labels[np.random.default_rng(2).permutation(1000)])
    assert sorted_runs == 10
    assert runs[0.01] < runs[0.1] < runs[1.0] < runs[100.0] <= shuffled * 1.1
    for a in (0.0, 0.1, 100.0):   # always a permutation
        order = dirichlet_order(labels, a, np.random.default_rng(3))
        assert sorted(order.tolist()) == list(range(1000))


def test_protocol_windows(folder):
    long = build_stream("long", folder, 5, loops=3)
    assert [w.name for w in long.windows][:3] == ["1:gaussian_noise", "1:contrast",
                                                  "2:gaussian_noise"]
    assert {w.group for w in long.windows} == {"loop 1", "loop 2", "loop 3"}
    assert not np.array_equal(long.windows[0].rows, long.windows[2].rows)   # reordered visits
    gradual = build_stream("gradual", folder)
    assert [w.name for w in gradual.windows][:9] == ["gaussian_noise@%d" % s
                                                    for s in (1, 2, 3, 4, 5, 4, 3, 2, 1)]
    mixed = build_stream("mixed", folder, 5)
    assert len(mixed.windows) == 1 and len(mixed.windows[0]) == 120
    assert set(mixed.windows[0].block_ids[:30].tolist()) == {0, 1}   # domains interleave
    sched = build_stream("camera", folder, 5, schedule=[("clean", 20), ("contrast", 30),
                                                        ("clean", 10)])
    assert [(w.name, len(w)) for w in sched.windows] == [("clean", 20), ("contrast", 30),
                                                         ("clean#2", 10)]
    images, labels = sched.images(sched.windows[0], 0, 5)
    clean, clean_labels = load_cifar10("test")
    assert np.array_equal(labels, clean_labels[sched.windows[0].rows[:5]])
    assert np.array_equal(images, clean[sched.windows[0].rows[:5]])


@pytest.mark.parametrize("kwargs, message", [
    ({"protocol": "sideways"}, "protocol must be one of"),
    ({"protocol": "correlated", "alpha": -1.0}, "alpha must be >= 0"),
    ({"protocol": "long", "loops": 0}, "loops must be >= 1"),
    ({"protocol": "camera", "schedule": [("fog", 10)]}, "does not hold"),
    ({"protocol": "camera", "schedule": [("contrast", 999)]}, "there are 60"),
])
def test_bad_streams_are_refused(folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_stream(kwargs.pop("protocol"), folder, 5, **kwargs)


@pytest.fixture(scope="module")
def resnet20(resnet20_weights):
    return cifar_resnet_by_name("resnet20", resnet20_weights)


def test_long_runs_report_loops_and_margins(folder, resnet20):
    stream = build_stream("long", folder, 5, loops=2)
    runs = run_stream(resnet20, ["source", "bn"], stream, batch_size=20)
    source, bn = runs
    assert set(source.groups) == {"loop 1", "loop 2"} and len(source.errors) == 4
    assert source.errors["1:contrast"] == source.errors["2:contrast"]   # frozen: same each visit
    margin = margins(runs)["bn"]
    assert margin["1:contrast"] == pytest.approx(source.errors["1:contrast"]
                                                 - bn.errors["1:contrast"])


def test_rdumb_resets_its_method_every_n_steps(resnet20):
    method = get_method("rdumb")(resnet20, args_for("rdumb", method="tent", every=2))
    source = {k: v.clone() for k, v in method.model.state_dict().items()}
    x = torch.rand(8, 3, 32, 32)
    method.step(x)
    method.step(x)
    moved = any(not torch.equal(v, method.model.state_dict()[k]) for k, v in source.items())
    method.step(x)   # the third step starts from the source again
    assert moved and method.resets == 1 and method.steps == 3
    with pytest.raises(ValueError, match="itself"):
        args_for("rdumb", method="rdumb")


def test_camera_serves_every_frame_and_learns_from_the_latest(folder, resnet20):
    stream = build_stream("camera", folder, 5)
    run = run_camera("surgeon", resnet20, stream, batch_size=16, fresh_frames=8,
                     device=torch.device("cpu"))
    assert set(run.errors) == {"gaussian_noise", "contrast"}
    assert len(run.step_seconds) == 120 // 8 - 1   # every 8 frames once 16 are buffered
    with pytest.raises(ValueError, match="batch's own statistics"):
        run_camera("tent", resnet20, stream, 16, 8, torch.device("cpu"))


def test_stream_command_writes_the_protocol_and_its_margins(folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["stream", "--protocol", "correlated", "--alpha", "0", "--methods",
                 "source,bn", "--corruption-dir", str(folder.folder), "--batch-size", "20",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert report["meta"]["protocol"] == "correlated" and report["meta"]["alpha"] == 0.0
    assert set(report["margins_over_source"]["bn"]) == {"gaussian_noise", "contrast"}
    table = (out / "results.md").read_text()
    assert "worst vs source" in table and "Dirichlet alpha 0.0" in table
    code = main(["stream", "--protocol", "camera", "--methods", "tent", "--corruption-dir",
                 str(folder.folder), "--out", str(tmp_path / "cam")])
    assert code == 2 and "camera protocol" in capsys.readouterr().err
