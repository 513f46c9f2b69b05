"""Request ids, the one log line per request, log formats and times, and /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pytest

import fakes
import kiro2api
from fakes import Status, Stream
from helpers import API_KEY, child_env, free_port, start_server_process, write_token_file

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 10,
        "messages": [{"role": "user", "content": "Hi"}]}


async def post(proxy, path, body):
    return await post_to(proxy.url, path, body)


async def post_to(url, path, body):
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, json=body,
                                headers={"x-api-key": API_KEY}) as response:
            return response.status, response.headers, await response.read()


async def test_every_response_carries_a_request_id_that_the_log_line_names(proxy, caplog):
    caplog.set_level(logging.INFO, logger="kiro2api")
    status, headers, _ = await post(proxy, "/v1/messages", {**BODY, "stream": True})
    assert status == 200
    request_id = headers["request-id"]
    assert request_id.startswith("req_")
    _, other, _ = await post(proxy, "/v1/messages", {"model": 1})
    assert other["request-id"] != request_id
    (line,) = [r for r in caplog.records if request_id in r.getMessage()]
    fields = line.fields
    assert fields["route"] == "/v1/messages" and fields["status"] == 200
    assert fields["model"] == "claude-sonnet-4-5"
    assert fields["bytes_out"] > 0 and fields["upstream_first_byte_ms"] >= 0
    assert fields["retries"] == 0 and fields["account"] == "kiro-auth-token.json"


@pytest.mark.parametrize("method, path, route", [
    ("GET", "/v1/messages", "/v1/messages"),
    ("PUT", "/v1/chat/completions", "/v1/chat/completions"),
    ("POST", "/v1/models/claude-sonnet-4-5", "/v1/models/{model_id}"),
    ("GET", "/v1/nothing-here", "other"),
])
async def test_a_wrong_method_is_logged_and_counted_under_its_route(proxy, caplog, method, path,
                                                                     route):
    caplog.set_level(logging.INFO, logger="kiro2api")
    async with aiohttp.ClientSession(headers={"x-api-key": API_KEY}) as session:
        async with session.request(method, proxy.url + path) as response:
            assert response.status == (404 if route == "other" else 405)
            fields = request_line(caplog, response.headers["request-id"])
        async with session.get(proxy.url + "/metrics") as response:
            samples = parse_metrics(await response.text())
    assert fields["route"] == route
    status = fields["status"]
    assert samples[("kiro2api_requests_total", f'route="{route}",status="{status}"')] == 1


@pytest.mark.parametrize("path, body, status, model", [
    ("/v1/messages", {**BODY, "messages": []}, 400, "claude-sonnet-4-5"),
    ("/v1/chat/completions", {"model": "gpt-ish", "messages": "not a list"}, 400, "gpt-ish"),
    ("/v1/messages/count_tokens", BODY, 200, "claude-sonnet-4-5"),
    ("/v1/messages", {**BODY, "model": "m" * 5000}, 200, "m" * 100 + "..."),
    ("/v1/messages", {"model": 1}, 400, "-"),
])
async def test_the_log_line_names_the_model_the_body_asked_for(proxy, caplog, path, body, status,
                                                              model):
    caplog.set_level(logging.INFO, logger="kiro2api")
    answered, headers, _ = await post(proxy, path, body)
    assert answered == status
    fields = request_line(caplog, headers["request-id"])
    assert (fields["status"], fields["model"]) == (status, model)


async def test_what_the_client_sent_cannot_forge_a_log_line(proxy, caplog):
    caplog.set_level(logging.INFO, logger="kiro2api")
    async with aiohttp.ClientSession(headers={"x-api-key": API_KEY}) as session:
        async with session.get(proxy.url + "/v1/x%0AINFO%20kiro2api:%20forged") as response:
            assert response.status == 404
            not_found = response.headers["request-id"]
    _, headers, _ = await post(proxy, "/v1/messages", {**BODY, "model": "a\rb\u2028c"})
    lines = {r.fields["request_id"]: r.getMessage() for r in caplog.records
             if "request_id" in getattr(r, "fields", {})}
    assert lines[not_found].endswith(" (no route /v1/x\\nINFO kiro2api: forged)")
    assert " model=a\\rb\\u2028c " in lines[headers["request-id"]]
    assert not [line for line in lines.values() if set(line) & {"\n", "\r", "\u2028"}]
    # The fields keep the text as it was: JSON escapes it.
    assert request_line(caplog, not_found)["failure"] == "no route /v1/x\nINFO kiro2api: forged"


# 2026-04-06T19:29:16.250Z: a quarter second, exact in binary.
MOMENT = datetime(2026, 4, 6, 19, 29, 16, 250000, tzinfo=timezone.utc).timestamp()


def log_record(message="hello"):
    record = logging.LogRecord("kiro2api", logging.INFO, __file__, 1, "%s", (message,), None)
    record.created = MOMENT
    return record


def test_json_log_format_is_one_object_per_line_with_the_time():
    record = log_record()
    record.fields = {"request_id": "req_1", "status": 200}
    line = kiro2api.JsonFormatter().format(record)
    assert json.loads(line) == {"time": "2026-04-06T19:29:16.250Z", "level": "INFO",
                                "logger": "kiro2api", "message": "hello",
                                "request_id": "req_1", "status": 200}


def test_text_log_lines_start_with_the_time_unless_journald_stamps_them():
    assert kiro2api.TextFormatter().format(log_record()) == \
        "2026-04-06T19:29:16.250Z INFO kiro2api: hello"
    assert kiro2api.TextFormatter(timestamps=False).format(log_record()) == \
        "INFO kiro2api: hello"


def test_journald_is_recognised_by_the_stream_journal_stream_names(monkeypatch, tmp_path):
    with open(tmp_path / "stderr", "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        found = os.fstat(stderr.fileno())
        assert kiro2api.stderr_is_journal(f"{found.st_dev}:{found.st_ino}")
        # Inherited by a process whose stderr goes elsewhere; unset; not systemd's.
        for other in (f"{found.st_dev}:{found.st_ino + 1}", None, "", "8:x", "garbage"):
            assert not kiro2api.stderr_is_journal(other)


@pytest.mark.parametrize("journald", [False, True], ids=["terminal", "journald"])
@pytest.mark.slow  # a server process
async def test_the_server_stamps_its_text_lines_unless_stderr_is_the_journal(
        tmp_path, journald):
    port = free_port()
    token_file = write_token_file(tmp_path / "token.json")
    command = [sys.executable, str(Path(kiro2api.__file__)), "server", "--port", str(port),
               "--api-key", API_KEY, "--token-file", str(token_file)]
    log = tmp_path / "stderr"
    env = child_env()
    with open(log, "wb") as stderr:
        if journald:  # as systemd sets it when the unit's stderr is the journal
            found = os.fstat(stderr.fileno())
            env["JOURNAL_STREAM"] = f"{found.st_dev}:{found.st_ino}"
        process = await start_server_process(command, port, env=env, stdout=None,
                                             stderr=stderr)
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 10) == 0
    (line,) = [line for line in log.read_text().splitlines() if "listening on" in line]
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO kiro2api: ")
    if journald:
        assert line.startswith("INFO kiro2api: kiro2api "), line
    else:
        assert stamp.match(line), line


def parse_metrics(text):
    """Prometheus text -> {(name, labels): value}, checking every line's shape."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert line.split()[1] in ("HELP", "TYPE"), line
            continue
        name_labels, value = line.rsplit(" ", 1)
        name, _, labels = name_labels.partition("{")
        samples[(name, labels.rstrip("}"))] = float(value)
    return samples


