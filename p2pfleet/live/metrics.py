"""A Prometheus text endpoint for the node, on localhost by default.

GET /metrics answers in the Prometheus text exposition format (version 0.0.4); anything
else gets 404. It is a deliberately tiny HTTP/1.0 responder on trio (one request per
connection, bounded request size, short timeouts): the node must not pull a web framework
onto a car for one page. The values come from `Node.status_report()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

MAX_REQUEST = 8192
TIMEOUT_S = 5.0


def render(status: dict) -> str:
    """Prometheus text for a node status report."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float,
               labels: dict[str, str] | None = None) -> None:
        if not any(line.startswith(f"# HELP {name} ") for line in lines):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
        label = ""
        if labels:
            label = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"
        lines.append(f"{name}{label} {value}")

    metric("p2pfleet_info", "gauge", "Node software and network.", 1,
           {"version": status["version"], "network": status["network"],
            "peer_id": status["peer_id"]})
    metric("p2pfleet_uptime_seconds", "gauge", "Seconds since the node started.",
           status["uptime_s"])
    metric("p2pfleet_computing", "gauge", "1 while the vehicle policy lets the node compute.",
           int(status["computing"]))
    metric("p2pfleet_in_mesh", "gauge", "1 while the node is in the mesh.", int(status["in_mesh"]))
    metric("p2pfleet_peers", "gauge", "Connected peers.", status["peers"])
    metric("p2pfleet_jobs_heard", "gauge", "Job announcements held.", status.get("jobs_heard", 0))
    metric("p2pfleet_bytes_sent_total", "counter", "Bytes sent on libp2p connections.",
           status["bytes_sent"])
    metric("p2pfleet_bytes_received_total", "counter", "Bytes received on libp2p connections.",
           status["bytes_received"])
    metric("p2pfleet_mesh_joins_total", "counter", "Times the node joined the mesh.",
           status["mesh_joins"])
    metric("p2pfleet_mesh_leaves_total", "counter", "Times the node left the mesh.",
           status["mesh_leaves"])
    for reason in status["reasons"]:
        metric("p2pfleet_not_computing_because", "gauge",
               "Conditions that keep the node from computing (1 while they hold).", 1,
               {"code": reason["code"]})
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def serve_metrics(host: str, port: int, status: Callable[[], dict], *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve /metrics; reports the bound (host, port) through task_status."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(TIMEOUT_S):
                    request = b""
                    while b"\r\n\r\n" not in request and b"\n\n" not in request:
                        chunk = await stream.receive_some(MAX_REQUEST)
                        if not chunk:
                            break
                        request += chunk
                        if len(request) > MAX_REQUEST:
                            break
                    first = request.split(b"\r\n", 1)[0].split()
                    if len(first) >= 2 and first[0] == b"GET" and first[1] in (b"/metrics", b"/"):
                        body = render(status()).encode()
                        head = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
                    else:
                        body = b"not found\n"
                        head = b"HTTP/1.0 404 Not Found\r\nContent-Length: 10\r\n\r\n"
                    await stream.send_all(head + body)
            except (trio.TooSlowError, trio.BrokenResourceError):
                pass

    task_status.started((sockname[0], sockname[1]))
    await trio.serve_listeners(one, listeners)
