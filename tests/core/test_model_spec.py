"""ModelSpec -> BuiltModel: names, weights files as training scripts save them, labels,
preprocessing from torchvision's registry, identity, and a clear error for each mistake."""

import json

import pytest
import torch
from torch import nn

from surgeon_core.models.labels import LabelsError, load_labels
from surgeon_core.models.preprocess import Preprocessing
from surgeon_core.models.spec import ModelSpec, ModelSpecError, build_model, parse_arch

torchvision = pytest.importorskip("torchvision")


def test_arch_names_old_and_new():
    assert parse_arch("resnet20") == ("cifar", "resnet20")
    assert parse_arch("cifar:resnet56") == ("cifar", "resnet56")
    assert parse_arch("torchvision:resnet18") == ("torchvision", "resnet18")
    assert parse_arch("python:pkg.mod:build") == ("python", "pkg.mod:build")
    with pytest.raises(ModelSpecError, match="Did you mean torchvision:resnet18"):
        parse_arch("resnet18")
    with pytest.raises(ModelSpecError, match="unknown kind 'timm'"):
        parse_arch("timm:vit_small")


def test_the_cifar_default_is_todays_model(resnet20_weights, cifar_test_small):
    built = build_model(ModelSpec())
    assert built.builder == "cifar:resnet20" and built.num_classes == 10
    assert built.class_names[0] == "airplane" and built.weights == str(resnet20_weights)
    pre = built.preprocessing
    assert (pre.crop, pre.mode) == (32, "squash")
    x, y = cifar_test_small
    with torch.no_grad():
        assert float((built.model(x).argmax(1) == y).float().mean()) > 0.88


def _save(tmp_path, state, name="w.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model_state_dict", "model",
                                  "dataparallel", "lightning"])
def test_weights_as_training_scripts_save_them(tmp_path, wrap):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    state = resnet18(num_classes=3).state_dict()
    saved = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
             "model_state_dict": {"model_state_dict": state, "optimizer": {}},
             "model": {"model": state}, "dataparallel": {"module." + k: v for k, v in
                                                         state.items()},
             "lightning": {"state_dict": {"model." + k: v for k, v in state.items()}}}[wrap]
    built = build_model(ModelSpec("torchvision:resnet18", num_classes=3,
                                  weights=_save(tmp_path, saved), crop=64))
    assert torch.equal(built.model.fc.weight, state["fc.weight"])


def test_a_weights_file_that_does_not_fit_names_keys_shapes_and_the_fix(tmp_path):
    from torchvision.models import resnet18

    path = _save(tmp_path, resnet18(num_classes=7).state_dict())
    with pytest.raises(ModelSpecError) as caught:
        build_model(ModelSpec("torchvision:resnet18", weights=path))
    text = str(caught.value)
    assert "fc.weight: file (7, 512), model (1000, 512)" in text
    assert "set num_classes to 7" in text


def test_a_pickled_model_object_is_refused_safely(tmp_path):
    from torchvision.models import resnet18

    path = _save(tmp_path, resnet18(num_classes=2))
    with pytest.raises(ModelSpecError, match="save model.state_dict"):
        build_model(ModelSpec("torchvision:resnet18", num_classes=2, weights=path))


def test_torchvision_preprocessing_comes_from_the_published_transform(tmp_path):
    from torchvision.models import get_model_weights, mobilenet_v3_large

    path = _save(tmp_path, mobilenet_v3_large(num_classes=4).state_dict())
    built = build_model(ModelSpec("torchvision:mobilenet_v3_large", num_classes=4, weights=path))
    published = get_model_weights("mobilenet_v3_large").DEFAULT.transforms()
    pre = built.preprocessing
    assert (pre.resize, pre.crop) == (published.resize_size[0], published.crop_size[0])
    assert pre.mean == tuple(published.mean) and pre.std == tuple(published.std)
    smaller = build_model(ModelSpec("torchvision:mobilenet_v3_large", num_classes=4,
                                    weights=path, crop=112))
    ratio = published.resize_size[0] / published.crop_size[0]   # the published proportion
    assert (smaller.preprocessing.resize, smaller.preprocessing.crop) == (round(112 * ratio), 112)