async def test_metrics_count_requests_retries_and_accounts(aiohttp_server, fake_upstream,
                                                           proxy_config):
    import dataclasses

    app = kiro2api.make_app(dataclasses.replace(proxy_config, retries=2))
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    fake_upstream.script.extend([Status(503, "busy", {"Retry-After": "0"}),
                                 Stream(fakes.text("ok") + fakes.tail())])
    async with aiohttp.ClientSession(headers={"x-api-key": API_KEY}) as session:
        async with session.post(url + "/v1/messages", json=BODY) as response:
            assert response.status == 200
        async with session.post(url + "/v1/messages", json={"model": 1}) as response:
            assert response.status == 400
        async with session.get(url + "/metrics") as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            samples = parse_metrics(await response.text())
    assert samples[("kiro2api_requests_total", 'route="/v1/messages",status="200"')] == 1
    assert samples[("kiro2api_requests_total", 'route="/v1/messages",status="400"')] == 1
    assert samples[("kiro2api_upstream_retries_total", "")] == 1
    assert samples[("kiro2api_streams_open", "")] == 0
    assert samples[("kiro2api_upstream_first_byte_seconds_count", "")] == 2
    account = f'account="{proxy_config.token_files[0]}"'
    assert samples[("kiro2api_account_up", account)] == 1
    assert samples[("kiro2api_token_refreshes_total", account)] == 0
    assert 3000 < samples[("kiro2api_account_token_seconds_left", account)] <= 3600


