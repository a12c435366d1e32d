"""A small real HTTP/1.1 server on loopback for provider tests: it answers recorded
responses (fixture files) per path, or misbehaves on request (hang, trickle, 5xx)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    behaviour: str = "answer"  # answer | hang | trickle


@dataclass
class RecordedServer:
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def answer(self, path: str, fixture: str | bytes, status: int = 200) -> None:
        body = fixture if isinstance(fixture, bytes) else (FIXTURES / fixture).read_bytes()
        self.routes[path] = Route(body, status)

    def misbehave(self, path: str, behaviour: str, status: int = 200) -> None:
        self.routes[path] = Route(b'{"response": null}' + b" " * 4096, status, behaviour)

    def hits(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p.split("?")[0] == path)

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def _handle(self, stream: trio.SocketStream) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < 16384:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            target = lines[0].split(" ")[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:])}
            self.requests.append((target, headers))
            route = self.routes.get(target.split("?")[0], Route(b'{"error": "not found"}', 404))
            if route.behaviour == "hang":
                await trio.sleep_forever()
            reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 408: "Request Timeout",
                      429: "Too Many Requests", 503: "Service Unavailable"}.get(route.status, "X")
            await stream.send_all(
                f"HTTP/1.1 {route.status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(route.body)}\r\nConnection: close\r\n\r\n".encode())
            if route.behaviour == "trickle":
                for i in range(len(route.body)):
                    await stream.send_all(route.body[i:i + 1])
                    await trio.sleep(0.05)
            else:
                await stream.send_all(route.body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()
