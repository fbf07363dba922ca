"""Cheap checks of a request before anything expensive (rendering, tokenizing, the model) sees it.

In order: the body's size (Content-Length, then the bytes as they arrive: refused before parsing), the
JSON parse (malformed JSON, nesting deeper than Python's parser allows, integers too long to convert),
then one walk over the parsed body: nesting depth, every string's length and UTF-8 validity (a lone
surrogate such as "\\ud800" is valid JSON but no text), and the number of messages. Each refusal is an
ApiError (400, or 413 for the body size) naming the field, never a 500.

Why these limits: rendering an unpunctuated CJK string takes time quadratic in its length in the
o200k tokenizer (8,000 characters 1.1 s, 32,000 characters 8.3 s on one CPU core), and the render holds
a request slot while it runs; 4,000 short messages render in 1.6 s. The body limit bounds what the
parser holds in memory (8 MB of JSON parses in 0.2 s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gptoss_tune.errors import UserError
from gptoss_tune.serve.openai_schema import ApiError

MAX_DEPTH = 64  # JSON nesting: a request's deepest legitimate part is a tool's JSON schema


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits (flags of `gptoss-tune serve`)."""

    max_request_bytes: int = 8 * 2**20  # --max-request-bytes
    max_messages: int = 2048  # --max-messages
    max_string_chars: int = 131072  # --max-string-chars (one string: a message's content, a tool's schema, ...)

    def __post_init__(self):
        for flag, value in (
            ("--max-request-bytes", self.max_request_bytes),
            ("--max-messages", self.max_messages),
            ("--max-string-chars", self.max_string_chars),
        ):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{flag} must be a positive integer, got {value}")


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is larger than this server accepts ({limit} bytes, --max-request-bytes)",
        code="request_too_large",
    )


def check_declared_size(content_length: str | None, limit: int) -> None:
    """Refuses a body whose Content-Length exceeds the limit before reading any of it."""
    if content_length is None:
        return
    try:
        n = int(content_length)
    except ValueError:
        raise ApiError(400, f"invalid Content-Length header {content_length[:40]!r}") from None
    if n > limit:
        raise _too_large(limit)


async def read_body(stream, limit: int) -> bytes:
    """The body from an ASGI byte stream, refused as soon as it passes `limit` bytes (chunked uploads too)."""
    parts, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def _path(parts: tuple) -> str:
    """messages[0].content; names over 64 characters are cut (they are echoed in the error message)."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p[:64]}" for p in parts).lstrip(".") or "body"


def _check_string(s: str, parts: tuple, limits: ServerLimits, what: str = "") -> None:
    """what: "a key in " when `s` is a key of the object at `parts` (never echoed: it may not be text)."""
    if len(s) > limits.max_string_chars:
        raise ApiError(
            400,
            f"{what}'{_path(parts)}' is {len(s)} characters long; this server accepts strings of up to "
            f"{limits.max_string_chars} characters (--max-string-chars)",
            param=_path(parts),
            code="string_too_long",
        )
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400,
            f"{what}'{_path(parts)}' contains a lone UTF-16 surrogate ({s[e.start]!r} at character {e.start}), "
            "which is not text; send valid Unicode",
            param=_path(parts),
        ) from None


def parse_body(raw: bytes, limits: ServerLimits) -> Any:
    """The parsed JSON body, after the checks in the module docstring (run it off the event loop)."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"the request body is nested too deeply (this server accepts {MAX_DEPTH} levels)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:200]})") from None
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        n = len(data["messages"])
        if n > limits.max_messages:
            raise ApiError(
                400,
                f"'messages' has {n} messages; this server accepts up to {limits.max_messages} (--max-messages)",
                param="messages",
                code="too_many_messages",
            )
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    while stack:  # iterative: a deep body must not exhaust the stack here either
        value, parts, depth = stack.pop()
        if isinstance(value, str):
            _check_string(value, parts, limits)
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise ApiError(
                    400,
                    f"'{_path(parts)}' is nested too deeply (this server accepts {MAX_DEPTH} levels)",
                    param=_path(parts),
                )
            if isinstance(value, dict):
                for k, v in value.items():
                    _check_string(k, parts, limits, what="a key in ")
                    stack.append((v, (*parts, k), depth + 1))
            else:
                stack.extend((v, (*parts, i), depth + 1) for i, v in enumerate(value))
    return data