def request_line(caplog, request_id):
    (line,) = [r for r in caplog.records if getattr(r, "fields", {}).get("request_id")
               == request_id]
    return line.fields


async def test_bytes_out_is_the_body_the_client_received(proxy, caplog):
    caplog.set_level(logging.INFO, logger="kiro2api")
    # Over 64 KiB streamed: past aiohttp's drain limit, where its own count restarts.
    proxy.fake.script.append(Stream(fakes.text(*["x" * 1000] * 100) + fakes.tail()))
    status, headers, streamed = await post(proxy, "/v1/messages", {**BODY, "stream": True})
    assert status == 200 and len(streamed) > 65536
    assert request_line(caplog, headers["request-id"])["bytes_out"] == len(streamed)
    status, headers, whole = await post(proxy, "/v1/chat/completions", BODY)
    assert status == 200
    assert request_line(caplog, headers["request-id"])["bytes_out"] == len(whole)
    status, headers, refused = await post(proxy, "/v1/messages", {"model": 1})
    assert status == 400
    assert request_line(caplog, headers["request-id"])["bytes_out"] == len(refused)


async def scrape(url):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session, \
            session.get(url + "/metrics") as response:
        assert response.status == 200
        return parse_metrics(await response.text())


@pytest.mark.slow  # over a second
async def test_metrics_show_open_streams_and_time_histograms(proxy):
    proxy.fake.script.append(Stream(fakes.text("a", "b", "c") + fakes.tail(), split=(60,),
                                    delay=0.3))
    async with aiohttp.ClientSession(headers={"x-api-key": API_KEY}) as session, \
            session.post(proxy.url + "/v1/messages", json={**BODY, "stream": True}) as response:
        await response.content.readany()  # the stream has started ...
        during = await scrape(proxy.url)  # ... and is still open
        await response.read()
    after = await scrape(proxy.url)
    assert during[("kiro2api_streams_open", "")] == 1
    assert after[("kiro2api_streams_open", "")] == 0
    duration = "kiro2api_request_duration_seconds"
    messages, scrapes = 'route="/v1/messages"', 'route="/metrics"'
    for name, labels in (("kiro2api_upstream_first_byte_seconds", ""), (duration, messages),
                         (duration, scrapes)):
        prefix = labels + "," if labels else ""
        buckets = sorted((float(bucket.removeprefix(prefix).split('"')[1]), value)
                         for (n, bucket), value in after.items()
                         if n == name + "_bucket" and bucket.startswith(prefix))
        assert buckets[-1][0] == float("inf")
        counts = [value for _, value in buckets]
        assert counts == sorted(counts)  # cumulative
        assert after[(name + "_count", labels)] == counts[-1]
    # The stream took over 0.6 s; its upstream answered at once.
    assert after[("kiro2api_upstream_first_byte_seconds_bucket", 'le="0.5"')] == 1
    assert after[(duration + "_count", messages)] == 1
    assert after[(duration + "_sum", messages)] >= 0.6
    assert after[(duration + "_bucket", messages + ',le="0.5"')] == 0
    assert after[(duration + "_count", scrapes)] == 1  # the scrape during the stream


