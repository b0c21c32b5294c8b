"""replay://cifar10?schedule=clean:600,fog:1500&severity=5&fps=0&seed=0&loop=0

A labelled, shifting stream for demos and evaluation: CIFAR-10 test images (a seeded order,
cycling) under a schedule of CIFAR-10-C corruptions, generated on the fly by surgeon_core's
generator in chunks. Labels and segment names ride on the frame for telemetry only.
"""

import time
from typing import Dict, List, Tuple

import numpy as np

from surgeon_core.data import load_cifar10
from surgeon_core.data.corruptions import CORRUPTIONS, corrupt

from .base import EndOfStream, Frame, FrameSource
from .params import QueryParams

__all__ = ["ReplaySource", "parse_schedule"]

CHUNK = 64


def parse_schedule(text: str) -> List[Tuple[str, int]]:
    """``clean:600,fog:1500`` -> [("clean", 600), ("fog", 1500)]; names checked."""
    segments = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, count = item.partition(":")
        if not sep or not count.strip().isdigit() or int(count) < 1:
            raise ValueError("replay schedule item %r: expected name:frames, frames >= 1" % item)
        if name != "clean" and name not in CORRUPTIONS:
            raise ValueError("replay schedule: unknown corruption %r (known: clean, %s)"
                             % (name, ", ".join(CORRUPTIONS)))
        segments.append((name, int(count)))
    if not segments:
        raise ValueError("replay schedule is empty")
    return segments


class ReplaySource(FrameSource):
    live = False
    labelled = True

    def __init__(self, uri: str, dataset: str, params: Dict[str, str]):
        super().__init__(uri)
        if dataset != "cifar10":
            raise ValueError("replay:// knows the dataset cifar10, got %r" % dataset)
        query = QueryParams("replay", params, ("schedule", "severity", "fps", "seed", "loop"))
        self.schedule = parse_schedule(query.text("schedule", "clean:1000"))
        self.severity = query.integer("severity", 5, 1, 5)
        self.fps = query.fps()
        self.seed = query.integer("seed", 0, 0, 2 ** 32 - 1)
        self.loop = query.flag("loop")
        # loaded now, so that missing data fails at start-up with DataNotFound's message
        images, labels = load_cifar10("test")
        order = np.random.default_rng(self.seed).permutation(len(images))
        self._images, self._labels = images[order], labels[order]
        self._position = 0          # frames emitted so far
        self._chunk: Tuple[int, np.ndarray] = (-1, np.empty(0))
        self._next_due = 0.0

    @property
    def total_frames(self) -> int:
        return sum(count for _, count in self.schedule)

    def segment_at(self, within: int) -> Tuple[str, int, int]:
        """(name, first frame, end frame) of the segment holding frame ``within`` of a pass."""
        start = 0
        for name, count in self.schedule:
            if within < start + count:
                return name, start, start + count
            start += count
        raise IndexError(within)

    def open(self) -> None:
        self._next_due = time.monotonic()

    def _image(self, position: int) -> Tuple[np.ndarray, int, str]:
        """Frame ``position`` of the stream, from a chunk corrupted at once (CHUNK-aligned)."""
        first_of_pass = position - position % self.total_frames
        name, seg_start, seg_end = self.segment_at(position % self.total_frames)
        chunk_start = position - (position - first_of_pass - seg_start) % CHUNK
        if self._chunk[0] != chunk_start:
            count = min(CHUNK, first_of_pass + seg_end - chunk_start)
            idx = [(chunk_start + i) % len(self._images) for i in range(count)]
            images = self._images[idx]
            if name != "clean":
                seed = self.seed * 1000003 + chunk_start
                images = corrupt(images, name, self.severity, seed=seed)
            self._chunk = (chunk_start, images)
        label = int(self._labels[position % len(self._images)])
        return self._chunk[1][position - chunk_start], label, name

    def read(self) -> Frame:
        if not self.loop and self._position >= self.total_frames:
            raise EndOfStream(self.uri)
        if self.fps > 0:
            self._next_due += 1.0 / self.fps
            time.sleep(max(0.0, self._next_due - time.monotonic()))
        rgb, label, name = self._image(self._position)
        frame = Frame(np.ascontiguousarray(rgb[:, :, ::-1]), self._position, time.monotonic(),
                      label=label, domain=name)
        self._position += 1
        return frame
