"""The explorer's dashboard in headless Chromium (Debian's chromium and chromium-driver,
installed by .ci/run; Selenium uses the system driver, no download).

On CI (CI=true) a missing browser fails the test; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

NETWORK = "browsertest"


def _browser() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    return (chromium, driver) if chromium and driver else None


@pytest.fixture
def browser(tmp_path):
    found = _browser()
    if found is None:
        why = "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-background-networking",
                "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    service = Service(executable_path=driver, log_output=str(tmp_path / "chromedriver.log"))
    drv = webdriver.Chrome(service=service, options=options)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def test_dashboard_lists_peers_and_opens_a_peer(tmp_path, browser):
    from selenium.webdriver.common.by import By

    from p2pfleet.live.localfleet import P2PFLEET, LocalFleet, wait_for

    with LocalFleet(tmp_path / "fleet", 3, network=NETWORK) as fleet:
        explorer = subprocess.Popen(
            [*P2PFLEET, "--data-dir", str(tmp_path / "explorer"), "explore", "--serve",
             "--port", "0", "--interval", "2", "--network", NETWORK,
             "--bootstrap", fleet.nodes[0].addr],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = explorer.stdout.readline()
            assert "explorer dashboard at " in line, line
            base = line.split(" at ")[1].strip()

            def all_listed() -> bool:
                browser.get(base + "/")
                rows = browser.find_elements(By.CSS_SELECTOR, "table#peers tr.peer")
                text = browser.find_element(By.TAG_NAME, "body").text
                return len(rows) >= 3 and all(n.peer_id in text for n in fleet.nodes)

            wait_for(all_listed, 60, "the dashboard to list every peer", interval=1.0)
            assert browser.find_elements(By.ID, "capacity-chart")
            browser.save_screenshot(str(tmp_path / "explorer-peers.png"))

            target = fleet.nodes[2].peer_id
            link = browser.find_element(By.CSS_SELECTOR, f'a.peer-link[href="/peers/{target}"]')
            link.click()
            wait_for(lambda: browser.find_elements(By.ID, "peer-detail"), 15, "the detail page")
            detail = browser.find_element(By.ID, "peer-detail").text
            assert target in detail and "available" in detail and "benchmark" in detail
            assert browser.current_url.endswith(f"/peers/{target}")
            browser.save_screenshot(str(tmp_path / "explorer-peer.png"))
            assert (tmp_path / "explorer-peer.png").stat().st_size > 1000
        finally:
            explorer.kill()
            explorer.wait(10)
