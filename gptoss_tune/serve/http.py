"""Running the server: binding the socket (before the model loads), the loopback rule, the API key and
Host header rules, a background thread."""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from gptoss_tune.errors import UserError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_key(api_key: str | None, source: str = "--api-key") -> None:
    """An API key that no request could match is a start-up error, not a server that answers 401 to all."""
    if api_key is None:
        return
    if not api_key.strip():
        raise UserError(
            f"{source} is empty; set a key (clients send 'Authorization: Bearer KEY') or leave it unset "
            "to serve without one (loopback only)"
        )
    if api_key != api_key.strip() or not api_key.isprintable() or not api_key.isascii():
        raise UserError(
            f"{source}: the key has spaces at its ends or characters other than printable ASCII, which an "
            "Authorization header cannot carry as they are; choose another key"
        )


def check_bind(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise UserError(
            f"--host {host} would expose the server beyond this machine without authentication; "
            f"pass --api-key KEY (clients send 'Authorization: Bearer KEY') or bind 127.0.0.1"
        )


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host == ""


def host_name(header: str) -> str:
    """The name or address in a Host header, without the port and IPv6 brackets, lower case."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        value = value[1:end] if end > 0 else value
    elif value.count(":") == 1:
        value = value.rsplit(":", 1)[0]
    return value.rstrip(".")


def check_allowed_host(name: str) -> str:
    """An --allowed-host value: a host name or address (a port is dropped), or * for any."""
    name = name.strip()
    if name == "*":
        return name
    if not name or any(c in name for c in "/ @?#") or "://" in name:
        raise UserError(f"--allowed-host {name!r}: give a host name as clients write it (e.g. chat.example.com), or *")
    return host_name(name)


class HostCheck:
    """Which Host headers the server answers, against DNS rebinding: a web page whose name an attacker
    re-points at 127.0.0.1 reaches the server with its own name in Host, which is refused.

    Allowed: the bound address (for a loopback bind any loopback address, and `localhost`; for a wildcard
    bind such as 0.0.0.0 any address, `localhost` and this machine's host name), a name given as --host,
    and the --allowed-host names (a reverse proxy's public name; `*` allows any). A request without Host
    (HTTP/1.0; browsers always send one) is allowed."""

    def __init__(self, bound: str, allowed: Iterable[str] = ()):
        bound = bound.strip("[]").lower()
        allowed = [check_allowed_host(a) for a in allowed]
        self.any = "*" in allowed
        self.names = set(allowed)
        self.wildcard = _is_wildcard(bound)
        self.loopback = is_loopback(bound)
        try:
            self.address = ipaddress.ip_address(bound)
        except ValueError:
            self.address = None
            self.names.add(bound)  # --host NAME
        if self.loopback or self.wildcard:
            self.names.add("localhost")
        if self.wildcard:
            hostname = socket.gethostname().lower()
            self.names |= {hostname, hostname.split(".")[0]}

    def allows(self, header: str | None) -> bool:
        if header is None or self.any:
            return True
        name = host_name(header)
        if name in self.names:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        if self.wildcard:
            return True
        if self.loopback:
            return address.is_loopback
        return address == self.address


@dataclass
class RunningServer:
    """A uvicorn server running in a background thread (tests and the demo)."""

    server: object
    thread: threading.Thread
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0 picks a free port), or a one-line UserError saying why not.

    The command binds before it loads the model, so a busy port or a bad address is reported at once
    rather than after minutes of loading, and the port stays reserved meanwhile."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be between 0 and 65535 (0 picks a free port)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (socket.gaierror, OSError) as e:
        raise UserError(f"--host {host}: cannot resolve or use this address ({e.strerror or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = (
            "another server is listening there; stop it or choose another --port"
            if e.errno == errno.EADDRINUSE
            else "check --host and --port"
        )
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} ({hint})") from None
    return sock


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> RunningServer:
    """Serve `app` with uvicorn in a daemon thread on host:port (0 picks a free port); returns once it listens."""
    import uvicorn

    sock = bind_socket(host, port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="gptoss-serve")
    thread.start()
    deadline = time.time() + timeout
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return RunningServer(server, thread, host, port)
