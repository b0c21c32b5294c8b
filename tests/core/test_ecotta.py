"""EcoTTA: partitions, warm-up, the frozen original, the warm-up file checks; eata+fisher."""

import pytest
import torch
from torch import nn

from surgeon_core.bench.ecotta_warmup import WarmupSettings, accuracy, augment, warm_up
from surgeon_core.data import load_cifar10, to_tensor
from surgeon_core.methods import args_for, get_method
from surgeon_core.methods.ecotta import WarmupError, build_net, load_warmup, weights_hash
from surgeon_core.models import cifar_resnet_by_name
from surgeon_core.models.ecotta_net import PARTITIONS, EcoTTANet


@pytest.fixture(scope="module")
def train_small():
    images, labels = load_cifar10("train", limit=256)
    return to_tensor(images), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def warmup_file(tmp_path_factory, resnet20_weights, train_small):
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    out = tmp_path_factory.mktemp("ecotta") / "r20.pt"
    settings = WarmupSettings(epochs=5, batch_size=32, max_iterations=40, save_every=1000)
    info = warm_up(model, *train_small, out, settings)
    return out, info


def test_partition_tables_split_every_block():
    depths = {"resnet20": 9, "resnet32": 15, "resnet44": 21, "resnet56": 27, "resnet110": 54,
              "resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33}
    for arch, blocks in depths.items():
        sizes = PARTITIONS[arch]
        assert sum(sizes) == blocks and list(sizes) == sorted(sizes), arch   # finer when shallow


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnets_get_meta_networks(arch):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, arch)(weights=None).eval()
    net = EcoTTANet(model, input_size=64)
    x = torch.rand(4, 3, 64, 64)
    net.calibrate(x)
    with torch.no_grad():
        _close(net.eval()(x), model(x))   # calibrated: the original, plus the small branch
    assert len(net.metas) == 4


def _close(got, want, tolerance=0.05):
    spread = float((got - want).abs().max() / want.abs().max())
    assert spread < tolerance, spread


def test_calibrated_meta_networks_compute_what_the_original_does(resnet20_weights,
                                                                 cifar_test_small, train_small):
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    net = EcoTTANet(model)
    net.calibrate(train_small[0])
    x, y = cifar_test_small
    with torch.no_grad():
        _close(net.eval()(x), model.eval()(x))
    assert abs(accuracy(net, x, y) - accuracy(model, x, y)) <= 2 / len(y)


def _batch_statistics_loss(net, x, y):
    """Cross-entropy as warm-up and adaptation see it: every norm on the batch's statistics."""
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    with torch.no_grad():
        return float(nn.functional.cross_entropy(net(x), y))


def test_warm_up_lowers_the_cross_entropy(warmup_file, resnet20_weights, train_small):
    path, info = warmup_file
    x, y = train_small
    x = augment(x, torch.Generator().manual_seed(123))          # what the warm-up minimises
    start = EcoTTANet(cifar_resnet_by_name("resnet20", resnet20_weights))
    start.calibrate(x)                                        # where the warm-up starts
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    trained = build_net(model, load_warmup(str(path), model))
    before, after = _batch_statistics_loss(start, x, y), _batch_statistics_loss(trained, x, y)
    assert after < 0.8 * before, (before, after)
    assert info["iterations"] == 40


def test_warm_up_keeps_the_callers_statistics_and_files_its_own(resnet20_weights, train_small,
                                                                tmp_path):
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = WarmupSettings(epochs=1, batch_size=32, max_iterations=3, save_every=1000)
    warm_up(model, *train_small, tmp_path / "w.pt", settings)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    payload = load_warmup(str(tmp_path / "w.pt"), model)
    net = build_net(model, payload)
    stored = payload["frozen_norms"]
    assert len(stored) == 3 * 19                       # the 19 frozen norms of a ResNet-20
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stored.items())
    assert not torch.equal(stored["partitions.0.0.bn1.running_mean"],
                           before["layer1.0.bn1.running_mean"])


def test_recalibrated_eval_mode_matches_the_batch_statistics_it_was_fitted_on(
        resnet20_weights, train_small):
    net = EcoTTANet(cifar_resnet_by_name("resnet20", resnet20_weights))
    x = train_small[0]
    net.calibrate(x)
    with torch.no_grad():
        for p in net.meta_parameters():
            p.add_(0.05 * torch.randn_like(p))                 # metas away from the identity
    net.recalibrate(x, batch_size=len(x))
    with torch.no_grad():
        in_eval = net.eval()(x)
        on_batch = net.train()(x)
    _close(in_eval, on_batch, tolerance=1e-3)


