"""Test streams beyond the paper's protocol: long, gradual, class-correlated, mixed, camera.

A stream is a list of windows, each a run of images drawn from the domain folder's blocks (one
domain at one severity). Windows are what the report scores: each window's error per method and
its margin over the frozen source model on the same window.

    continual   the domains in order, each once (the paper's protocol)
    long        the domains in order, ``loops`` times (drift becomes a curve, one window per visit)
    gradual     per domain, severities 1, 2, 3, 4, 5, 4, 3, 2, 1 (CoTTA's gradual setting)
    correlated  the domains in order, classes drawn over time with a Dirichlet(alpha) (NOTE's and
                RoTTA's practical setting; alpha 0: sorted by class)
    mixed       every domain's images in one shuffled stream (one window per domain for scoring)
    camera      as continual, but served one frame at a time while the learner steps on the
                latest frames of a ring buffer, as the daemon does (run by ``camera.py``)

``alpha`` also orders the images of any other protocol (the camera sees correlated frames).
A ``schedule`` (``[("clean", 600), ("fog", 1800)]``, the daemon's replay syntax) replaces the
folder's domain list: each entry is one window of that many images; ``clean`` is the CIFAR-10
test set itself.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..data.domains import DomainFolder

__all__ = ["Window", "Stream", "PROTOCOLS", "build_stream", "dirichlet_order"]

PROTOCOLS = ("continual", "long", "gradual", "correlated", "mixed", "camera")
CLEAN = "clean"
GRADUAL = (1, 2, 3, 4, 5, 4, 3, 2, 1)

Block = Tuple[str, Optional[int]]   # (domain, severity)


@dataclass
class Window:
    """A run of images: ``block_ids`` and ``rows`` index the stream's blocks, in stream order."""

    name: str
    block_ids: np.ndarray
    rows: np.ndarray
    group: str = ""       # what the window aggregates into (a loop of ``long``), if anything

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Stream:
    protocol: str
    domains: DomainFolder
    blocks: List[Block]
    windows: List[Window]
    limit: Optional[int] = None
    _cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def block(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """Images and labels of one block, loaded once (memory-mapped files, copied rows)."""
        if index not in self._cache:
            domain, severity = self.blocks[index]
            if domain == CLEAN:
                from ..data import load_cifar10

                self._cache[index] = load_cifar10("test", limit=self.limit)
            else:
                self._cache[index] = self.domains.load(domain, severity, self.limit)
        return self._cache[index]

    def images(self, window: Window, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        """Images (uint8 NHWC) and labels of ``window[start:stop]``."""
        ids, rows = window.block_ids[start:stop], window.rows[start:stop]
        images = np.empty((len(rows),) + self.domains.image_shape, np.uint8)
        labels = np.empty(len(rows), np.int64)
        for block in np.unique(ids):
            where = ids == block
            data, target = self.block(int(block))
            images[where], labels[where] = data[rows[where]], target[rows[where]]
        return images, labels

    @property
    def total(self) -> int:
        return sum(len(w) for w in self.windows)


def dirichlet_order(labels: np.ndarray, alpha: float, rng: np.random.Generator,
                    slots_per_class: int = 10) -> np.ndarray:
    """An order of ``labels``' indices whose classes are correlated in time.

    The stream is cut into ``slots_per_class * C`` time slots; each class spreads its images over
    the slots with proportions drawn from Dirichlet(alpha, ..., alpha), and each slot is shuffled.
    Small alpha puts each class in a few slots (long runs of one class, as a camera watching one
    object sees); large alpha tends to the shuffled stream; alpha 0 sorts by class (in a random
    class order).
    """
    classes = rng.permutation(np.unique(labels))
    if alpha <= 0:
        return np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in classes])
    slots = max(1, slots_per_class * len(classes))
    slot_of = np.empty(len(labels), np.int64)
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(slots, alpha))
        cuts = np.round(np.cumsum(shares) * len(members)).astype(np.int64)
        slot_of[members] = np.searchsorted(cuts, np.arange(len(members)), side="right")
    jitter = rng.random(len(labels))
    return np.lexsort((jitter, slot_of))


