"""Class names: a text file with one name per line, or JSON (a list, or ``{index: name}``)."""

import json
from pathlib import Path
from typing import List

from ..errors import SurgeonError

__all__ = ["LabelsError", "load_labels", "class_name"]

MAX_BYTES = 16 << 20


class LabelsError(SurgeonError, ValueError):
    """A labels file that cannot be read or does not list every class once."""


def load_labels(path: Path) -> List[str]:
    """The class names in index order.

    Raises:
        LabelsError: unreadable, empty, malformed JSON, or indices that skip a class.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise LabelsError("labels file %s is larger than %d MB" % (path, MAX_BYTES >> 20))
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LabelsError("cannot read labels file %s: %s" % (path, exc.strerror or exc)) \
            from None
    except UnicodeDecodeError as exc:
        raise LabelsError("labels file %s is not UTF-8 text (%s)" % (path, exc.reason)) from None
    stripped = text.strip()
    if not stripped:
        raise LabelsError("labels file %s is empty" % path)
    if stripped[0] in "[{":
        names = _from_json(path, stripped)
    else:
        names = _from_lines(path, stripped)
    return names


def _from_lines(path: Path, text: str) -> List[str]:
    names = [line.strip() for line in text.splitlines()]
    blank = [i + 1 for i, name in enumerate(names) if not name]
    if blank:
        raise LabelsError("labels file %s has an empty name on line %d (one name per line)"
                          % (path, blank[0]))
    return names


def _from_json(path: Path, text: str) -> List[str]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LabelsError("labels file %s is not valid JSON: %s" % (path, exc)) from None
    if isinstance(data, list):
        bad = [i for i, name in enumerate(data) if not isinstance(name, str) or not name.strip()]
        if bad:
            raise LabelsError("labels file %s: entry %d is not a non-empty string" % (path, bad[0]))
        return [name.strip() for name in data]
    by_index = {}
    for key, name in data.items():
        try:
            index = int(key)
        except ValueError:
            raise LabelsError("labels file %s: key %r is not a class index" % (path, key)) \
                from None
        if not isinstance(name, str) or not name.strip():
            raise LabelsError("labels file %s: class %s has no name" % (path, key))
        by_index[index] = name.strip()
    missing = sorted(set(range(len(by_index))) - set(by_index))
    if missing:
        raise LabelsError("labels file %s: indices must run 0..%d, class %d is missing"
                          % (path, len(by_index) - 1, missing[0]))
    return [by_index[i] for i in range(len(by_index))]


def class_name(names, index: int) -> str:
    """The name of class ``index``, or the index as text when there are no names."""
    return names[index] if names and 0 <= index < len(names) else str(index)