def test_the_model_normalises_inside_and_copies_keep_it(tmp_path):
    from torchvision.models import resnet18

    import copy

    torch.manual_seed(0)
    plain = resnet18(num_classes=2).eval()
    path = _save(tmp_path, plain.state_dict())
    built = build_model(ModelSpec("torchvision:resnet18", num_classes=2, weights=path, crop=64))
    assert set(built.model.state_dict()) == set(plain.state_dict())
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(built.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(built.preprocessing.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = plain((x - mean) / std)
        torch.testing.assert_close(built.model(x), expected)
        torch.testing.assert_close(copy.deepcopy(built.model)(x), expected)


def test_identity_names_builder_classes_size_and_weights(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    a = _save(tmp_path, resnet18(num_classes=2).state_dict(), "a.pt")
    b = _save(tmp_path, resnet18(num_classes=2).state_dict(), "b.pt")
    first = build_model(ModelSpec("torchvision:resnet18", num_classes=2, weights=a, crop=64))
    again = build_model(ModelSpec("torchvision:resnet18", num_classes=2, weights=a, crop=64))
    other = build_model(ModelSpec("torchvision:resnet18", num_classes=2, weights=b, crop=64))
    assert first.identity == again.identity
    assert first.identity == {"builder": "torchvision:resnet18", "num_classes": 2,
                              "input_size": 64, "weights": first.identity["weights"]}
    assert other.identity["weights"] != first.identity["weights"]


def test_published_weights_out_of_reach_say_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from surgeon_core.models import torchvision_zoo

    def offline(url, dst, progress=True):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelSpecError) as caught:
        build_model(ModelSpec("torchvision:resnet18", weights="torchvision:IMAGENET1K_V1"))
    assert str(tmp_path) in str(caught.value) and "download.pytorch.org" in str(caught.value)
    default = torchvision.models.get_model_weights("resnet50").DEFAULT
    assert torchvision_zoo.published_weights("resnet50") is default


@pytest.mark.parametrize("text, expected", [
    ("ok\nscratch\n\n", ["ok", "scratch"]),
    ('["ok", "scratch"]', ["ok", "scratch"]),
    ('{"1": "scratch", "0": "ok"}', ["ok", "scratch"]),
])
def test_labels_files(tmp_path, text, expected):
    path = tmp_path / "labels"
    path.write_text(text)
    assert load_labels(path) == expected


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("a\n\nb\n", "line 2"), ("[1, 2]", "entry 0"), ('{"0": "a", "2": "c"}',
                                                                   "class 1 is missing"),
    ("{oops", "not valid JSON"), ('{"x": "a"}', "not a class index"),
])
def test_bad_labels_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "labels"
    path.write_text(text)
    with pytest.raises(LabelsError, match=message):
        load_labels(path)


def test_geometry_crop_letterbox_and_squash():
    frame = torch.zeros(1, 3, 60, 120)
    frame[..., 40:80] = 1.0    # a bright centre band
    crop = Preprocessing(crop=30, resize=30)(frame)
    assert crop.shape == (1, 3, 30, 30) and float(crop.mean()) > 0.6
    box = Preprocessing(crop=30, mode="letterbox")(frame)
    assert box.shape == (1, 3, 30, 30)
    assert torch.all(box[..., :7, :] == 0.5) and torch.all(box[..., 23:, :] == 0.5)  # padding
    squash = Preprocessing(crop=30, mode="squash")(frame)
    assert squash.shape == (1, 3, 30, 30) and abs(float(squash.mean()) - 1 / 3) < 0.05


def test_python_factories_get_kwargs_and_num_classes(tmp_path):
    (tmp_path / "user_models.py").write_text(
        "import torch\n"
        "def build(num_classes, width):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.BatchNorm2d(width),"
        " torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),"
        " torch.nn.Linear(width, num_classes))\n")
    built = build_model(ModelSpec("python:user_models:build", num_classes=3, kwargs={"width": 5},
                                  python_path=(str(tmp_path),), crop=16))
    assert isinstance(built.model, nn.Sequential) and built.num_classes == 3
    assert built.preprocessing.mean is None and built.builder == "python:user_models:build(width=5)"
    with pytest.raises(ModelSpecError, match="input size"):
        build_model(ModelSpec("python:user_models:build", num_classes=3, kwargs={"width": 5},
                              python_path=(str(tmp_path),)))
    with pytest.raises(ModelSpecError, match="has no attribute 'biuld'.*build"):
        build_model(ModelSpec("python:user_models:biuld", python_path=(str(tmp_path),),
                              crop=16))


def test_a_labels_list_sets_the_number_of_classes(tmp_path):
    from torchvision.models import resnet18

    path = _save(tmp_path, resnet18(num_classes=3).state_dict())
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["a", "b", "c"]))
    built = build_model(ModelSpec("torchvision:resnet18", weights=path, labels=str(labels),
                                  crop=64))
    assert built.num_classes == 3 and built.class_names == ["a", "b", "c"]
