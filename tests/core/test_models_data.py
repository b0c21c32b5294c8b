import pickle
import weakref

import pytest
import torch

from surgeon_core.data import load_cifar10
from surgeon_core.errors import DataNotFound, IncompatibleModel
from surgeon_core.models import CIFAR_WEIGHTS, cifar_resnet_by_name, resnet56
from surgeon_core.models.zoo import sha256_of


def test_published_resnet20_is_accurate_on_real_test_images(resnet20_weights, cifar_test_small):
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    x, y = cifar_test_small
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy >= 0.88
    assert sum(p.numel() for p in model.parameters()) == CIFAR_WEIGHTS["resnet20"].num_params


def test_weights_file_matches_its_recorded_hash(resnet20_weights):
    assert sha256_of(resnet20_weights) == CIFAR_WEIGHTS["resnet20"].sha256


def test_weights_for_another_depth_are_refused_with_the_keys(resnet20_weights):
    with pytest.raises(IncompatibleModel, match="missing"):
        cifar_resnet_by_name("resnet56", resnet20_weights)


def test_missing_and_damaged_weights_give_clear_errors(tmp_path):
    with pytest.raises(DataNotFound, match="SURGEON_MODELS_DIR"):
        cifar_resnet_by_name("resnet20", tmp_path / "nope.th")
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(IncompatibleModel, match="cannot read"):
        cifar_resnet_by_name("resnet20", bad)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.th"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": Boom()}, f)
    with pytest.raises(IncompatibleModel):
        cifar_resnet_by_name("resnet20", evil)


def test_cifar_reader_shapes_and_labels():
    x, y = load_cifar10("test", limit=100)
    assert x.shape == (100, 32, 32, 3) and x.dtype.name == "uint8"
    assert y.shape == (100,) and 0 <= y.min() and y.max() <= 9


def test_missing_or_damaged_data_folder_gives_clear_errors(tmp_path):
    with pytest.raises(DataNotFound, match="SURGEON_DATA_DIR"):
        load_cifar10("test", root=tmp_path)
    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataNotFound, match="damaged"):
        load_cifar10("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_cifar10("validation", root=tmp_path)


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(KeyError, match="resnet20"):
        cifar_resnet_by_name("resnet7")


def test_resnet56_builds_with_published_parameter_count():
    assert sum(p.numel() for p in resnet56().parameters()) == CIFAR_WEIGHTS["resnet56"].num_params


def test_resnet_frees_a_tensor_once_its_last_reader_ran():
    """NOTE [Stage inputs die early]: nested calls kept the stem's output through every stage
    and a block's first ReLU output through its second norm."""
    model = resnet56().eval()
    refs, alive = {}, {}
    block = model.layer2[1]
    model.relu.register_forward_hook(lambda m, i, out: refs.update(stem=weakref.ref(out)))
    block.relu1.register_forward_hook(lambda m, i, out: refs.update(relu1=weakref.ref(out)))
    block.bn2.register_forward_pre_hook(
        lambda m, i: alive.update({name: ref() is not None for name, ref in refs.items()}))
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    assert alive == {"stem": False, "relu1": False}
