"""Request ids, the one log line per request, JSON logs, and /metrics."""

from __future__ import annotations

import json
import logging

import aiohttp

import fakes
import kiro2api
from conftest import API_KEY
from fakes import Status, Stream

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 10,
        "messages": [{"role": "user", "content": "Hi"}]}


async def post(proxy, path, body):
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + path, json=body,
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


def test_json_log_format_is_one_object_per_line():
    record = logging.LogRecord("kiro2api", logging.INFO, __file__, 1, "%s", ("hello",), None)
    record.fields = {"request_id": "req_1", "status": 200}
    line = kiro2api.JsonFormatter().format(record)
    assert json.loads(line) == {"level": "INFO", "logger": "kiro2api", "message": "hello",
                                "request_id": "req_1", "status": 200}


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
