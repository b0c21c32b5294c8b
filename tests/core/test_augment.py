"""CoTTA's augmentation chain (surgeon's consistency loss, cotta's teacher): the same pixels as
torchvision's blur-then-crop, without its transients."""

import random
import subprocess
import sys

import pytest
import torch
import torchvision.transforms.functional as TF

from surgeon_core.methods import augment

MB = 2 ** 20


def _torchvision_chain(x, rng):
    """The chain as first written: pad, affine, 5x5 gaussian_blur over the padded image, crop."""
    height, width = x.shape[-2:]
    ops = [lambda t: TF.adjust_brightness(t, rng.uniform(0.6, 1.4)),
           lambda t: TF.adjust_contrast(t, rng.uniform(0.7, 1.3)),
           lambda t: TF.adjust_saturation(t, rng.uniform(0.5, 1.5)),
           lambda t: TF.adjust_hue(t, rng.uniform(-0.06, 0.06)),
           lambda t: t.clamp(1e-8, 1.0) ** rng.uniform(0.7, 1.3)]
    rng.shuffle(ops)
    x = x.clamp(0.0, 1.0)
    for op in ops:
        x = op(x)
    x = torch.nn.functional.pad(x, (width // 2,) * 2 + (height // 2,) * 2, mode="replicate")
    shift = width / 16.0
    x = TF.affine(x, angle=rng.uniform(-15, 15),
                  translate=[int(round(rng.uniform(-shift, shift))) for _ in range(2)],
                  scale=rng.uniform(0.9, 1.1), shear=[0.0],
                  interpolation=TF.InterpolationMode.BILINEAR)
    x = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[rng.uniform(0.001, 0.5)] * 2)
    x = TF.center_crop(x, [height, width])
    return TF.hflip(x) if rng.random() < 0.5 else x


@pytest.mark.parametrize("shape", [(70, 3, 32, 32), (3, 3, 40, 24)])
def test_the_chain_gives_torchvisions_pixels(shape, monkeypatch):
    monkeypatch.setattr(augment, "NOISE_SIGMA", 0.0)   # the final noise aside
    x = torch.rand(*shape)
    for seed in range(6):
        expected = _torchvision_chain(x, random.Random(seed)).clamp(0.0, 1.0)
        got = augment.cotta_augment(x, random.Random(seed))
        assert got.shape == x.shape
        assert torch.allclose(got, expected, atol=1e-5), seed


@pytest.mark.parametrize("factor", [-0.5, -0.06, -0.01, 0.0, 0.03, 0.06, 0.5])
def test_hue_is_torchvisions_in_a_few_whole_batch_operators(factor):
    from surgeon_core.opcount import OpCounter

    torch.manual_seed(0)
    x = torch.rand(40, 3, 8, 8)
    x[:4] = x[:4, :1]                       # grey: every channel ties
    x[4:8, 0] = x[4:8, 1]                   # red ties green: red's formula, as torchvision
    x[8:10, 1] = x[8:10, 2]                 # green ties blue
    x[10:12] = 0.0
    x[12:14] = 1.0
    x[14:18] = (x[14:18] * 4).round() / 4   # few levels: ties and sextant edges
    assert torch.allclose(augment._adjust_hue(x, factor), TF.adjust_hue(x, factor), atol=1e-5)
    gray = x[:, :1]
    assert augment._adjust_hue(gray, factor) is gray
    with OpCounter() as ops:
        augment._adjust_hue(torch.rand(200, 3, 32, 32), factor)
    assert ops.total <= 30, ops.total       # torchvision's: about 60 a call, 462 in chunks


def test_blur_valid_is_the_interior_of_torchvisions_blur():
    x = torch.rand(4, 3, 20, 17)
    full = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[0.4, 0.4])
    assert torch.allclose(augment.blur_valid(x, 0.4), full[..., 2:-2, 2:-2], atol=1e-6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="procfs")
def test_augmenting_a_batch_of_200_peaks_at_a_few_copies_of_it():
    """The input is 2.4 MiB; torchvision's conv2d blur and one-go hue peaked at 126 MiB. In its
    own process with every block returned at free, so the meter sees the tensors alive."""
    script = ("import random, torch\n"
              "from surgeon_core.allocator import before_step, tune_malloc\n"
              "from surgeon_core.methods.augment import cotta_augment\n"
              "from surgeon_core.peak import PeakMeter\n"
              "tune_malloc('return')\n"
              "x, rng, peaks = torch.rand(200, 3, 32, 32), random.Random(0), []\n"
              "for _ in range(3):\n"
              "    before_step()\n"
              "    with PeakMeter(x.device) as meter:\n"
              "        cotta_augment(x, rng)\n"
              "    peaks.append(meter.peak_bytes)\n"
              "print(min(peaks))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert int(out.stdout.strip().splitlines()[-1]) < 40 * MB, out.stdout


def test_the_augmentation_depends_on_its_rng_alone():
    """Its noise too: a method's results must not depend on what else drew from torch's
    global generator in the same process (rdumb and its method agree until the first reset)."""
    x = torch.rand(4, 3, 32, 32)
    first = augment.cotta_augment(x, random.Random(7))
    torch.randn(100)
    assert torch.equal(augment.cotta_augment(x, random.Random(7)), first)
    assert not torch.equal(augment.cotta_augment(x, random.Random(8)), first)


def _on_host(draw):
    """A device draw's values as the floats a host draw holds."""
    return augment.Draw(draw.order, tuple(float(f) for f in draw.factors), float(draw.angle),
                        tuple(int(t) for t in draw.translate), float(draw.scale),
                        float(draw.sigma), bool(draw.flip), 0)


def test_a_device_draw_gives_the_pixels_of_the_same_values_drawn_on_the_host(monkeypatch):
    monkeypatch.setattr(augment, "NOISE_SIGMA", 0.0)
    x = torch.rand(6, 3, 32, 32)
    generator = torch.Generator().manual_seed(3)
    flips = 0
    for _ in range(8):
        draw = augment.device_draw(x, (4, 2, 0, 3, 1), generator)
        flips += bool(draw.flip)
        assert torch.allclose(augment.cotta_augment(x, draw=draw),
                              augment.cotta_augment(x, draw=_on_host(draw)), atol=1e-5)
    assert 0 < flips < 8


def test_device_draws_cover_the_host_draws_ranges():
    x = torch.rand(1, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    draws = [augment.device_draw(x, range(5), generator) for _ in range(400)]
    for index, (_, (low, high)) in enumerate(augment.JITTERS):
        values = torch.stack([d.factors[index] for d in draws])
        assert low <= values.min() < low + 0.1 * (high - low)
        assert high - 0.1 * (high - low) < values.max() <= high
    shifts = torch.stack([torch.stack(d.translate) for d in draws])
    assert torch.equal(shifts, shifts.round())
    assert set(shifts.unique().tolist()) == {-2, -1, 0, 1, 2}
    assert 0.4 < torch.stack([d.flip for d in draws]).float().mean() < 0.6


def test_augmenting_with_a_device_draw_never_reads_the_device_on_the_host():
    from surgeon_core.opcount import OpCounter

    x = torch.rand(8, 3, 32, 32)
    with OpCounter() as ops:
        augment.cotta_augment(x, draw=augment.device_draw(x, (0, 1, 2, 3, 4)))
    assert ops.host_reads == {}
    with OpCounter() as ops:   # the check sees one where there is one
        bool(x.sum() > 0)
    assert ops.host_reads == {"_local_scalar_dense": 1}
