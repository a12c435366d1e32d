"""The netbed tier: tests that build Linux network namespaces (tools/netbed). They need
root, iproute2 and nftables (CI runs as root and .ci/run installs them); elsewhere they skip,
naming what is missing. Helpers are in bedkit.py."""

from __future__ import annotations

import pytest
from bedkit import TOKENS, need_bed, netbed, root_veths


@pytest.fixture(scope="session", autouse=True)
def _root_veths_before() -> set[str]:
    return root_veths() if netbed.missing() is None else set()


@pytest.fixture
def new_bed():
    """Build a fresh bed: `with new_bed() as bed` (skips when the bed cannot run here)."""
    need_bed()

    def make() -> netbed.Bed:
        bed = netbed.Bed()
        TOKENS.append(bed.token)
        return bed
    return make
