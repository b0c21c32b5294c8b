"""What each output frame shows: the served prediction, the frozen source model's beside it
(a colour when they disagree), fps, cache against the budget, and the learner's state.

Drawn in the output thread, never the serving one. Tiny frames (CIFAR's 32 px) are enlarged by
an integer factor first so the text stays legible.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["FrameInfo", "StatusInfo", "draw_overlay", "enlarge", "learner_text",
           "AGREE_BGR", "DISAGREE_BGR", "BANNER_ROWS"]

AGREE_BGR = (80, 220, 80)          # green: adapted and source agree (or no source)
DISAGREE_BGR = (0, 140, 255)       # orange: they disagree
TEXT_BGR = (235, 235, 235)
BANNER_ROWS = 3                    # text rows of the banner at the top of the frame
ROLLBACK_SHOWN_S = 10.0


@dataclass
class FrameInfo:
    """Per frame, from the serving thread: the predictions served for it."""

    adapted: Dict[str, Any]
    source: Optional[Dict[str, Any]] = None
    label: Optional[str] = None


@dataclass
class StatusInfo:
    """From the latest telemetry snapshot: refreshed once per interval, not per frame."""

    fps: float = 0.0
    cache_mb: Optional[float] = None
    budget_mb: Optional[float] = None
    learner: str = "starting"
    stamp: float = field(default_factory=time.monotonic)


def learner_text(snap: Dict[str, Any], enabled: bool, rollback_seen_at: Optional[float]) -> str:
    """adapting (N steps) / paused: why / rolled back: why / learner off."""
    if not enabled:
        return "learner off"
    if snap.get("learner_paused"):
        return "paused: %s" % snap["learner_paused"]
    recent = rollback_seen_at is not None and time.monotonic() - rollback_seen_at < ROLLBACK_SHOWN_S
    if recent and snap.get("last_rollback"):
        return "rolled back: %s" % snap["last_rollback"]
    return "adapting (%d steps)" % (snap.get("learner_steps") or 0)


def enlarge(image: np.ndarray, min_height: int) -> np.ndarray:
    import cv2

    factor = math.ceil(min_height / image.shape[0]) if image.shape[0] < min_height else 1
    if factor == 1:
        return image
    return cv2.resize(image, (image.shape[1] * factor, image.shape[0] * factor),
                      interpolation=cv2.INTER_NEAREST)


def _prediction(pred: Optional[Dict[str, Any]]) -> str:
    if not pred:
        return "-"
    return "%s %.0f%%" % (pred.get("name"), 100 * float(pred.get("confidence") or 0.0))


def _lines(frame: FrameInfo, status: StatusInfo):
    disagree = frame.source is not None and frame.source.get("class") != frame.adapted.get("class")
    first = "adapted: %s" % _prediction(frame.adapted)
    if frame.source is not None:
        first += "   source: %s" % _prediction(frame.source)
    cache = "-" if status.cache_mb is None else "%.1f" % status.cache_mb
    budget = "-" if status.budget_mb is None else "%.1f" % status.budget_mb
    second = "%.1f fps   cache %s/%s MB" % (status.fps, cache, budget)
    if frame.label is not None:
        second += "   truth: %s" % frame.label
    return [(first, DISAGREE_BGR if disagree else AGREE_BGR), (second, TEXT_BGR),
            (status.learner, TEXT_BGR)], disagree


def draw_overlay(image: np.ndarray, frame: FrameInfo, status: StatusInfo) -> np.ndarray:
    """A new BGR image: a dark banner with the text over the top of ``image``; a border in the
    disagreement colour when adapted and source differ."""
    import cv2

    out = np.array(image, copy=True)
    height, width = out.shape[:2]
    scale = max(0.35, min(1.0, width / 900.0))
    row = int(math.ceil(26 * scale)) + 4
    banner = min(height, row * BANNER_ROWS + 6)
    out[:banner] = (out[:banner] * 0.35).astype(np.uint8)
    lines, disagree = _lines(frame, status)
    for index, (text, colour) in enumerate(lines):
        cv2.putText(out, text, (6, row * (index + 1)), cv2.FONT_HERSHEY_SIMPLEX, scale, colour,
                    1, cv2.LINE_AA)
    if disagree:
        cv2.rectangle(out, (0, 0), (width - 1, height - 1), DISAGREE_BGR, max(2, width // 160))
    return out
