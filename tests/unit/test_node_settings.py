"""The memory a node offers is what its sandbox children can really get: under a lower
inherited address-space limit, an owner's larger hardware.memory_mb is not advertised; and the
per-peer byte budgets the owner sets."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

LIMIT = 3 << 30  # 3 GiB of address space, as `ulimit -v` or systemd LimitAS would set


def _offered(configured: int) -> int:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

    out = subprocess.run(
        [sys.executable, "-c", f"from p2pfleet.live.node import memory_mb; print(memory_mb({configured}))"],
        preexec_fn=lower, capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout.strip())


def test_an_owners_memory_setting_above_the_process_limit_is_not_offered():
    assert _offered(64 * 1024) == LIMIT >> 20
    assert _offered(1024) == 1024
    assert _offered(0) <= LIMIT >> 20


def test_peer_budgets_come_from_the_node_settings_and_a_day_holds_a_minute():
    from p2pfleet.live.config import ConfigError, NodeSettings
    from p2pfleet.live.node import peer_budget_limits

    limits = peer_budget_limits(NodeSettings(peer_budget_mb_per_minute=2, peer_budget_mb_per_day=10))
    assert (limits.per_minute, limits.per_day) == (2_000_000, 10_000_000)
    with pytest.raises(ConfigError, match="peer_budget_mb_per_day = 1 is below"):
        peer_budget_limits(NodeSettings(peer_budget_mb_per_minute=2, peer_budget_mb_per_day=1))
