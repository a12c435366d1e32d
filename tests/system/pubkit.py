"""What the system tests of publishing share: `p2pfleet` command lines for a publisher data
dir with test settings, and attaching the SDK once `job serve` is up."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pfleet.cli.main", *args]


def pub_args(pub_root: Path, network: str, settings: Mapping[str, str], *extra: str) -> list[str]:
    """`p2pfleet --data-dir <pub_root> --network <network> -s k=v ... <extra>`."""
    args = ["--data-dir", str(pub_root), "--network", network]
    for k, v in settings.items():
        args += ["-s", f"{k}={v}"]
    return cli(*args, *extra)


def try_attach(path: Path):
    """The SDK client of the publisher serving in `path`, or None while it is not up."""
    from p2pfleet.sdk import SdkError, attach

    try:
        return attach(path)
    except SdkError:
        return None
