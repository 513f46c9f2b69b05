"""The status page in a real headless browser (tests/browser.py): Chromium loads
``GET /`` from a running two-account server, is given the key as a person would
type it, and shows what ``GET /v1/status`` says, updating itself without a reload.

The tests skip only when no Chromium can run here, and say why; CI installs it.
"""

from __future__ import annotations

import dataclasses

import aiohttp
import pytest

import fakes
import helpers
import kiro2api
from browser import Chromium, ChromiumUnavailable, Page
from fakes import Status
from helpers import API_KEY

pytestmark = pytest.mark.slow  # a browser process

SECOND_ACCESS = "aoa-second-account-access"
SECOND_REFRESH = "aor-second-account-refresh"
# Every secret the server holds: none may reach the page.
SECRETS = (API_KEY, helpers.INITIAL_TOKENS["accessToken"], helpers.INITIAL_TOKENS["refreshToken"],
           SECOND_ACCESS, SECOND_REFRESH)
NEAR_LIMIT = {**fakes.USAGE_LIMITS, "subscriptionInfo": {"subscriptionTitle": "KIRO FREE"},
              "usageBreakdownList": [{"resourceType": "CREDIT", "currentUsageWithPrecision": 46.5,
                                      "usageLimitWithPrecision": 50}]}