def test_warm_up_cli_reports_both_networks_in_both_modes(resnet20_weights, tmp_path, capsys):
    from surgeon_core.bench.__main__ import main

    out = tmp_path / "w.pt"
    code = main(["ecotta-warmup", "--weights", str(resnet20_weights), "--limit", "64",
                 "--test-limit", "200", "--batch-size", "32", "--max-iterations", "2",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "2 iterations" in printed and "original" in printed and "with meta" in printed
    info = torch.load(str(out), weights_only=True)["info"]["clean_accuracy"]
    for name in ("original", "with_meta"):
        assert set(info[name]) == {"eval", "batch_statistics_200"}
        assert all(0.5 < value <= 1 for value in info[name].values())


def test_warm_up_resumes_where_it_stopped(tmp_path, resnet20_weights, train_small):
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    out = tmp_path / "w.pt"
    settings = WarmupSettings(epochs=1, batch_size=32, max_iterations=6, save_every=2)
    seen = []

    def interrupt(n):
        seen.append(n)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        warm_up(model, *train_small, out, settings, progress=interrupt)
    assert (tmp_path / "w.pt.partial").exists() and not out.exists()
    info = warm_up(model, *train_small, out, settings)
    assert info["iterations"] == 6 and len(info["first_losses"]) == 6   # 2 saved + 4 new
    assert out.exists() and not (tmp_path / "w.pt.partial").exists()


def test_adaptation_trains_meta_networks_only(warmup_file, resnet20_weights, cifar_test_small):
    path, _ = warmup_file
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    original = weights_hash(model)
    method = get_method("ecotta")(model, args_for("ecotta", warmup=str(path)))
    metas = [p.detach().clone() for p in method.model.meta_parameters()]
    x = cifar_test_small[0]
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    results = [method.step(noisy[i:i + 64]) for i in range(0, 256, 64)]
    assert weights_hash(model) == original                     # bit-identical original weights
    assert any(r.updated for r in results)
    assert any(not torch.equal(a, b) for a, b in zip(metas, method.model.meta_parameters()))
    assert all(r.cache_bytes > 0 and r.logits.shape == (64, 10) for r in results)
    method.reset()
    assert all(torch.equal(a, b) for a, b in zip(metas, method.model.meta_parameters()))


def test_a_missing_or_foreign_warm_up_file_is_a_clear_error(warmup_file, tmp_path,
                                                            resnet20_weights):
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    with pytest.raises(WarmupError, match="surgeon-bench ecotta-warmup --model resnet20"):
        get_method("ecotta")(model, args_for("ecotta"))
    with pytest.raises(WarmupError, match="does not exist"):
        load_warmup(str(tmp_path / "none.pt"), model)
    (tmp_path / "junk.pt").write_bytes(b"not a file")
    with pytest.raises(WarmupError, match="cannot be read"):
        load_warmup(str(tmp_path / "junk.pt"), model)
    other = cifar_resnet_by_name("resnet20", resnet20_weights)
    with torch.no_grad():
        other.linear.bias.add_(1e-3)                           # other weights, same shapes
    with pytest.raises(WarmupError, match="was made for resnet20 weights"):
        load_warmup(str(warmup_file[0]), other)
    with pytest.raises(WarmupError, match="was made for resnet20"):
        load_warmup(str(warmup_file[0]), cifar_resnet_by_name("resnet32"))


def test_an_old_or_damaged_warm_up_file_is_a_clear_error(warmup_file, tmp_path, resnet20_weights):
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    payload = torch.load(str(warmup_file[0]), weights_only=True)
    old = dict(payload, version=1)
    old.pop("frozen_norms")
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(WarmupError, match="format 1, this surgeon reads 2.*ecotta-warmup"):
        load_warmup(str(tmp_path / "old.pt"), model)
    norms = dict(payload["frozen_norms"])
    norms.pop(sorted(norms)[0])
    torch.save(dict(payload, frozen_norms=norms), tmp_path / "cut.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WarmupError, match="do not fit this model: norm statistics"):
        get_method("ecotta")(model, args_for("ecotta", warmup=str(tmp_path / "cut.pt")))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_augment_keeps_shape_and_range():
    x = torch.rand(16, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.equal(out, x)


def test_eata_with_fisher_uses_clean_source_images(resnet20_weights, cifar_test_small):
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    method = get_method("eata+fisher")(model, args_for("eata+fisher", fisher_images=128))
    assert method.fisher and method.args.fisher_alpha == 1.0
    fisher, anchor = next(iter(method.fisher.values()))
    assert float(fisher.sum()) > 0 and anchor.shape == fisher.shape
    result = method.step(cifar_test_small[0][:64])
    assert result.logits.shape == (64, 10)


def test_the_stem_of_a_users_torchvision_resnet_keeps_its_input_normalisation():
    from surgeon_core.models.spec import ModelSpec, build_model

    built = build_model(ModelSpec("torchvision:resnet18", num_classes=10, weights="random",
                                  crop=64))
    net = EcoTTANet(built.model, input_size=64)
    assert net.stem.parts[0] is built.model.input_normalize
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = built.model.maxpool(built.model.relu(built.model.bn1(built.model.conv1(
            built.model.input_normalize(x)))))
        torch.testing.assert_close(net.stem(x), expected)
