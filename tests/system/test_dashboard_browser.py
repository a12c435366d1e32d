"""The owner's dashboard (`p2pfleet node dashboard`) in headless Chromium, driven by a real
node replaying a vehicle trace and computing a real job for a real `job serve` publisher.

Screenshots at desktop and phone width go to the test's tmp dir (and to the directory
SCREENSHOTS_DIR names, if set: that is how docs/dashboard.png is made).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pubkit import pub_args, try_attach

pytestmark = pytest.mark.system

NETWORK = "dashtest"
PUBLISHING = {"publishing.request_interval_s": "0.2", "publishing.announce_interval_s": "1",
              "publishing.cross_class_wait_s": "1"}
# Plugged in and charging: 60 % rising two points every ten trace minutes (ten real seconds
# at speed 60), so the battery timeline has a slope to draw.
TRACE = [{"format": "p2pfleet-vehicle-trace", "version": 1, "start": 0, "loop": False,
          "description": "parked at home, plugged in, charging"},
         {"t": 0, "parked": True, "plugged_in": True, "soc_pct": 60, "charge_limit_pct": 90,
          "network": "wifi", "metered": False},
         *({"t": 600 * k, "soc_pct": 60 + 2 * k} for k in range(1, 13))]


def _quiet_hours_far_from_now() -> str:
    """An hour of quiet hours twelve hours away: the policy reads the wall clock, and quiet
    hours that include now would keep the node out of the mesh (it would never listen)."""
    h = (time.localtime().tm_hour + 12) % 24
    return f"{h:02d}:00-{(h + 1) % 24:02d}:00"


def _shots(browser, tmp_path: Path, name: str) -> None:
    out = [tmp_path]
    if os.environ.get("SCREENSHOTS_DIR"):
        out.append(Path(os.environ["SCREENSHOTS_DIR"]))
    for width, height, suffix in ((1280, 1700, ""), (390, 844, "-phone")):
        browser.set_window_size(width, height)
        browser.refresh()
        if suffix:  # the page fits a phone: nothing wider than the window
            scroll = browser.execute_script("return document.documentElement.scrollWidth")
            inner = browser.execute_script("return document.documentElement.clientWidth")
            assert scroll <= inner + 1, (scroll, inner)
        for d in out:
            d.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(d / f"{name}{suffix}.png"))
        assert (tmp_path / f"{name}{suffix}.png").stat().st_size > 1000


def test_dashboard_shows_a_computing_car_and_its_ledger(tmp_path, browser):
    from selenium.webdriver.common.by import By

    from p2pfleet.live.localfleet import P2PFLEET, LocalFleet, wait_for
    from p2pfleet.zoo import digits

    quiet = _quiet_hours_far_from_now()
    trace = tmp_path / "car.jsonl"
    trace.write_text("\n".join(json.dumps(line) for line in TRACE) + "\n")
    fleet = LocalFleet(tmp_path / "f", 1, network=NETWORK, traces={0: str(trace)},
                       trace_speedup=60.0, settings={
                           "publishers.serve_anyone": "true", "publishers.retry_base_s": "1",
                           "policy.max_threads": "1", "policy.quiet_hours": quiet})
    serve = dash = None
    try:
        fleet.start()
        node = fleet.nodes[0]
        pub_root = tmp_path / "pub"
        serve = subprocess.Popen(
            pub_args(pub_root, NETWORK, PUBLISHING, "job", "serve", "--listen",
                     "/ip4/127.0.95.1/tcp/0", "--bootstrap", node.addr, "--trust", node.peer_id),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        client = wait_for(lambda: try_attach(pub_root / "publisher"), 60, "the publisher")
        model, name, inputs = digits()
        job = client.submit(model, inputs(200), shard_size=50, micro_batch=10, quorum=1,
                            recheck_rate=0.0, audit_rate=0.0, known_answer_rate=0.0)
        done = client.wait(job, timeout=240)
        assert done["state"] == "done", done

        def ledger() -> dict:
            out = subprocess.run([*P2PFLEET, "--data-dir", str(node.data_dir), "--json",
                                  "ledger"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        # every shard's receipt has arrived (quorum 1: the node did all four)
        data = wait_for(lambda: (d := ledger())["publishers"] and
                        d["publishers"][0]["receipts"] >= 4 and d, 60, "the receipts")
        (pub,) = data["publishers"]

        dash = subprocess.Popen(
            [*P2PFLEET, "--data-dir", str(node.data_dir), "node", "dashboard", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = dash.stdout.readline()
        assert "dashboard at http://127.0.0.1:" in line, (line, dash.stderr.read())
        url = line.split(" at ", 1)[1].strip()

        browser.get(url)
        state = browser.find_element(By.ID, "computing").text
        status = node.ask("status")
        assert state == ("computing" if status["computing"] else "not computing")
        why = browser.find_element(By.ID, "why").text
        assert status["why"][0] in why
        assert f"quiet hours: {quiet}" in browser.find_element(By.ID, "changes").text
        # credit numbers are the ledger's
        section = browser.find_element(
            By.CSS_SELECTOR, f'section.publisher[data-publisher="{pub["publisher"]}"]')
        for field in ("promised", "paid", "unpaid"):
            shown = section.find_element(By.CSS_SELECTOR, f".credit-{field}").text
            assert shown == str(pub["credit"][field]), (field, shown, pub["credit"])
        assert pub["credit"]["paid"] > 0
        assert section.find_element(By.CSS_SELECTOR, ".results").text == str(
            pub["results_delivered"])
        for chart in ("credit-chart-0", "results-chart-0", "kwh-chart-0", "battery-chart"):
            assert browser.find_elements(By.ID, chart), chart
        assert "data used today" in browser.find_element(By.ID, "today").text
        assert "battery" in browser.find_element(By.ID, "vehicle-now").text
        # the battery line has more than one point by now (the trace charges the car)
        wait_for(lambda: len(node.ask("status")["timeline"]) >= 3, 60, "a charging timeline")
        _shots(browser, tmp_path, "dashboard")
        # the page carries no script and fetches nothing
        assert not browser.find_elements(By.TAG_NAME, "script")
        # not served anywhere but its secret path
        browser.get(url.rsplit("/", 2)[0] + "/")
        assert "not found" in browser.find_element(By.TAG_NAME, "body").text
    finally:
        if dash is not None:
            dash.kill()
            dash.wait(10)
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
        fleet.stop()
