"""The daemon with EcoTTA as its learner, and `surgeond config` checking the warm-up file."""

import subprocess
import sys

import pytest
import torch

from surgeon_core.bench.ecotta_warmup import WarmupSettings, warm_up
from surgeon_core.data import load_cifar10, to_tensor
from surgeon_core.models import cifar_resnet_by_name

from .running import Running, small_config, wait_for


@pytest.fixture(scope="module")
def warmup_path(tmp_path_factory, resnet20_weights):
    images, labels = load_cifar10("train", limit=128)
    out = tmp_path_factory.mktemp("ecotta") / "r20.pt"
    warm_up(cifar_resnet_by_name("resnet20", resnet20_weights), to_tensor(images),
            torch.from_numpy(labels), out, WarmupSettings(batch_size=32, max_iterations=4))
    return out


def test_the_daemon_adapts_with_ecotta(warmup_path):
    config = small_config("learner.method=ecotta", "learner.method_args={warmup: %s}"
                          % warmup_path)
    with Running(config) as daemon:
        wait_for(lambda: daemon.learner.steps >= 3)
        assert daemon.telemetry.gauges["cache_mb"] > 0
    assert all(bool(torch.isfinite(t).all()) for t in daemon.serving.model.state_dict().values()
               if t.is_floating_point())


def test_serving_starts_on_the_warm_up_statistics(warmup_path):
    """The frozen norms' statistics recalibrated by the warm-up, not the original's."""
    config = small_config("learner.method=ecotta", "learner.method_args={warmup: %s}"
                          % warmup_path, "learner.enabled=false")
    norms = torch.load(str(warmup_path), weights_only=True)["frozen_norms"]
    original = cifar_resnet_by_name("resnet20").state_dict()
    with Running(config) as daemon:
        wait_for(lambda: daemon.frames > 0)
        served = daemon.serving.model.state_dict()
    assert all(torch.equal(served[k], v) for k, v in norms.items())
    assert not torch.equal(served["partitions.0.0.bn1.running_mean"],
                           original["layer1.0.bn1.running_mean"])


def _check(*settings):
    args = [sys.executable, "-m", "daemon.cli", "config", "--set", "learner.method=ecotta"]
    for item in settings:
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_config_check_validates_the_warm_up_file(warmup_path):
    done = _check("learner.method_args={warmup: %s}" % warmup_path)
    assert done.returncode == 0, done.stderr
    done = _check("learner.method_args={warmup: %s}" % warmup_path, "model.arch=resnet56")
    assert done.returncode == 2 and "was made for resnet20" in done.stderr
    done = _check("learner.method_args={warmup: %s}" % warmup_path, "model.arch=resnet32")
    assert done.returncode == 2 and "no published weights" in done.stderr
    done = _check()
    assert done.returncode == 2 and "surgeon-bench ecotta-warmup" in done.stderr
