"""The checks every request passes before it reaches a route: the Host header, and CORS.

A web page the user visits may send requests to the server on 127.0.0.1. Three rules keep it out:
  - Host must name the server (http.HostCheck), so DNS rebinding cannot make the browser treat the
    server as the attacker's own origin and read its replies: 403 otherwise;
  - POST bodies must be `Content-Type: application/json` (checked by the route), so a page cannot send
    a "simple" cross-origin request (text/plain, forms) that the browser lets through without asking;
  - CORS preflights are answered only for origins given with --cors-origin, so by default a page's
    JSON request is never sent, and its response never readable. Refused preflights get 403.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from gptoss_tune.errors import UserError
from gptoss_tune.serve.http import HostCheck
from gptoss_tune.serve.openai_schema import ApiError

_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~, -]*$")  # token characters, commas and spaces
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s?#]+$")
PREFLIGHT_MAX_AGE = 600


def check_cors_origin(origin: str) -> str:
    """A --cors-origin value: scheme://host[:port] as browsers send it in Origin, or * for any."""
    o = origin.strip().rstrip("/")
    if o == "*" or o == "null" or _ORIGIN.match(o.lower()):
        return o.lower() if o != "null" else o
    raise UserError(
        f"--cors-origin {origin!r}: give an origin as browsers send it, scheme://host[:port] without a path "
        "(e.g. https://chat.example.com), or *"
    )


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
        }  # fmt: skip
    )
    await send({"type": "http.response.body", "body": data})


class RequestGuard:
    """ASGI middleware around the app: the Host check, CORS preflights and CORS response headers."""

    def __init__(self, app, bound_host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
                 cors_origins: Iterable[str] = ()):  # fmt: skip
        self.app = app
        self.hosts = HostCheck(bound_host, allowed_hosts)
        self.origins = {check_cors_origin(o) for o in cors_origins}

    def _origin_allowed(self, origin: str | None) -> bool:
        return origin is not None and bool(self.origins) and ("*" in self.origins or origin.lower() in self.origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, bytes] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.lower(), v)
        host = headers.get(b"host")
        host = host.decode("latin-1") if host is not None else None
        if not self.hosts.allows(host):
            msg = (
                f"the Host header {host[:100]!r} does not name this server; if clients reach it through another "
                "name (a reverse proxy), start the server with --allowed-host NAME"
            )
            return await _send_json(send, 403, ApiError(403, msg, code="host_not_allowed").body())
        origin = headers.get(b"origin")
        origin = origin.decode("latin-1") if origin is not None else None
        allowed = self._origin_allowed(origin)
        if scope["method"] == "OPTIONS" and origin is not None and b"access-control-request-method" in headers:
            if not allowed:
                msg = (
                    f"cross-origin requests from {origin[:100]!r} are not allowed; start the server with "
                    "--cors-origin ORIGIN to allow a web page there to call it"
                )
                return await _send_json(send, 403, ApiError(403, msg, code="cors_not_allowed").body())
            requested = headers.get(b"access-control-request-headers", b"").decode("latin-1")
            allow_headers = requested if requested and _HEADER_LIST.match(requested) else "authorization, content-type"
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [
                        (b"access-control-allow-origin", origin.encode("latin-1")),
                        (b"access-control-allow-methods", b"GET, POST"),
                        (b"access-control-allow-headers", allow_headers.encode("latin-1")),
                        (b"access-control-max-age", str(PREFLIGHT_MAX_AGE).encode()),
                        (b"vary", b"Origin"),
                    ],
                }
            )
            return await send({"type": "http.response.body", "body": b""})
        if not allowed:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", []),
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"vary", b"Origin"),
                ]
            await send(message)

        return await self.app(scope, receive, send_with_cors)
