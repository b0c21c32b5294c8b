import numpy as np
import pytest
import torch

from surgeon_core.data import load_cifar10, to_tensor
from surgeon_core.data.cifar10c import build_cifar10c, load_corruption
from surgeon_core.data.corruptions import CORRUPTIONS, corrupt
from surgeon_core.errors import DataNotFound
from surgeon_core.models import cifar_resnet_by_name


@pytest.fixture(scope="module")
def clean():
    images, labels = load_cifar10("test", limit=256)
    return images, torch.from_numpy(labels)


@pytest.fixture(scope="module")
def resnet20(resnet20_weights):
    return cifar_resnet_by_name("resnet20", resnet20_weights)


def _error(model, images, labels):
    with torch.no_grad():
        return 100.0 * float((model(to_tensor(images)).argmax(1) != labels).float().mean())


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_5_raises_resnet20_error_well_above_clean(name, clean, resnet20):
    images, labels = clean
    clean_error = _error(resnet20, images, labels)
    corrupted = corrupt(images, name, 5, seed=0)
    assert corrupted.shape == images.shape and corrupted.dtype == np.uint8
    assert _error(resnet20, corrupted, labels) >= clean_error + 4.0


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_generator_is_deterministic_by_seed(name, clean):
    images = clean[0][:16]
    assert np.array_equal(corrupt(images, name, 3, seed=7), corrupt(images, name, 3, seed=7))


def test_seeds_change_random_corruptions(clean):
    images = clean[0][:16]
    first, second = corrupt(images, "shot_noise", 5, 1), corrupt(images, "shot_noise", 5, 2)
    assert not np.array_equal(first, second)


def test_higher_severity_hurts_more(clean, resnet20):
    images, labels = clean
    assert _error(resnet20, corrupt(images, "gaussian_noise", 5), labels) > \
        _error(resnet20, corrupt(images, "gaussian_noise", 1), labels) + 10


@pytest.mark.parametrize("args, match", [
    (("fog", 0), "severity"), (("rain", 5), "unknown corruption")])
def test_bad_corruption_arguments(clean, args, match):
    with pytest.raises(ValueError, match=match):
        corrupt(clean[0][:2], *args)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(clean[0][:2].astype(np.float32), "fog", 1)


def test_released_layout_round_trip_and_guards(tmp_path):
    folder = build_cifar10c(tmp_path / "c", ["fog", "contrast"], limit=12, seed=3)
    x, y = load_corruption(folder, "fog", 4)
    stacked = np.load(folder / "fog.npy")
    assert stacked.shape == (60, 32, 32, 3) and np.array_equal(x, stacked[36:48])
    assert np.array_equal(y, load_cifar10("test", limit=12)[1])
    with pytest.raises(DataNotFound, match="made with"):
        build_cifar10c(folder, ["fog"], limit=12, seed=4)
    with pytest.raises(DataNotFound, match="cannot read"):
        load_corruption(folder, "snow", 5)
    (folder / "contrast.npy").write_bytes(b"garbage")
    with pytest.raises(DataNotFound):
        load_corruption(folder, "contrast", 5)
    with pytest.raises(DataNotFound, match="cannot read"):
        load_corruption(tmp_path / "missing", "fog", 5)
