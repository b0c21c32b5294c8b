"""Shared fixtures: real data and weights from ../shared (skipped with a reason if absent)."""

import pytest

from surgeon_core import paths

try:   # the GStreamer lane runs the source tests with the system Python and no torch
    import torch
except ImportError:
    torch = None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and (torch is None or not torch.cuda.is_available()):
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    if torch is not None:
        torch.manual_seed(0)


@pytest.fixture(scope="session")
def resnet20_weights():
    from surgeon_core.models import default_weights_path

    path = default_weights_path("resnet20")
    if not path.is_file():
        pytest.fail("published ResNet-20 weights missing at %s: set %s" % (path, paths.SHARED_ENV))
    return path


@pytest.fixture(scope="session")
def cifar_test_small():
    """The first 256 CIFAR-10 test images as float NCHW in [0, 1], and their labels."""
    from surgeon_core.data import load_cifar10, to_tensor

    images, labels = load_cifar10("test", limit=256)
    return to_tensor(images), torch.from_numpy(labels)
