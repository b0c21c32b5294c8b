"""The ``camera`` protocol: the daemon's view of a stream, not the paper's.

Frames arrive one at a time. Each is served by the current weights in eval mode (the daemon's
serving copy: running statistics, no batch mixing), and scored. Every ``fresh_frames`` frames the
learner takes one step on the latest ``batch_size`` frames of the ring buffer, stored as uint8
as the daemon stores them, so its batches are consecutive (and, with ``alpha``, correlated)
frames. Serving between steps sees the weights of the last step, as after each publish.
"""

import copy
import time
from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..data import to_tensor
from ..methods import args_for, get_method
from .continual import MethodRun, record_step, Tally
from .streams import Stream

__all__ = ["run_camera", "serving_compatible"]


def serving_compatible(model: nn.Module) -> Optional[str]:
    """Why per-frame serving cannot follow this adapted model, or None when it can."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    if any(m.running_mean is None for m in norms):
        return "it normalises with each batch's own statistics, which one frame does not have"
    return None


@torch.no_grad()
def _serve(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def run_camera(name: str, base: nn.Module, stream: Stream, batch_size: int, fresh_frames: int,
               device: torch.device, overrides: Optional[Dict] = None, progress=None,
               preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> MethodRun:
    """Serve every frame and adapt on the ring buffer along the stream (see the module doc)."""
    method = get_method(name)(copy.deepcopy(base).to(device), args_for(name, **(overrides or {})))
    why = serving_compatible(method.model)
    if why is not None:
        raise ValueError("%s cannot run on the camera protocol: %s" % (name, why))
    run, tally = MethodRun(name), Tally(stream)
    buffer, fresh = [], 0
    start = time.perf_counter()
    for window in stream.windows:
        # pieces end where a step is due, so steps fall every fresh_frames across windows
        i = 0
        while i < len(window):
            stop = min(len(window), i + max(1, fresh_frames - fresh))
            images, labels = stream.images(window, i, stop)
            x = to_tensor(images).to(device)
            x = preprocess(x) if preprocess is not None else x
            right = _serve(method.model, x).argmax(1).cpu() == torch.from_numpy(labels)
            tally.add(window, window.block_ids[i:stop], right.numpy())
            buffer = (buffer + list(x.mul(255).round_().clamp_(0, 255).to(torch.uint8)))
            buffer, fresh, i = buffer[-batch_size:], fresh + (stop - i), stop
            if len(buffer) == batch_size and fresh >= fresh_frames:   # the daemon's _ready
                batch = torch.stack(buffer).float().div_(255.0)
                record_step(run, method.step(batch), 100.0 * (1.0 - float(right.float().mean())))
                fresh = 0
            if progress is not None:
                progress.update(1)
    tally.finish(run)
    run.wall_seconds = time.perf_counter() - start
    return run
