"""The live dashboard in a real browser (Debian's Chromium, driven by Playwright), its JSON API
and its Prometheus metrics, on a worker that runs with a bearer token while traffic flows."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydantic import SecretStr

from quotaflow import QuotaClient
from quotaflow.settings import QuotaflowSettings
from quotaflow_stream.harness import WorkerProcess
from tests.support import ROOT, wait_for

pytestmark = pytest.mark.e2e

TOKEN = "dash-test-token"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
# The flags a root, offline, headless Chromium needs here (no sandbox as root, no background
# connections the closed network would refuse).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


PIPELINE_POLICIES = (
    "version: 1\npolicies:\n"
    "  - {name: dash, keys: ['dash-*'], max_staleness: 60,"
    " limits: {requests_per_minute: 40, tokens_per_minute: 20000, cost_per_day: 50}}\n"
)


@pytest.fixture(scope="module")
def settings(settings: QuotaflowSettings) -> QuotaflowSettings:
    settings.worker.api_token = SecretStr(TOKEN)
    return settings


def get(url: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Traffic(threading.Thread):
    """An SDK instance calling (and being throttled) until stopped."""

    def __init__(self, settings: QuotaflowSettings) -> None:
        super().__init__(daemon=True)
        self.client = QuotaClient(settings).open()
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.wait(0.1):
            key = f"dash-{i % 3}"
            model = "gpt-4o" if i % 2 else "gpt-4o-mini"
            if self.client.check(key, model, tokens=300).allowed:
                self.client.record(key, model, prompt_tokens=250, completion_tokens=50)
            i += 1


def records_in_api(base: str) -> dict[str, int]:
    status, body = get(f"{base}/api/keys")
    assert status == 200
    return {row["key"]: row["totals"]["records"] for row in json.loads(body)["keys"]}


def test_api_and_metrics_need_the_token_and_answer_for_every_key(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    with QuotaClient(settings) as client:
        client.wait_ready(30)
        client.record("dash-api", "gpt-4o", prompt_tokens=5)
    base = worker.base_url
    wait_for(lambda: records_in_api(base).get("dash-api") == 1, what="the key in /api/keys")
    assert get(f"{base}/api/keys", token=None)[0] == 401
    assert get(f"{base}/api/keys", token="wrong")[0] == 401
    assert get(f"{base}/metrics", token=None)[0] == 401
    status, body = get(f"{base}/api/keys/dash-api")
    assert status == 200 and json.loads(body)["totals"]["records"] == 1
    assert get(f"{base}/api/keys/nobody")[0] == 404
    status, body = get(f"{base}/metrics")
    text = body.decode()
    assert status == 200
    for name in ("quotaflow_records_total", "quotaflow_consumer_lag", "quotaflow_dlq_records_total",
                 "quotaflow_states_published_total", "quotaflow_denials_total",
                 "quotaflow_records_per_second"):  # fmt: skip
        assert name in text, name
    # usage and spend per policy, never per key: what the one record of dash-api used
    record_cost = json.loads(get(f"{base}/api/keys/dash-api")[1])["totals"]["cost_micros"]
    assert 'quotaflow_usage_total{policy="dash",unit="prompt_tokens"} 5.0' in text
    assert 'quotaflow_usage_total{policy="dash",unit="records"} 1.0' in text
    assert f'quotaflow_cost_usd_total{{policy="dash"}} {record_cost / 1e6}' in text
    assert "dash-api" not in text
    # bound to 127.0.0.1 itself, not every address: another address of this host (another of
    # the loopback range, which a socket bound to 0.0.0.0 would also answer on) is refused
    port = worker.settings.worker.web_port
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.2", port), 5):
        pass


def test_dashboard_updates_live_and_matches_the_api(
    settings: QuotaflowSettings, worker: WorkerProcess
) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is installed by `make install`"
    base = worker.base_url
    traffic = Traffic(settings)
    traffic.start()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(f"{base}/?token={TOKEN}")
            page.wait_for_function("document.getElementById('status').textContent === 'live'")
            first = int(page.inner_text("#records").replace(",", ""))
            # the numbers move without a reload while the traffic runs
            shown = "Number(document.getElementById('records').textContent.replace(/,/g, ''))"
            page.wait_for_function(f"{shown} > {first}", timeout=15_000)
            page.wait_for_selector("tr[data-key='dash-0']")
            page.wait_for_selector("#models [data-model='gpt-4o']")
            page.wait_for_selector("#throttles tr[data-key]", timeout=30_000)  # a key hits 40 rpm
            traffic.stop.set()
            traffic.join()
            assert traffic.client.close() == 0

            # once the traffic stops, every key's figure on the page equals the API's
            def page_matches_api() -> bool:
                api = records_in_api(base)
                shown = {
                    k: int(page.inner_text(f"tr[data-key='{k}'] td.records").replace(",", ""))
                    for k in ("dash-0", "dash-1", "dash-2")
                }
                return all(shown[k] == api.get(k) for k in shown)

            wait_for(page_matches_api, timeout=15, what="the page to show the API's totals")

            # spend: the top spenders panel shows each key's last-day spend as the API says it,
            # and the budget's meter reads in dollars
            def spenders_match_api() -> bool:
                _, body = get(f"{base}/api/keys")
                api = {r["key"]: r["spend"]["last_day_usd"] for r in json.loads(body)["keys"]}
                shown = {
                    k: page.inner_text(f"#spenders [data-spender='{k}'] .usd")
                    for k in ("dash-0", "dash-1", "dash-2")
                }
                return all(shown[k] == f"${api[k]}" for k in shown)

            wait_for(spenders_match_api, timeout=15, what="the page to show the API's spend")
            budget = page.inner_text("tr[data-key='dash-0'] [data-limit='cost_per_day']")
            assert budget.startswith("$") and budget.endswith(" / $50.00"), budget
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            browser.close()
        # offline: everything the page loaded came from the worker itself
        assert requested and all(url.startswith(base) for url in requested), requested
    finally:
        traffic.stop.set()
