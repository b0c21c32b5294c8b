"""A source URI's query parameters, typed and range-checked when the config is checked.

``synthetic://?fps=abc`` must be refused by ``surgeond config --check``, not end a grabber
thread at run time; ``fps=1e-300`` (a frame every 1e300 s) and negative sizes likewise. Every
source names the keys it takes, so a misspelt one is an error too.
"""

import math
from typing import Dict, Iterable, Optional

__all__ = ["QueryParams", "MAX_FPS"]

MAX_FPS = 1000.0
MIN_FPS = 0.01           # below this, 0 (as fast as read) is what was meant
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class QueryParams:
    """Args: scheme (for messages), the parsed query, the keys this scheme takes."""

    def __init__(self, scheme: str, raw: Dict[str, str], allowed: Iterable[str]):
        self.scheme, self.raw = scheme, raw
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ValueError("%s:// does not take %s (it takes %s)" % (
                scheme, ", ".join(unknown), ", ".join(sorted(allowed)) or "no parameters"))

    def _fail(self, name: str, expected: str) -> ValueError:
        return ValueError("%s:// parameter %s=%r: expected %s"
                          % (self.scheme, name, self.raw[name], expected))

    def integer(self, name: str, default: Optional[int], low: int, high: int) -> Optional[int]:
        if name not in self.raw:
            return default
        try:
            value = int(self.raw[name])
        except ValueError:
            raise self._fail(name, "a whole number in %d..%d" % (low, high)) from None
        if not low <= value <= high:
            raise self._fail(name, "a whole number in %d..%d" % (low, high))
        return value

    def fps(self, name: str = "fps") -> float:
        """0 (as fast as the consumer reads) or a rate in [MIN_FPS, MAX_FPS]."""
        if name not in self.raw:
            return 0.0
        expected = "0 or a rate in %g..%g frames per second" % (MIN_FPS, MAX_FPS)
        try:
            value = float(self.raw[name])
        except ValueError:
            raise self._fail(name, expected) from None
        if not math.isfinite(value) or not (value == 0 or MIN_FPS <= value <= MAX_FPS):
            raise self._fail(name, expected)
        return value

    def flag(self, name: str) -> bool:
        text = self.raw.get(name, "0").strip().lower()
        if text not in _TRUE + _FALSE:
            raise self._fail(name, "1 or 0 (true/false, yes/no)")
        return text in _TRUE

    def text(self, name: str, default: str) -> str:
        return self.raw.get(name, default)
