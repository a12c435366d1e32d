"""Serve the owner's dashboard on loopback only, behind a secret path.

Why a separate command rather than a page inside the node: it is off unless the owner runs
it, it works while the node is stopped (the ledger is still there), and the node itself
opens no port. Why a secret path: any local user can connect to a loopback port, while the
control socket and the ledger are readable only by the owner, so the page answers only at
/<token>/ (printed once, like Jupyter's token); this also defeats DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import secrets
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


class BindError(ValueError):
    """The dashboard was asked to listen somewhere other than loopback."""


def loopback_host(host: str) -> str:
    """`host` if it is a loopback address (127.0.0.0/8, ::1; 'localhost' means 127.0.0.1);
    otherwise BindError naming it."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise BindError(f"--bind {host!r} is not an IP address: the dashboard listens only on "
                        "loopback (127.0.0.1 or ::1)") from None
    if not addr.is_loopback:
        raise BindError(f"--bind {host}: the dashboard listens only on loopback (127.0.0.1 "
                        "or ::1), never on an address other machines can reach; to look at "
                        "it from elsewhere, use an SSH tunnel")
    return str(addr)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], render: Callable[[], str], token: str):
        if ":" in addr[0]:
            import socket

            self.address_family = socket.AF_INET6
        self.render = render
        self.token = token
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == f"/{self.server.token}":
            self.send_response(301)
            self.send_header("Location", f"/{self.server.token}/")
            self.end_headers()
            return
        if path != f"/{self.server.token}/":
            status, body = 404, b"not found (the dashboard's address is printed when it starts)\n"
            ctype = "text/plain; charset=utf-8"
        else:
            try:
                status, body, ctype = 200, self.server.render().encode(), "text/html; charset=utf-8"
            except Exception as exc:  # show the owner what broke instead of a dead socket
                status, body = 500, f"could not build the page: {exc}\n".encode()
                ctype = "text/plain; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are not logged: the token is in every path


class Dashboard:
    """A running dashboard server; `url` is where the owner opens it."""

    def __init__(self, host: str, port: int, render: Callable[[], str]):
        host = loopback_host(host)
        self.token = secrets.token_urlsafe(18)
        self.server = _Server((host, port), render, self.token)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.server.server_address[1]}/{self.token}/"

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
