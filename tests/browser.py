"""A real headless browser for the tests: Debian's ``chromium``, driven through its
DevTools protocol (JSON over a websocket, aiohttp's client) with no driver package.

- ``Chromium`` is one browser process on a DevTools port it chose itself
  (``--remote-debugging-port=0``; the port is in ``DevToolsActivePort`` in its
  profile directory), stopped by its PID. ``ChromiumUnavailable`` says why one
  could not start.
- ``Page`` is one tab of it (its own sessionStorage): ``call`` sends a DevTools
  command, ``evaluate`` runs JavaScript, ``until`` waits for an expression to
  come true; ``errors`` are what the page logged as errors (console, uncaught
  exceptions, failed loads) and ``responses`` what it received, bodies included.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
START_SECONDS = 15.0  # a cold start on a slow CI machine takes a few
CALL_SECONDS = 10.0


class ChromiumUnavailable(Exception):
    """No browser to run: not installed, or it exits at start (the reason is the message)."""


def find_chromium() -> str | None:
    return next((path for name in NAMES if (path := shutil.which(name))), None)


class Chromium:
    """One headless browser process, its profile in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> Chromium:
        binary = find_chromium()
        if binary is None:
            raise ChromiumUnavailable(f"no browser on PATH (tried {', '.join(NAMES)}); "
                                      f"apt-get install chromium (.ci/run does)")
        log = self.workdir / "chromium.log"
        profile = self.workdir / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as output:
            # --no-sandbox: tests run as root in containers, where Chromium's sandbox
            # cannot start; the browser visits only the test's own server.
            self.process = subprocess.Popen(
                [binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                 "--disable-extensions", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--mute-audio",
                 "--remote-debugging-port=0", "--remote-allow-origins=*",
                 f"--user-data-dir={profile}", "--window-size=1000,1300", "about:blank"],
                stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                said = log.read_text(errors="replace").strip().splitlines()
                raise ChromiumUnavailable(
                    f"{binary} exited at start with status {self.process.returncode}: "
                    f"{said[-1] if said else 'no output'}")
            if active.exists() and (lines := active.read_text().split()):
                self.port = int(lines[0])
                return self
            time.sleep(0.05)
        self.stop()
        raise ChromiumUnavailable(f"{binary} did not open its DevTools port within "
                                  f"{START_SECONDS:g} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Page:
    """One tab: DevTools commands, and the events the tab sent (kept in ``events``)."""

    def __init__(self, session: aiohttp.ClientSession, chromium: Chromium, target: str,
                 socket: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.chromium = chromium
        self.target = target
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, chromium: Chromium) -> Page:
        """A new tab on about:blank, with its console, log and network reported."""
        async with session.put(f"{chromium.url}/json/new?about:blank") as response:
            target = await response.json()
        socket = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = cls(session, chromium, target["id"], socket)
        for domain in ("Page", "Runtime", "Log", "Network"):
            await page.call(f"{domain}.enable")
        return page

    async def _read(self) -> None:
        async for message in self.socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            waiting = self._waiting.pop(data.get("id"), None)
            if waiting is not None:
                if not waiting.done():
                    waiting.set_result(data)
            elif "method" in data:
                self.events.append(data)
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_exception(ConnectionError("the browser closed the tab"))

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        answer = self._waiting[number] = asyncio.get_running_loop().create_future()
        await self.socket.send_json({"id": number, "method": method, "params": params})
        data = await asyncio.wait_for(answer, CALL_SECONDS)
        if "error" in data:
            raise AssertionError(f"{method}: {data['error']}")
        return data["result"]

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if a promise)."""
        result = await self.call("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 8.0) -> Any:
        """Wait until ``expression`` is truthy in the page; its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not (value := await self.evaluate(expression)):
            if asyncio.get_running_loop().time() > deadline:
                text = await self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"{expression} did not come true; the page says:\n{text}")
            await asyncio.sleep(0.05)
        return value

    async def go(self, url: str) -> None:
        """Load ``url`` and wait for the document to finish loading."""
        await self.call("Page.navigate", url=url)
        await self.until(f"location.href === {json.dumps(url)} && "
                         f"document.readyState === 'complete'")

    async def type(self, text: str) -> None:
        """Type ``text`` into the element that has the focus, as a keyboard would."""
        await self.call("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def errors(self) -> list[str]:
        """Everything the page reported as an error: console.error calls, exceptions
        nothing caught, and the log's errors (a failed load, a blocked script)."""
        found = []
        for event in self.events:
            method, params = event["method"], event["params"]
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details["text"])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description")))
                                      for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"{entry['text']} ({entry.get('url', '')})")
        return found

    def requested(self) -> list[str]:
        """The URLs the page asked for, in order."""
        return [e["params"]["request"]["url"] for e in self.events
                if e["method"] == "Network.requestWillBeSent"]

    async def responses(self) -> list[tuple[str, dict[str, str], str]]:
        """Every response the page received in full: URL, headers and body."""
        heads = {e["params"]["requestId"]: e["params"]["response"] for e in self.events
                 if e["method"] == "Network.responseReceived"}
        finished = [e["params"]["requestId"] for e in self.events
                    if e["method"] == "Network.loadingFinished"]
        found = []
        for request_id in finished:
            if request_id not in heads:
                continue
            body = await self.call("Network.getResponseBody", requestId=request_id)
            text = base64.b64decode(body["body"]).decode("utf-8", "replace") \
                if body["base64Encoded"] else body["body"]
            found.append((heads[request_id]["url"], heads[request_id]["headers"], text))
        return found

    async def close(self) -> None:
        await self.socket.close()
        self._reader.cancel()
        async with self.session.get(f"{self.chromium.url}/json/close/{self.target}") as r:
            await r.read()