async def test_metrics_count_refreshes_and_token_failures(aiohttp_server, fake_upstream,
                                                          proxy_config):
    from helpers import write_token_file

    token_file = proxy_config.token_files[0]
    write_token_file(token_file, expiresAt="2020-01-01T00:00:00.000Z")
    server = await aiohttp_server(kiro2api.make_app(proxy_config))
    url = str(server.make_url("")).rstrip("/")
    account = f'account="{token_file}"'
    status, _, _ = await post_to(url, "/v1/messages", BODY)
    assert status == 200
    samples = await scrape(url)
    assert samples[("kiro2api_token_refreshes_total", account)] == 1
    assert samples[("kiro2api_token_failures_total", account)] == 0
    # Kiro rejects the new token, and the auth service the refresh that follows.
    fake_upstream.script.append(Status(401, {"message": "The bearer token is invalid"}))
    fake_upstream.auth_script.append(Status(400, {"error": "invalid_grant"}))
    status, _, _ = await post_to(url, "/v1/messages", BODY)
    assert status == 401
    samples = await scrape(url)
    assert samples[("kiro2api_token_failures_total", account)] == 1
    assert samples[("kiro2api_account_up", account)] == 0


async def test_credits_kiro_billed_are_logged_and_counted_per_account(proxy, caplog):
    caplog.set_level(logging.INFO, logger="kiro2api")
    metering = fakes.event("meteringEvent", {"unit": "credit", "unitPlural": "credits",
                                             "usage": 0.0125})
    for path, body in (("/v1/messages", {**BODY, "stream": True}),
                       ("/v1/chat/completions", BODY),
                       ("/v1/responses", {"model": "claude-sonnet-4-5", "input": "Hi",
                                          "stream": True})):
        # Two metering events: the last one is what the answer cost.
        proxy.fake.script.append(Stream(fakes.text("Hi") + fakes.tail() + [metering]))
        status, headers, _ = await post(proxy, path, body)
        assert status == 200
        assert request_line(caplog, headers["request-id"])["credits"] == 0.0125
    proxy.fake.script.append(Stream(fakes.text("Hi")))  # Kiro said nothing of credits
    status, headers, _ = await post(proxy, "/v1/messages", BODY)
    assert request_line(caplog, headers["request-id"])["credits"] is None
    async with aiohttp.ClientSession(headers={"x-api-key": API_KEY}) as session:
        async with session.get(proxy.url + "/metrics") as response:
            samples = parse_metrics(await response.text())
        async with session.get(proxy.url + "/health") as response:
            health = await response.json()
    (credits,) = [v for (name, _), v in samples.items() if name == "kiro2api_credits_total"]
    assert credits == pytest.approx(0.0375)
    assert health["accounts"][0]["credits"] == pytest.approx(0.0375)


async def test_the_log_line_says_where_the_token_figures_came_from(proxy, caplog):
    caplog.set_level(logging.INFO, logger="kiro2api")
    reported = fakes.event("metadataEvent", {"tokenUsage": {
        "uncachedInputTokens": 10, "outputTokens": 2, "totalTokens": 12}})
    for frames, source in ((fakes.text("Hi") + [reported], "kiro"),
                           (fakes.text("Hi") + fakes.tail(), "context"),
                           (fakes.text("Hi"), "estimate")):
        proxy.fake.script.append(Stream(frames))
        status, headers, _ = await post(proxy, "/v1/messages", BODY)
        assert status == 200
        assert request_line(caplog, headers["request-id"])["usage"] == source
