"""The status page's server side: ``GET /`` for a browser, ``GET /v1/status`` (the
JSON the page reads, from the counters /metrics reports) and the minute ring that
keeps the last hour. The page itself runs in a real browser in test_status_page.py."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import re

import aiohttp
import pytest

import fakes
import helpers
import kiro2api
from fakes import Status
from helpers import API_KEY

BROWSER_ACCEPT = ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
                  "image/webp,image/apng,*/*;q=0.8")
BODY = {"model": "claude-sonnet-4-5", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Hi"}]}


async def fetch(url, path, *, method="GET", headers=None, body=None):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url + path, headers=headers or {},
                                   json=body) as response:
            return response.status, response.headers, await response.read()


async def status_of(proxy):
    code, _, body = await fetch(proxy.url, "/v1/status", headers={"x-api-key": API_KEY})
    assert code == 200, body
    return json.loads(body)


# The minute ring ##########################################################


def test_the_ring_counts_each_minute_and_forgets_after_an_hour():
    ring = kiro2api.MinuteRing()
    start = 600_000.0  # a minute boundary
    ring.count_request("/v1/messages", 200, start + 1)
    ring.count_request("/v1/messages", 200, start + 59)
    ring.count_request("/v1/messages", 529, start + 61)
    ring.count_request("/health", 200, start + 62)
    ring.observe_first_byte(0.2, start + 61)
    ring.observe_first_byte(0.4, start + 62)
    now = start + 90
    assert ring.totals(now) == {("/v1/messages", 200): 2, ("/v1/messages", 529): 1,
                                ("/health", 200): 1}
    series = ring.series(now, leave_out=frozenset({"/health"}))
    assert len(series) == 60
    assert series[-2:] == [{"requests": 2, "errors": 0, "first_byte_ms": None},
                           {"requests": 1, "errors": 1, "first_byte_ms": 300.0}]
    assert all(m == {"requests": 0, "errors": 0, "first_byte_ms": None} for m in series[:-2])
    an_hour_on = start + 60 * 60 + 30  # the first minute's slot is the current one again
    assert ring.totals(an_hour_on) == {("/v1/messages", 529): 1, ("/health", 200): 1}
    ring.count_request("/v1/messages", 200, an_hour_on)
    assert ring.totals(an_hour_on)[("/v1/messages", 200)] == 1
    assert ring.totals(start + 3 * 3600) == {}


# GET / ####################################################################


@pytest.mark.parametrize("accept, html", [
    (BROWSER_ACCEPT, True),
    ("text/html", True),
    ("*/*", False),
    ("", False),
    ("application/json", False),
    ("application/json, text/html;q=0.5", False),
    ("text/html;q=0.9, application/json", False),
    ("text/html, application/json", False),  # a tie: the API's answer
    ("text/*", False),
    ("text/html;q=0", False),
    ("TEXT/HTML;Q=0.5, */*;q=0.1", True),
    ("text/html;q=oops", False),
])
def test_html_only_for_clients_that_ask_for_it_first(accept, html):
    assert kiro2api.prefers_html(accept) is html


async def test_a_browser_gets_the_page_and_probes_the_json(proxy):
    code, headers, page = await fetch(proxy.url, "/", headers={"Accept": BROWSER_ACCEPT})
    assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Vary"] == "Accept" and headers["Cache-Control"] == "no-store"
    text = page.decode()
    assert text.startswith("<!doctype html>") and 'data-open="false"' in text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")  # no asset
    assert "src=" not in text and "<link rel=\"stylesheet\"" not in text
    for secret in (API_KEY, helpers.INITIAL_TOKENS["accessToken"],
                   helpers.INITIAL_TOKENS["refreshToken"], kiro2api.__version__):
        assert secret not in text  # not even the version before the key is given
    for method, accept in (("HEAD", BROWSER_ACCEPT), ("GET", "*/*"), ("GET", None)):
        code, headers, body = await fetch(proxy.url, "/", method=method,
                                          headers={"Accept": accept} if accept else {})
        assert code == 200 and headers["Content-Type"].startswith("application/json")
    code, headers, _ = await fetch(proxy.url, "/api/hello", headers={"Accept": "text/html"})
    assert headers["Content-Type"].startswith("application/json")


async def test_the_page_runs_only_its_own_inline_style_and_script(proxy):
    _, headers, page = await fetch(proxy.url, "/", headers={"Accept": "text/html"})
    policy = dict(part.strip().split(" ", 1) for part in
                  headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    text = page.decode()
    for tag, directive in (("style", "style-src"), ("script", "script-src")):
        (inline,) = re.findall(f"<{tag}>(.*?)</{tag}>", text, re.S)
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert policy[directive] == f"'sha256-{digest}'"


async def test_with_no_auth_the_page_asks_for_no_key(aiohttp_server, proxy_config):
    config = dataclasses.replace(proxy_config, api_key=None, no_auth=True)
    server = await aiohttp_server(kiro2api.make_app(config))
    url = str(server.make_url("")).rstrip("/")
    _, _, page = await fetch(url, "/", headers={"Accept": "text/html"})
    assert 'data-open="true"' in page.decode()
    code, _, _ = await fetch(url, "/v1/status")
    assert code == 200


# GET /v1/status ###########################################################


async def test_status_needs_the_client_key(proxy):
    code, _, body = await fetch(proxy.url, "/v1/status")
    assert code == 401 and b"API key" in body
    code, _, _ = await fetch(proxy.url, "/v1/status", headers={"x-api-key": "wrong"})
    assert code == 401


async def test_status_counts_what_metrics_counts(proxy):
    code, _, _ = await fetch(proxy.url, "/v1/messages", method="POST", body=BODY,
                             headers={"x-api-key": API_KEY})
    assert code == 200
    await fetch(proxy.url, "/health")
    status = await status_of(proxy)
    assert status["version"] == kiro2api.__version__ and status["uptime_seconds"] >= 0
    assert status["streams_open"] == 0 and status["credits_spent"] == 0.01
    hour = status["last_hour"]
    assert (hour["requests"], hour["errors"]) == (1, 0)  # /health is left out of these
    assert hour["minutes"][-1]["requests"] == 1 and len(hour["minutes"]) == 60
    assert hour["minutes"][-1]["first_byte_ms"] >= 0
    assert {(r["route"], r["status"]): r["count"] for r in hour["by_route"]} == {
        ("/v1/messages", 200): 1, ("/health", 200): 1}
    _, _, metrics = await fetch(proxy.url, "/metrics", headers={"x-api-key": API_KEY})
    text = metrics.decode()
    assert 'kiro2api_requests_total{route="/v1/messages",status="200"} 1' in text
    assert re.search(r'kiro2api_credits_total\{account="[^"]+"\} 0\.01\n', text)
    assert "kiro2api_upstream_first_byte_seconds_count 1\n" in text
    (account,) = status["accounts"]
    assert account["name"] == str(proxy.config.token_files[0])
    assert (account["kind"], account["state"], account["credits_spent"]) == ("social", "ok", 0.01)
    assert account["expires_at"].endswith("Z") and account["seconds_left"] > 3000
    assert account["usage"]["plan"] == "KIRO PRO"
    assert account["usage"]["credits"]["percent"] == 12.1
    assert account["usage"]["reset_at"] == "2027-01-01T00:00:00.000Z"
    text = str(status)
    for secret in (API_KEY, helpers.INITIAL_TOKENS["accessToken"],
                   helpers.INITIAL_TOKENS["refreshToken"]):
        assert secret not in text


async def test_status_does_not_wait_long_for_slow_usage_limits(proxy, monkeypatch):
    monkeypatch.setattr(kiro2api, "STATUS_USAGE_WAIT_SECONDS", 0.05)
    proxy.fake.usage_reply = Status(200, fakes.USAGE_LIMITS, delay=0.5)
    first = await status_of(proxy)
    assert first["accounts"][0]["usage"]["credits"] is None  # still being read
    await asyncio.sleep(0.6)
    later = await status_of(proxy)
    assert later["accounts"][0]["usage"]["credits"]["used"] == 120.5
    reads = [c for c in proxy.fake.calls("/management/")
             if c.headers["x-amz-target"].endswith("GetUsageLimits")]
    assert len(reads) == 1


@pytest.mark.parametrize("health, usage, shown", [
    ({"state": "ok", "cooldown_seconds": 0}, {"exhausted": None}, "ok"),
    ({"state": "ok", "cooldown_seconds": 42}, {"exhausted": False}, "cooling down"),
    ({"state": "ok", "cooldown_seconds": 0}, {"exhausted": True}, "credits exhausted"),
    ({"state": "exhausted", "cooldown_seconds": 900}, {"exhausted": None}, "credits exhausted"),
    ({"state": "suspended", "cooldown_seconds": 900}, {"exhausted": False}, "suspended"),
    ({"state": "error", "cooldown_seconds": 0}, {"exhausted": None}, "error"),
])
def test_the_state_the_page_shows(health, usage, shown):
    assert kiro2api.shown_state(health, usage) == shown


async def test_a_suspended_account_shows_what_kiro_said(
        aiohttp_server, fake_upstream, proxy_config, tmp_path):
    path = tmp_path / "s" / "token.json"
    path.parent.mkdir()
    helpers.write_token(path, mode=0o600)
    fake_upstream.suspended.add(helpers.SOCIAL_ACCESS)
    config = dataclasses.replace(
        proxy_config, token_files=(path, *proxy_config.token_files),
        upstream=(f"{fake_upstream.url}/runtime#runtime", f"{fake_upstream.url}/q"))
    server = await aiohttp_server(kiro2api.make_app(config))
    url = str(server.make_url("")).rstrip("/")
    code, _, _ = await fetch(url, "/v1/messages", method="POST", body=BODY,
                             headers={"x-api-key": API_KEY})
    assert code == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/v1/status", headers={"x-api-key": API_KEY}) as r:
            suspended, other = (await r.json())["accounts"]
    assert suspended["state"] == "suspended" and "temporarily is suspended" in suspended["error"]
    assert other["state"] == "ok" and other["host"] and other["shape"]
