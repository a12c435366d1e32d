"""Logging for a running node: structured JSON lines, rotated, quiet by default.

Logs go to <data dir>/logs/node.log (5 files of 5 MiB) and, at warning and above, to
stderr. At the default level (warning) nothing logs peer IP addresses: py-libp2p's own
loggers, which do, are held at error unless the level is debug.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from pathlib import Path

LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
          "debug": logging.DEBUG}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "t": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(logs_dir: Path, level: str) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    logs_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.handlers.RotatingFileHandler(
        logs_dir / "node.log", maxBytes=5 * 2**20, backupCount=4, encoding="utf-8")
    file_handler.setFormatter(JsonFormatter())
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(file_handler)
    root.addHandler(console)
    root.setLevel(LEVELS[level])
    logging.getLogger("p2pfleet").setLevel(LEVELS[level])
    libp2p_level = logging.DEBUG if level == "debug" else logging.ERROR
    for name in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(name).setLevel(libp2p_level)
