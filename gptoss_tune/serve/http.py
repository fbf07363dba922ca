"""Running the server: binding the socket (before the model loads), the loopback rule, a background thread."""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

from gptoss_tune.errors import UserError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise UserError(
            f"--host {host} would expose the server beyond this machine without authentication; "
            f"pass --api-key KEY (clients send 'Authorization: Bearer KEY') or bind 127.0.0.1"
        )


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