BODY = {"model": "claude-sonnet-4-5", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    try:
        browser = Chromium(tmp_path_factory.mktemp("chromium")).start()
    except ChromiumUnavailable as exc:
        pytest.skip(f"Chromium cannot run here: {exc}")
    yield browser
    browser.stop()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def page(session, chromium):
    tab = await Page.open(session, chromium)
    yield tab
    await tab.close()


@pytest.fixture
def two_accounts(fake_upstream, proxy_config, tmp_path):
    """The proxy fixtures' account and a second one, on KIRO FREE near its limit."""
    (tmp_path / "second").mkdir()
    second = helpers.write_token_file(tmp_path / "second" / "token.json",
                                      accessToken=SECOND_ACCESS, refreshToken=SECOND_REFRESH)
    fake_upstream.usage_replies[SECOND_ACCESS] = Status(200, NEAR_LIMIT)
    return dataclasses.replace(proxy_config, token_files=(*proxy_config.token_files, second))


async def serve(aiohttp_server, config):
    server = await aiohttp_server(kiro2api.make_app(config))
    return str(server.make_url("")).rstrip("/")


async def unlock(page, key):
    await page.evaluate("document.getElementById('key').focus()")
    await page.type(key)
    await page.evaluate("document.querySelector('#unlock button').click()")


async def ask(session, url):
    async with session.post(url + "/v1/messages", json=BODY,
                            headers={"x-api-key": API_KEY}) as response:
        assert response.status == 200, await response.text()


ACCOUNT_TEXTS = "[...document.querySelectorAll('.account')].map(a => a.innerText)"


async def test_the_page_shows_each_account_and_updates_without_a_reload(
        aiohttp_server, fake_upstream, two_accounts, page, session, tmp_path):
    url = await serve(aiohttp_server, two_accounts)
    await page.go(url + "/")
    assert await page.until("!document.getElementById('locked').hidden")
    await unlock(page, API_KEY)
    first, second = await page.until(
        f"document.querySelectorAll('.account').length === 2 && {ACCOUNT_TEXTS}")
    assert first.startswith(f"{two_accounts.token_files[0]} social ok\n")
    assert "KIRO PRO" in first and "120.5 of 1000 used (12.1 %)" in first
    assert "resets\n2027-01-01 00:00 UTC (in " in first
    assert str(two_accounts.token_files[1]) in second and "KIRO FREE" in second
    assert "46.5 of 50 used (93 %)" in second
    widths = await page.evaluate(
        "[...document.querySelectorAll('.fill')].map(f => [f.style.width, f.className])")
    assert widths == [["12.1%", "fill"], ["93%", "fill near"]]
    assert await page.evaluate("document.getElementById('version').textContent") == (
        f"version {kiro2api.__version__}")
    assert await page.evaluate("document.getElementById('requests').textContent") == "0"

    await page.evaluate("window.sameDocument = true")
    await ask(session, url)
    await page.until("document.getElementById('requests').textContent === '1'")
    assert await page.evaluate("window.sameDocument") is True  # updated, not reloaded
    routes = await page.evaluate("document.getElementById('routes').innerText")
    assert "/v1/messages\t200\t1" in routes
    assert await page.evaluate("document.getElementById('credits').textContent") == "0.01"
    assert await page.evaluate("document.querySelectorAll('#chart rect.requests').length") == 1
    assert await page.evaluate("document.querySelectorAll('#chart polyline').length") == 1
    assert page.requested().count(url + "/") == 1

    shot = await page.screenshot(tmp_path / "status-page.png")
    assert shot.stat().st_size > 10_000
    assert page.errors() == []
    dom = await page.evaluate("document.documentElement.outerHTML")
    stored = await page.evaluate("JSON.stringify({...localStorage})")
    assert stored == "{}"
    for secret in SECRETS:
        assert secret not in dom
    for where, headers, body in await page.responses():
        for secret in SECRETS:
            assert secret not in body and secret not in str(headers), where
    assert {where.removeprefix(url) for where, _, _ in await page.responses()} == {
        "/", "/v1/status"}


async def test_without_the_key_the_page_shows_nothing_but_locked(
        aiohttp_server, two_accounts, page):
    url = await serve(aiohttp_server, two_accounts)
    await page.go(url + "/")
    await page.until("!document.getElementById('locked').hidden")
    text = await page.evaluate("document.body.innerText")
    assert text.splitlines()[0] == "locked"
    assert kiro2api.__version__ not in text and "token.json" not in text
    assert await page.evaluate("document.getElementById('status').hidden") is True
    assert await page.evaluate("document.querySelectorAll('.account').length") == 0
    assert page.requested() == [url + "/"]  # no key, so nothing asked for
    assert page.errors() == []

    await unlock(page, "not-the-key")
    await page.until("!document.getElementById('refused').hidden")
    assert await page.evaluate("document.getElementById('status').hidden") is True
    assert await page.evaluate("sessionStorage.length") == 0  # a refused key is not kept


async def test_with_no_client_key_the_kiro_access_token_unlocks_it(
        aiohttp_server, two_accounts, page):
    config = dataclasses.replace(two_accounts, api_key=None)
    url = await serve(aiohttp_server, config)
    await page.go(url + "/")
    await page.until("!document.getElementById('locked').hidden")
    await unlock(page, SECOND_ACCESS)
    await page.until("document.querySelectorAll('.account').length === 2")
    assert page.errors() == []
    dom = await page.evaluate("document.documentElement.outerHTML")
    for secret in SECRETS:
        assert secret not in dom
    # Kept for this tab only, and gone once locked again.
    assert await page.evaluate("sessionStorage.getItem('kiro2api-key')") == SECOND_ACCESS
    await page.evaluate("document.getElementById('lock').click()")
    await page.until("!document.getElementById('locked').hidden")
    assert await page.evaluate("sessionStorage.length") == 0


async def test_the_page_fits_a_phone(aiohttp_server, two_accounts, page, tmp_path):
    await page.call("Emulation.setDeviceMetricsOverride", width=390, height=844,
                    deviceScaleFactor=2, mobile=True)
    url = await serve(aiohttp_server, two_accounts)
    await page.go(url + "/")
    await page.until("!document.getElementById('locked').hidden")
    await unlock(page, API_KEY)
    await page.until("document.querySelectorAll('.account').length === 2")
    assert await page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    await page.screenshot(tmp_path / "status-page-phone.png")
    assert page.errors() == []
