"""Per-frame serving: preprocessing and inference on the serving copy of the model.

The serving copy is a separate module in eval mode, run under ``torch.inference_mode``; the
learner publishes its weights into it in place under ``lock`` (DESIGN.md decision 1), so a slow
backward pass never delays a frame and a frame never sees half-copied weights.
"""

import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from surgeon_core.engine import entropy as sample_entropy
from surgeon_core.models.labels import class_name
from surgeon_core.models.preprocess import Preprocessing

from .priority import ServingTurn

__all__ = ["Preprocessor", "ServingModel", "publish_weights", "to_uint8", "describe_prediction"]


class Preprocessor:
    """BGR uint8 HxWx3 -> (1, 3, S, S) RGB float in [0, 1], by the model's Preprocessing
    (resize and crop, letterbox or squash); the model normalises inside."""

    def __init__(self, preprocessing: Preprocessing, device: torch.device):
        self.preprocessing, self.device = preprocessing, device
        self.size = preprocessing.crop

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError("frames must be HxWx3 uint8, got %s %s" % (image.shape, image.dtype))
        x = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).permute(2, 0, 1)[None]
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        return self.preprocessing(x)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """A compact copy for the learner's ring buffer (1 byte per value, on the CPU)."""
    return x[0].mul(255.0).round_().clamp_(0, 255).to("cpu", torch.uint8)


def _pairs(dst: nn.Module, src: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Matching tensors (parameters and buffers) of two copies of one architecture."""
    d, s = dst.state_dict(keep_vars=True), src.state_dict(keep_vars=True)
    if d.keys() != s.keys():
        raise ValueError("serving and learner models differ: %s" % sorted(d.keys() ^ s.keys()))
    return [(d[k], s[k]) for k in d if d[k] is not None and s[k] is not None]


@torch.no_grad()
def publish_weights(pairs: List[Tuple[torch.Tensor, torch.Tensor]], lock: threading.Lock) -> None:
    """Copy the learner's tensors into serving's; on CUDA the copies have run before serving,
    on its own stream, may read them (``daemon/priority.py``)."""
    with lock:
        for dst, src in pairs:
            dst.data.copy_(src.data)
        devices = {dst.device for dst, _ in pairs if dst.is_cuda}
        for device in devices:
            torch.cuda.current_stream(device).synchronize()


class ServingModel:
    """The serving copy: eval mode, inference mode, one frame at a time."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.lock = threading.Lock()
        self.turn = ServingTurn()   # frames in flight, for the learner to give way to

    def pairs_with(self, learner_model: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return _pairs(self.model, learner_model)

    def predict(self, x: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """(logits on the CPU, seconds spent) for a preprocessed batch."""
        start = time.perf_counter()
        with self.lock, torch.inference_mode():
            logits = self.model(x).float().cpu()
        return logits, time.perf_counter() - start


def describe_prediction(logits: torch.Tensor,
                        names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Class index, its name (the index as text without a labels list), confidence, entropy."""
    conf, cls = logits.softmax(1)[0].max(0)
    entropy = float(sample_entropy(logits)[0])
    return {"class": int(cls), "name": class_name(names, int(cls)),
            "confidence": round(float(conf), 4), "entropy": round(entropy, 4)}
