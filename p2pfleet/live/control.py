"""The node's local control endpoint: a unix socket (0600) speaking JSON lines.

One request per connection: the client sends {"cmd": "...", ...}\\n and reads one JSON
reply line: {"ok": true, ...} or {"ok": false, "error": "..."}. Only the owner (file
permissions on the socket and its 0700 data dir) can talk to it; nothing listens on the
network. Commands: status, peers, lookup, reach, jobs, announce, pause, resume, stop (with
"after_current").
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

MAX_REQUEST = 4096
REPLY_TIMEOUT_S = 10.0

Handler = Callable[[dict], Awaitable[dict]]


class ControlError(Exception):
    """The node could not be reached or refused the request."""


async def serve_control(path: Path, handler: Handler, *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    path = Path(path)
    if path.exists() or path.is_symlink():
        path.unlink()  # a stale socket of a dead node; the data dir lock says we own it
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            reply: dict
            try:
                with trio.fail_after(REPLY_TIMEOUT_S):
                    request = await _read_line(stream)
                    reply = await handler(request)
            except (ValueError, trio.TooSlowError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            try:
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except trio.BrokenResourceError:
                pass

    try:
        async with listener:
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(one, stream)
    finally:
        path.unlink(missing_ok=True)


async def _read_line(stream: trio.SocketStream) -> dict:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too long")
    request = json.loads(buf.split(b"\n", 1)[0] or b"null")
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise ValueError('expected {"cmd": "..."}')
    return request


def request(path: Path, cmd: str, timeout: float = REPLY_TIMEOUT_S, **args: Any) -> dict:
    """Blocking client for the CLI: send one command, return the reply's fields."""
    path = Path(path)
    if not path.exists():
        raise ControlError(f"no node is running with this data dir (no {path})")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionRefusedError, FileNotFoundError):
            raise ControlError(f"no node answers on {path} (it may have stopped)") from None
        except socket.timeout:
            raise ControlError(f"the node did not answer within {timeout:.0f} s") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError("the node sent an unreadable reply") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "the node refused the request"))
    return reply
