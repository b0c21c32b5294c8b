"""The JetPack 5 container's base has torchvision 0.14.1 (with NVIDIA's torch 2.0.0), and PyPI
has no torch 2.0 + torchvision 0.14 pair for the Python 3.8 lane to install (it runs 0.15.2).
So the torchvision API the code calls is held to what 0.14 has, by name: the model registry
(list_models, get_model, get_model_weights: new in 0.14) and the functional transforms."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
# torchvision 0.14's public names that this code may call (from its 0.14 documentation)
IN_0_14 = {
    "models": {"list_models", "get_model", "get_model_weights", "get_weight"},
    "TF": {"adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "affine",
           "InterpolationMode", "gaussian_blur", "center_crop", "hflip", "resize", "pad",
           "normalize", "to_tensor", "rotate", "crop"},
}
_CALLS = {"models": re.compile(r"(?:\bmodels|_models\(\))\.([a-z_]+)\("),
          "TF": re.compile(r"\bTF\.([A-Za-z_]+)")}


def test_only_torchvision_0_14_api_is_used():
    used = {kind: set() for kind in _CALLS}
    for path in list((ROOT / "surgeon_core").rglob("*.py")) + list((ROOT / "daemon").rglob(
            "*.py")):
        text = path.read_text()
        if "torchvision" not in text:
            continue
        for kind, pattern in _CALLS.items():
            used[kind] |= set(pattern.findall(text))
    assert used["models"] and used["TF"], "the scan found nothing: it is broken"
    for kind, names in used.items():
        assert names <= IN_0_14[kind], (kind, names - IN_0_14[kind])
