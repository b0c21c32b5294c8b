"""The user's own model through the whole daemon: a fine-tuned torchvision classifier with its
class names, a python: factory, and every mistake refused at `config --check` with the fix."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from daemon.checkpoints import CheckpointError
from daemon.config import ConfigError
from daemon.control.client import ControlClient
from daemon.service import Daemon

from .running import FAST, Running, load_config, wait_for

NAMES = ["ok", "scratch", "dent", "crack"]
SYNTHETIC = "synthetic://?width=160&height=120&fps=200"


@pytest.fixture(scope="module")
def defects(tmp_path_factory):
    """A 4-class mobilenet_v3_small 'fine-tuned' by the user: weights as a training script saves
    them (wrapped, DataParallel prefixes) and a labels file."""
    from torchvision.models import mobilenet_v3_small

    folder = tmp_path_factory.mktemp("defects")
    torch.manual_seed(0)
    state = mobilenet_v3_small(num_classes=4).state_dict()
    torch.save({"epoch": 9, "model_state_dict": {"module." + k: v for k, v in state.items()}},
               folder / "defects.pt")
    (folder / "defects.txt").write_text("\n".join(NAMES) + "\n")
    return folder


def _settings(folder, *extra, uri=SYNTHETIC):
    return ["model.arch=torchvision:mobilenet_v3_small", "model.weights=%s" % (folder /
                                                                             "defects.pt"),
            "model.labels=%s" % (folder / "defects.txt"), "model.preprocess.crop=96",
            "source.uri=" + uri] + FAST + ["learner.batch_size=8", "learner.fresh_frames=4",
                                          "learner.min_batch_size=4"] + list(extra)


def _config(folder, *extra, uri=SYNTHETIC):
    return load_config(None, _settings(folder, *extra, uri=uri), environ={})


def test_a_torchvision_model_is_served_and_adapted_with_its_class_names(defects, tmp_path):
    predictions = tmp_path / "pred.jsonl"
    config = _config(defects, "memory.budget_mb=20", "output.predictions=%s" % predictions)
    with Running(config) as daemon:
        client = ControlClient(daemon.control.endpoint)
        wait_for(lambda: daemon.learner.steps >= 3, timeout=120)
        status = client.call("status")
        sub = client.subscribe(daemon.control.pub_endpoint, ["prediction"], 10.0)
        topic, message = next(sub)
        sub.close()
        saved = client.call("checkpoint.save", {"name": "after-three"})
        snap = daemon.snapshot()
    assert daemon.built.preprocessing.crop == 96 and daemon.serving.model.training is False
    assert status["model"]["builder"] == "torchvision:mobilenet_v3_small"
    assert status["model"]["num_classes"] == 4 and status["classes"] == NAMES
    assert status["prediction"]["name"] in NAMES
    assert topic == "prediction" and message["name"] in NAMES
    assert snap["cache_mb"] <= 20.0 and set(snap["classes"]) <= set(NAMES)
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert records and all(r["name"] == NAMES[r["class"]] for r in records)
    assert saved["model"]["builder"] == "torchvision:mobilenet_v3_small"

    again = Daemon(_config(defects, "checkpoints.resume=after-three"))
    assert again.ops.resumed_from == "after-three"
    exported = again.learner.export_state()["model"]
    assert all(torch.isfinite(v).all() for v in exported.values() if v.is_floating_point())


def test_a_checkpoint_of_another_model_is_refused_naming_both(defects):
    first = Daemon(_config(defects))
    first.ops.save_checkpoint("mobilenet")
    cifar = Daemon(load_config(None, ["source.uri=" + SYNTHETIC] + FAST
                               + ["checkpoints.resume=none"], environ={}))
    with pytest.raises(CheckpointError) as caught:
        cifar.ops.load_checkpoint("mobilenet")
    assert caught.value.code == "CONFLICT"
    assert "torchvision:mobilenet_v3_small (4 classes, 96 px" in str(caught.value)
    assert "cifar:resnet20 (10 classes, 32 px" in str(caught.value)


def test_a_folder_of_images_gets_class_names_in_the_predictions(defects, tmp_path):
    import cv2

    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        cv2.imwrite(str(frames / ("%03d.png" % i)), rng.integers(0, 255, (90, 120, 3), np.uint8))
    predictions = tmp_path / "pred.jsonl"
    config = _config(defects, "output.predictions=%s" % predictions, "learner.enabled=false",
                     uri="dir://%s" % frames)
    final = Daemon(config).run()
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert final["counters"]["frames"] == 12 and len(records) == 12
    assert {r["name"] for r in records} <= set(NAMES)


FACTORY = textwrap.dedent('''
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    def build(num_classes=10, width=32):
        torch.manual_seed(0)
        model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                  hidden_dim=width, mlp_dim=2 * width, num_classes=num_classes)
        torch.nn.init.normal_(model.heads.head.weight, std=0.5)
        return model

    def not_a_model(**kwargs):
        return "a string"
''')


@pytest.fixture(scope="module")
def factory_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("factory")
    (folder / "my_vits.py").write_text(FACTORY)
    return folder


def _python_model(factory_dir, *extra):
    return ["model.arch=python:my_vits:build", "model.python_path=[%s]" % factory_dir,
            "model.preprocess.crop=32", "model.kwargs={width: 32}"] + list(extra)


def test_a_layer_norm_model_from_a_factory_adapts_with_tent(factory_dir):
    config = load_config(None, ["source.uri=" + SYNTHETIC, "learner.method=tent"] + FAST
                         + _python_model(factory_dir), environ={})
    with Running(config) as daemon:
        wait_for(lambda: daemon.learner.steps >= 2, timeout=60)
        trained = [n for n, p in daemon.method.model.named_parameters() if p.requires_grad]
    assert daemon.built.builder == "python:my_vits:build(width=32)"
    assert trained and all(".ln" in n for n in trained)


def _check(*settings):
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "config"]
                          + [a for s in settings for a in ("--set", s)],
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_config_check_accepts_a_good_user_model(defects):
    code, out = _check(*_settings(defects))
    assert code == 0, out
    assert "torchvision:mobilenet_v3_small, 4 classes, input 96 px" in out


@pytest.mark.parametrize("change, expected", [
    (["model.arch=torchvision:mobilenetv3_small"], "Did you mean mobilenet_v3_small"),
    (["model.arch=mobilenet_v2"], "torchvision:mobilenet_v2"),
    (["model.arch=torchvision:fasterrcnn_resnet50_fpn"], "detection model"),
    (["model.labels=null"], "classifier.3.weight: file (4, 1024), model (1000, 1024)"),
    (["model.num_classes=5"], "num_classes is 5 but labels file"),
    (["model.weights=null"], "needs weights"),
    (["model.arch=torchvision:vit_b_16"], "do not fit VisionTransformer"),
])
def test_config_check_refuses_each_mistake_with_the_fix(defects, change, expected):
    code, out = _check(*(_settings(defects) + change))
    assert code == 2, out
    assert expected in out and "Traceback" not in out


def test_config_check_refuses_a_model_that_cannot_run_at_the_input_size(factory_dir):
    code, out = _check(*_python_model(factory_dir, "model.preprocess.crop=48"))
    assert code == 2 and "cannot run on a 48 x 48 input" in out and "Traceback" not in out


def test_config_check_refuses_a_factory_that_returns_no_model(factory_dir):
    code, out = _check(*(_python_model(factory_dir) + ["model.arch=python:my_vits:not_a_model"]))
    assert code == 2 and "returned str, not a torch.nn.Module" in out


def test_batch_statistics_methods_are_still_refused_for_batchnorm_models(defects):
    with pytest.raises(ConfigError, match="per-frame serving"):
        Daemon(_config(defects, "learner.method=tent"))


def test_surgeond_run_refuses_the_same_mistakes_at_start_with_exit_2(defects):
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--set",
                           "model.arch=torchvision:mobilenetv3_small"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Did you mean mobilenet_v3_small" in done.stderr
    assert "Traceback" not in done.stderr