def _order(labels: np.ndarray, alpha: Optional[float], shuffle: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if alpha is not None:
        return dirichlet_order(labels, alpha, rng)
    return rng.permutation(len(labels)) if shuffle else np.arange(len(labels))


def build_stream(protocol: str, domains: DomainFolder, severity: Optional[int] = 5,
                 limit: Optional[int] = None, seed: int = 1, shuffle: bool = True,
                 alpha: Optional[float] = None, loops: int = 10,
                 schedule: Optional[List[Tuple[str, int]]] = None) -> Stream:
    """The windows of ``protocol`` over ``domains`` (see the module docstring).

    Raises:
        ValueError: an unknown protocol, ``gradual`` on a folder without severities, a
            ``correlated`` stream without a valid alpha, or ``loops`` < 1.
    """
    if protocol not in PROTOCOLS:
        raise ValueError("protocol must be one of %s, got %r" % (", ".join(PROTOCOLS), protocol))
    if protocol == "correlated" and alpha is None:
        alpha = 0.1
    if alpha is not None and (not math.isfinite(alpha) or alpha < 0):
        raise ValueError("alpha must be >= 0 (0: sorted by class), got %r" % (alpha,))
    if protocol == "gradual" and domains.layout != "stacked":
        raise ValueError("gradual needs five severities per domain (the stacked layout); %s "
                         "holds one" % domains.folder)
    if loops < 1:
        raise ValueError("loops must be >= 1, got %r" % (loops,))
    stream = Stream(protocol, domains, [], [], limit)
    if schedule:
        _scheduled(stream, schedule, severity, seed, shuffle, alpha)
    elif protocol == "gradual":
        _gradual(stream, seed, shuffle, alpha)
    elif protocol == "mixed":
        _mixed(stream, severity, seed)
    else:
        for loop in range(loops if protocol == "long" else 1):
            _visit(stream, severity, seed, shuffle, alpha, loop, protocol == "long")
    return stream


def _add_block(stream: Stream, block: Block) -> int:
    if block not in stream.blocks:
        stream.blocks.append(block)
    return stream.blocks.index(block)


def _window(stream: Stream, block: Block, name: str, seed: int, shuffle: bool,
            alpha: Optional[float], group: str = "") -> Window:
    index = _add_block(stream, block)
    labels = stream.block(index)[1]
    rows = _order(labels, alpha, shuffle, seed)
    return Window(name, np.full(len(rows), index), rows, group)


def _visit(stream, severity, seed, shuffle, alpha, loop: int, named_by_loop: bool) -> None:
    for domain in stream.domains.domains:
        name = "%d:%s" % (loop + 1, domain) if named_by_loop else domain
        group = "loop %d" % (loop + 1) if named_by_loop else ""
        # every visit reorders its domain: a long stream never replays the same sequence
        stream.windows.append(_window(stream, (domain, severity), name, seed + 7919 * loop,
                                      shuffle, alpha, group))


def _scheduled(stream, schedule, severity, seed, shuffle, alpha) -> None:
    seen: Dict[str, int] = {}
    for step, (domain, count) in enumerate(schedule):
        if domain == CLEAN and stream.domains.image_shape != (32, 32, 3):
            raise ValueError("clean is CIFAR-10's test set; %s holds %s images"
                             % (stream.domains.folder, stream.domains.image_shape))
        if domain != CLEAN and domain not in stream.domains.domains:
            raise ValueError("schedule names %r, which %s does not hold (%s, or clean)"
                             % (domain, stream.domains.folder, ", ".join(stream.domains.domains)))
        window = _window(stream, (domain, severity if domain != CLEAN else None), domain,
                         seed + step, shuffle, alpha)
        if count > len(window):
            raise ValueError("schedule asks %d %s images; there are %d" % (count, domain,
                                                                           len(window)))
        window.block_ids, window.rows = window.block_ids[:count], window.rows[:count]
        seen[domain] = seen.get(domain, 0) + 1
        if seen[domain] > 1:   # a domain visited again is its own window
            window.name = "%s#%d" % (domain, seen[domain])
        stream.windows.append(window)


def _gradual(stream, seed, shuffle, alpha) -> None:
    for domain in stream.domains.domains:
        for step, level in enumerate(GRADUAL):
            stream.windows.append(_window(stream, (domain, level), "%s@%d" % (domain, level),
                                          seed + step, shuffle, alpha, domain))


def _mixed(stream, severity, seed) -> None:
    ids, rows = [], []
    for domain in stream.domains.domains:
        index = _add_block(stream, (domain, severity))
        count = len(stream.block(index)[1])
        ids.append(np.full(count, index))
        rows.append(np.arange(count))
    order = np.random.default_rng(seed).permutation(sum(len(r) for r in rows))
    stream.windows.append(Window("mixed", np.concatenate(ids)[order],
                                 np.concatenate(rows)[order]))
