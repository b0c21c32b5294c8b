"""The wire format of the control socket, version 1 (docs/PROTOCOL.md).

A request is one JSON object ``{"v": 1, "id": "...", "cmd": "...", "args": {...}}``; the reply
echoes ``v`` and ``id`` and carries either ``"ok": true, "result": {...}`` or ``"ok": false,
"error": {"code": "...", "message": "..."}``. ``parse_request`` checks the envelope by hand so
that each failure gets its own code, then validates the whole request as a pydantic
discriminated union on ``cmd`` whose arguments forbid unknown fields.

Version rule: a change that existing clients could misread (a renamed field, a changed
meaning) bumps ``v``; new commands, new optional arguments and new result fields do not.
"""

import json
import math
import time
from typing import Any, Dict, Optional, Type

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

__all__ = ["PROTOCOL_VERSION", "ErrorCode", "ProtocolError", "Args", "Envelope",
           "build_union", "load_json", "parse_request", "request_id", "ok_reply",
           "error_reply", "encode"]

PROTOCOL_VERSION = 1
MAX_ID_LENGTH = 128
MAX_DEPTH = 32          # nesting of arrays and objects; a real request needs 4


class ErrorCode:
    BAD_JSON = "BAD_JSON"                    # not UTF-8 JSON, or not an object
    BAD_REQUEST = "BAD_REQUEST"              # envelope fields missing or of the wrong type
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
    INVALID_ARGS = "INVALID_ARGS"
    TOO_LARGE = "TOO_LARGE"
    BUSY = "BUSY"                            # the job queue is full; try again
    NOT_FOUND = "NOT_FOUND"
    CONFLICT = "CONFLICT"                    # e.g. a checkpoint made for another model
    CORRUPT = "CORRUPT"                      # a checkpoint that fails to load
    UNAVAILABLE = "UNAVAILABLE"              # the operation does not apply now (learner off)
    STORAGE = "STORAGE"                      # disk full, read-only or no permission; nothing lost
    FORBIDDEN = "FORBIDDEN"                  # e.g. a directory other users can write
    INTERNAL = "INTERNAL"


class ProtocolError(Exception):
    """A request that gets an error reply; ``code`` is one of ErrorCode."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Args(BaseModel):
    """Base of every command's arguments: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    v: int
    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    mode: str = Field("wait", pattern="^(wait|accept)$",
                      description="long commands: reply when done, or 'accepted' at once")


def build_union(commands: Dict[str, Type[Args]]) -> TypeAdapter:
    """One request model per command (``cmd`` a Literal), joined on ``cmd``."""
    from typing import Literal, Union

    from pydantic import create_model
    from typing_extensions import Annotated

    models = []
    for name, args in commands.items():
        models.append(create_model("Request_" + name.replace(".", "_"), __base__=Envelope,
                                   cmd=(Literal[name], ...),
                                   args=(args, Field(default_factory=args))))
    union = Union[tuple(models)] if len(models) > 1 else models[0]
    return TypeAdapter(Annotated[union, Field(discriminator="cmd")])


def _first_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(p) for p in item["loc"][1:]) or "request"
        parts.append("%s: %s" % (where, item["msg"]))
    return "; ".join(parts)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    body = dict(pairs)
    if len(body) != len(pairs):
        seen = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _DuplicateKey("key %r appears twice in one object" % twice[:64])
    return body


def _depth_over(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = (node.values() if isinstance(node, dict) else node
                    if isinstance(node, list) else ())
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def load_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN or Infinity, at most MAX_DEPTH deep.

    Nesting is checked twice: the C parser raises RecursionError near Python's recursion
    limit (a few KB of brackets), and anything deeper than MAX_DEPTH that parsed would still
    reach code that recurses (validation, logging, the reply's encoder)."""
    try:
        text = raw.decode("utf-8")
        body = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_JSON, "nested deeper than %d levels" % MAX_DEPTH) \
            from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, "not UTF-8 JSON: %s" % exc) from None
    brackets = text.count("[") + text.count("{")
    if brackets > MAX_DEPTH and _depth_over(body, MAX_DEPTH):
        raise ProtocolError(ErrorCode.BAD_JSON, "nested deeper than %d levels" % MAX_DEPTH)
    return body


def _no_constant(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


def parse_request(raw: bytes, adapter: TypeAdapter, known: Dict[str, Any]) -> BaseModel:
    """A validated request, or ProtocolError with the most specific code."""
    body = load_json(raw)
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "a request is a JSON object, got %s"
                            % type(body).__name__)
    version = body.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, "this daemon speaks protocol v%d, "
                            "got v=%r" % (PROTOCOL_VERSION, version))
    cmd = body.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "cmd must be a string")
    if cmd not in known:
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND, "unknown command %r (known: %s)"
                            % (cmd[:64], ", ".join(sorted(known))))
    try:
        return adapter.validate_python(body)
    except ValidationError as exc:
        args_only = all(item["loc"][1:2] == ("args",) for item in exc.errors())
        code = ErrorCode.INVALID_ARGS if args_only else ErrorCode.BAD_REQUEST
        raise ProtocolError(code, _first_error(exc)) from None


def request_id(raw: bytes) -> Optional[str]:
    """The id of a request that failed validation, if one can be read, to echo back."""
    try:
        value = load_json(raw).get("id")
    except (ProtocolError, AttributeError):
        return None
    return value if isinstance(value, str) and len(value) <= MAX_ID_LENGTH else None


def ok_reply(rid: Optional[str], result: Dict[str, Any]) -> Dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": rid, "ok": True, "result": result, "ts": time.time()}


def error_reply(rid: Optional[str], code: str, message: str) -> Dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": rid, "ok": False, "ts": time.time(),
            "error": {"code": code, "message": message}}


def encode(message: Dict[str, Any]) -> bytes:
    """Strict JSON: a non-finite float (a diverged loss, an unset rate) goes out as null."""
    try:
        text = json.dumps(message, default=str, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(message), default=str, separators=(",", ":"),
                          allow_nan=False)
    return text.encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
