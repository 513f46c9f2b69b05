"""SIGTERM or SIGINT with streams in flight: a real server process in front of the fake upstream."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

import fakes
from fakes import Stream
from helpers import API_KEY, free_port, parse_sse, start_server_process, write_token_file

pytestmark = pytest.mark.slow  # every test here starts a server process

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": True,
        "messages": [{"role": "user", "content": "Hi"}]}


async def start_server(fake, tmp_path, *extra):
    port = free_port()
    token_file = write_token_file(tmp_path / "token.json")
    process = await start_server_process(
        [sys.executable, str(ROOT / "kiro2api.py"), "server", "--port", str(port),
         "--api-key", API_KEY, "--token-file", str(token_file), "--upstream", fake.url,
         "--social-auth-url", fake.url, "--oidc-url", fake.url, *extra], port)
    return process, f"http://127.0.0.1:{port}"


async def read_stream(url):
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/messages", json=BODY,
                                headers={"x-api-key": API_KEY}) as response:
            return (await response.read()).decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_lets_a_short_stream_finish_and_exits_0(fake_upstream, tmp_path, sig):
    process, url = await start_server(fake_upstream, tmp_path, "--shutdown-timeout", "10")
    fake_upstream.script.append(Stream(fakes.text("a", "b", "c") + fakes.tail(), split=(60,),
                                       delay=0.2))
    reader = asyncio.create_task(read_stream(url))
    await fake_upstream.wait_for("/generateAssistantResponse")  # the stream is under way
    process.send_signal(sig)
    body = await asyncio.wait_for(reader, 10)
    assert body.endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_sigterm_ends_a_long_stream_with_an_error_event(fake_upstream, tmp_path):
    process, url = await start_server(fake_upstream, tmp_path, "--shutdown-timeout", "0.5")
    fake_upstream.script.append(Stream(fakes.text(*"abcdefghij") + fakes.tail(), split=(60,),
                                       delay=0.5))
    reader = asyncio.create_task(read_stream(url))
    await fake_upstream.wait_for("/generateAssistantResponse")
    process.send_signal(signal.SIGTERM)
    body = await asyncio.wait_for(reader, 10)
    assert "message_stop" not in body
    name, last = parse_sse(body)[-1]
    assert name == "error" and "shutting down" in last["error"]["message"]
    assert await asyncio.wait_for(process.wait(), 10) == 0
    async with aiohttp.ClientSession() as session:  # no longer listening
        try:
            async with session.get(url + "/health"):
                raise AssertionError("the server still answers after SIGTERM")
        except aiohttp.ClientConnectionError:
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_an_idle_server_says_it_stops(fake_upstream, tmp_path, sig):
    process, url = await start_server(fake_upstream, tmp_path)
    process.send_signal(sig)
    output = (await asyncio.wait_for(process.stdout.read(), 10)).decode()
    assert await asyncio.wait_for(process.wait(), 10) == 0, output
    lines = output.splitlines()
    assert any("shutting down: no streams open" in line for line in lines), output
    assert lines[-1].endswith("kiro2api stopped"), output


# Starting up ##############################################################


def server_command(tmp_path, port):
    token_file = write_token_file(tmp_path / "token.json")
    return [sys.executable, str(ROOT / "kiro2api.py"), "server", "--port", str(port),
            "--api-key", API_KEY, "--token-file", str(token_file)]


async def test_a_port_in_use_is_one_clear_line_and_exit_1(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            *server_command(tmp_path, port), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1, err
    lines = err.decode().splitlines()
    assert lines[-1].startswith(f"Error: cannot listen on 127.0.0.1:{port}: "), lines
    assert "Traceback" not in err.decode()
    assert not any("listening on" in line for line in lines)  # it never was


async def test_port_0_logs_the_port_the_system_chose(tmp_path):
    process = await asyncio.create_subprocess_exec(
        *server_command(tmp_path, 0), stderr=asyncio.subprocess.PIPE)
    try:
        while b"listening on" not in (line := await asyncio.wait_for(
                process.stderr.readline(), 30)):
            assert line, "the server exited before it listened"
        url = line.decode().split("listening on ")[1].strip()
        port = int(url.rsplit(":", 1)[1])
        assert url == f"http://127.0.0.1:{port}" and port != 0
        async with aiohttp.ClientSession() as session, session.get(url + "/health") as reply:
            assert reply.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
