"""The explorer's views (issue 18 item 2) in headless Chromium, driven by a real fleet: three
`p2pfleet node start` workers computing a real job for a `p2pfleet job serve` publisher, and
the malicious node of test_explorer.py equivocating in the DHT (evidence the explorer proves
itself). Checked: the jobs view with progress over time, the peers list and a peer's page,
the capacity chart's script (hover values, class toggles), the mesh picture, and evidence one
click away with its signed messages; every page fits a phone-width window.

Screenshots at desktop and phone width go to the test's tmp dir (and to the directory
SCREENSHOTS_DIR names, if set: docs/explorer-*.png are the desktop ones at half size, cropped
to the content).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pubkit import pub_args, try_attach
from test_dashboard_browser import _shots

pytestmark = pytest.mark.system

NETWORK = "viewstest"
PUBLISHING = {"publishing.request_interval_s": "0.2", "publishing.announce_interval_s": "1",
              "publishing.cross_class_wait_s": "1"}
MALICIOUS = Path(__file__).with_name("test_explorer.py")


def _get(url: str) -> list:
    """The API's answer; [] while the first crawl still runs (503)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            return []
        raise


def test_explorer_views_of_a_fleet_at_work(tmp_path, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from p2pfleet.live.localfleet import P2PFLEET, LocalFleet, wait_for
    from p2pfleet.zoo import digits

    fleet = LocalFleet(tmp_path / "fleet", 3, network=NETWORK, settings={
        "publishers.serve_anyone": "true", "publishers.retry_base_s": "1",
        "policy.max_threads": "1"})
    serve = explorer = bad = None
    try:
        fleet.start()
        addrs = [fleet.wait_addr(n, 30) for n in fleet.nodes]
        bad = subprocess.Popen([sys.executable, str(MALICIOUS), "malicious", NETWORK, *addrs],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert bad.stdout.readline(), "the malicious node did not start"
        explorer = subprocess.Popen(
            [*P2PFLEET, "--data-dir", str(tmp_path / "explorer"), "explore", "--serve",
             "--port", "0", "--interval", "2", "--timeout", "20", "--network", NETWORK,
             "--bootstrap", addrs[0]],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = explorer.stdout.readline()
        assert "explorer dashboard at " in line, line
        base = line.split(" at ")[1].strip()

        # the explorer is in the mesh (and so on the jobs topic) before the job starts
        wait_for(lambda: {n.peer_id for n in fleet.nodes} <= {
            p["peer_id"] for p in _get(f"{base}/api/peers")}, 60, "the explorer's first crawl",
            interval=1.0)
        pub_root = tmp_path / "pub"
        serve = subprocess.Popen(
            pub_args(pub_root, NETWORK, PUBLISHING, "job", "serve", "--listen",
                     "/ip4/127.0.95.1/tcp/0", "--bootstrap", addrs[0],
                     *[a for n in fleet.nodes for a in ("--trust", n.peer_id)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        client = wait_for(lambda: try_attach(pub_root / "publisher"), 60, "the publisher")
        model, _name, inputs = digits()
        # long enough for several announcements (one per 5 s at most per live job)
        job = client.submit(model, inputs(4800), shard_size=25, micro_batch=5, quorum=2,
                            recheck_rate=0.0, audit_rate=0.0, known_answer_rate=0.0)

        # the explorer hears the job's announcements as shards are accepted
        def heard() -> dict | None:
            jobs = [j for j in _get(f"{base}/api/jobs") if j["job_id"] == job]
            return jobs[0] if jobs and len(jobs[0]["heard"]) >= 2 else None

        wait_for(heard, 120, "two announcements of the job at the explorer", interval=1.0)
        assert client.wait(job, timeout=240)["state"] == "done"
        wait_for(lambda: heard()["shards_done"] > 0, 60, "progress heard", interval=1.0)

        browser.get(base + "/jobs")
        assert job[:16] in browser.find_element(By.ID, "jobs").text
        text = browser.find_element(By.TAG_NAME, "body").text
        assert job in text
        assert "agreeing results accepted" in text and "shards/min" in text
        assert "What public messages can and cannot tell" in text
        assert browser.find_elements(By.CSS_SELECTOR, "svg.job-chart circle")
        _shots(browser, tmp_path, "explorer-jobs")

        # the peers page: the capacity chart, enhanced by the vendored script
        wait_for(lambda: len(_get(f"{base}/api/history")) >= 2, 60, "two capacity samples")
        browser.set_window_size(1280, 1700)
        browser.get(base + "/")
        chart = browser.find_element(By.ID, "capacity-chart")
        ActionChains(browser).move_to_element(chart).perform()
        wait_for(lambda: "samples/s" in browser.find_element(By.ID, "chart-readout").text, 10,
                 "the hover readout")
        toggles = browser.find_elements(By.CSS_SELECTOR, "input.series-toggle")
        assert len(toggles) >= 3  # available, used, one hardware class at least
        hw = toggles[2].find_element(By.XPATH, "..").get_attribute("data-series")
        series = browser.find_element(By.CSS_SELECTOR, f'g[data-series="{hw}:available"]')

        def shown() -> bool:
            return browser.execute_script(
                "return getComputedStyle(arguments[0]).display !== 'none'", series)

        assert shown()
        toggles[2].click()
        assert not shown()
        toggles[2].click()
        assert shown()
        assert "60 W per computing node" in browser.find_element(By.TAG_NAME, "body").text
        rows = browser.find_elements(By.CSS_SELECTOR, "table#peers tr.peer")
        text = browser.find_element(By.TAG_NAME, "body").text
        assert len(rows) >= 3 and all(n.peer_id in text for n in fleet.nodes)
        _shots(browser, tmp_path, "explorer-peers")

        # a peer one click from the list
        target = fleet.nodes[2].peer_id
        browser.find_element(By.CSS_SELECTOR, f'a.peer-link[href="/peers/{target}"]').click()
        wait_for(lambda: browser.find_elements(By.ID, "peer-detail"), 15, "the detail page")
        detail = browser.find_element(By.ID, "peer-detail").text
        assert target in detail and "available" in detail and "benchmark" in detail
        assert browser.current_url.endswith(f"/peers/{target}")
        _shots(browser, tmp_path, "explorer-peer")

        # the mesh: every node on a ring, DHT roles as identify told the explorer
        def mapped() -> bool:
            peers = _get(f"{base}/api/peers")
            return sum(p["dht_role"] == "server" for p in peers) >= 3 and all(
                any(p["peer_id"] == n.peer_id and p["reach"] == "direct" for p in peers)
                for n in fleet.nodes)

        wait_for(mapped, 60, "roles and reachability of every node", interval=1.0)
        browser.get(base + "/mesh")
        dots = browser.find_elements(By.CSS_SELECTOR, "svg#mesh a.mesh-peer")
        assert len(dots) >= 4
        assert "DHT servers" in browser.find_element(By.TAG_NAME, "body").text
        _shots(browser, tmp_path, "explorer-mesh")

        # evidence: one click from the list to the signed messages
        wait_for(lambda: any(e["kind"] == "equivocation" for e in _get(f"{base}/api/evidence")),
                 60, "the equivocation found", interval=1.0)
        browser.get(base + "/evidence")
        link = next(a for a in browser.find_elements(By.CSS_SELECTOR, "a.evidence-link")
                    if a.text == "equivocation")
        link.click()
        wait_for(lambda: browser.find_elements(By.ID, "why"), 15, "the evidence page")
        assert "same sequence number with different bodies" in browser.find_element(
            By.ID, "why").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "section.proof")) >= 2
        assert "signature verified on this page" in browser.find_element(
            By.TAG_NAME, "body").text
        _shots(browser, tmp_path, "explorer-evidence")
    finally:
        for proc in (serve, explorer, bad):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        fleet.stop()
