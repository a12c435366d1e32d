"""`p2pfleet node dashboard` as a real process on a real data dir whose ledger holds real
signed leases, receipts and a hand-back; no node running (the page then shows the ledger)."""

from __future__ import annotations

import re
from html import unescape

import pytest

from p2pfleet.identity import load_key
from p2pfleet.store.ledger import Ledger
from p2pfleet.wire.envelope import seal
from p2pfleet.wire.kinds import HandBack
from test_cli import fails, run, run_json
from test_ledger_cli import NET, NOW, PUB_A, fill_ledger, lid

pytestmark = pytest.mark.system


@pytest.fixture
def node(tmp_path):
    dd = tmp_path / "node"
    run("--network", NET, "node", "init", "--anyone", data_dir=dd)
    fill_ledger(dd)
    me = load_key(dd / "key")
    body = HandBack(lease_id=lid(3), exp=NOW + 3_600_000, reason="departure", done=2,
                    batch_digests=(b"\x01" * 32, b"\x02" * 32), output_digest=None)
    with Ledger(dd / "ledger.sqlite") as led:
        led.enqueue(PUB_A.public_key, lid(3), "hand_back", seal(body, me, NET), body.exp, NOW)
    return dd


def test_page_written_once_shows_the_ledgers_numbers_and_hand_backs(node, tmp_path):
    out = tmp_path / "page.html"
    run("node", "dashboard", "--out", out, data_dir=node)
    page = out.read_text()
    assert "node not running" in page
    ledger = run_json("ledger", data_dir=node)
    for pub in ledger["publishers"]:
        section = page.split(f'data-publisher="{pub["publisher"]}"', 1)[1].split("</section>")[0]
        for field in ("promised", "paid", "unpaid"):
            shown = re.search(rf'class="credit-{field}">(\d+)<', section).group(1)
            assert int(shown) == pub["credit"][field], (field, pub["credit"])
    hand_backs = unescape(page.split('id="hand-backs"', 1)[1])
    assert 'class="reason">departure<' in hand_backs and PUB_A.peer_id[:8] in hand_backs


def test_only_loopback(node):
    line = fails("node", "dashboard", "--bind", "0.0.0.0", data_dir=node)
    assert "loopback" in line and "0.0.0.0" in line
    assert "loopback" in fails("node", "dashboard", "--bind", "192.0.2.1", data_dir=node)
