"""NOTE [Frozen-weight convolutions]: while a capture records, a convolution whose weight is
frozen saves nothing of its input and gets its input gradient by a transposed convolution."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from surgeon_core.capture import ActivationCapture, CapturePolicy
from surgeon_core.opcount import OpCounter
from surgeon_core.roles import OpTracker

CASES = [  # (conv, input shape, keyword arguments)
    (F.conv2d, (4, 6, 13, 11), dict(stride=2, padding=1)),
    (F.conv2d, (4, 6, 12, 12), dict(stride=(2, 3), padding=(0, 2), dilation=(2, 1))),
    (F.conv2d, (3, 6, 9, 9), dict(stride=1, padding=1, groups=3)),
    (F.conv2d, (3, 6, 9, 9), dict(stride=2, padding=1, groups=6)),
    (F.conv1d, (4, 6, 17), dict(stride=3, padding=2)),
    (F.conv3d, (2, 6, 7, 8, 9), dict(stride=2, padding=1)),
]


def _weight(conv, groups, spatial):
    kernel = (3,) * spatial
    return torch.randn((12, 6 // groups) + kernel)    # 12 outputs: divisible by any group


@pytest.mark.parametrize("conv,shape,kwargs", CASES)
def test_the_input_gradient_equals_autograds(conv, shape, kwargs):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = _weight(conv, kwargs.get("groups", 1), len(shape) - 2).double()
    expected_out = conv(x, weight, None, **kwargs)
    grad = torch.randn_like(expected_out)
    (expected,) = torch.autograd.grad(expected_out, x, grad)
    with OpTracker():
        out = conv(x, weight, None, **kwargs)
    assert type(out.grad_fn).__name__ == "_FrozenWeightConvBackward"
    (got,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(got, expected)


def test_a_trained_weight_string_padding_or_a_frozen_input_keep_autograds_path():
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    weight = torch.randn(8, 6, 3, 3)
    with OpTracker():
        trained = F.conv2d(x, weight.requires_grad_(), padding=1)
        same = F.conv2d(x, weight.detach(), padding="same")
        frozen_input = F.conv2d(x.detach(), weight.detach(), padding=1)
    assert type(trained.grad_fn).__name__ == "ConvolutionBackward0"
    assert type(same.grad_fn).__name__ == "ConvolutionBackward0"
    assert frozen_input.grad_fn is None


def test_a_frozen_conv_in_a_captured_model_builds_no_full_size_input_in_backward():
    """Before, the saved input (stored as a broadcast zero) was copied to a contiguous
    full-size tensor by convolution_backward: one input-sized copy per frozen conv."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, bias=False))
    model[2].weight.requires_grad_(False)
    capture = ActivationCapture(model, CapturePolicy())
    x = torch.randn(8, 3, 16, 16)
    with capture.record():
        loss = model(x).square().mean()
    with OpCounter() as backward:
        loss.backward()
    capture.close()
    assert "convolution_backward" in backward.by_name       # the first conv's, for its weight
    assert backward.by_name["convolution"] == 1              # the frozen one's input gradient
    assert "clone" not in backward.by_name, backward.by_name
    assert model[0].weight.grad is not None

