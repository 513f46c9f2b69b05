"""See kiro2api work without a Kiro account: ``make demo`` (or ``python tests/demo.py``).

Starts the tests' fake Kiro backend (tests/fakes.py) on 127.0.0.1, runs
``kiro2api.py server`` in front of it with a made-up token file, asks it one
question through the Anthropic SDK and prints the answer as it streams in,
then stops both. Nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAIN = HERE.parent
sys.path[:0] = [str(MAIN), str(HERE)]

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from fakes import FakeUpstream, Stream, tail, text  # noqa: E402
from helpers import write_token  # noqa: E402

API_KEY = "demo"
MODEL = "claude-sonnet-4-6"
QUESTION = "Say hello to a newcomer."
# What the fake Kiro answers, frame by frame, a little slower than a real one.
ANSWER = ("Hello! ", "I am the fake Kiro ", "backend from tests/fakes.py. ", "kiro2api ",
          "turned my AWS event-stream ", "frames into Anthropic ", "server-sent events, ",
          "and the SDK is printing ", "them as they arrive.")
CHUNK_DELAY = 0.15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"kiro2api exited with status {process.returncode}")
            try:
                async with session.get(url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"kiro2api did not answer on {url} within {timeout:g} s")
            await asyncio.sleep(0.1)


async def main() -> None:
    try:
        import anthropic
    except ImportError:
        raise SystemExit("The demo needs the Anthropic SDK: run `make demo`, which installs "
                         "it, or `pip install anthropic`.") from None

    fake = FakeUpstream()
    frames = text(*ANSWER) + tail(percentage=0.002)  # a short prompt: 0.002 % of the context
    # One frame per write, CHUNK_DELAY apart.
    fake.script.append(Stream(frames, delay=CHUNK_DELAY, split=tuple(len(f) for f in frames)))
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake_port = runner.addresses[0][1]
    fake_url = f"http://127.0.0.1:{fake_port}"

    with tempfile.TemporaryDirectory(prefix="kiro2api-demo-") as tmp:
        token_file = Path(tmp) / "kiro-auth-token.json"
        write_token(token_file, mode=0o600)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, str(MAIN / "kiro2api.py"), "server", "--port", str(port),
                   "--api-key", API_KEY, "--token-file", str(token_file),
                   "--upstream", fake_url, "--social-auth-url", fake_url,
                   "--oidc-url", fake_url]
        # The developer's own KIRO2API_* settings stay out of the demo.
        env = {k: v for k, v in os.environ.items() if not k.startswith("KIRO2API_")}
        print(f"fake Kiro backend: {fake_url}")
        print(f"kiro2api:          {url}")
        print("  $ python kiro2api.py server --port", port, "--api-key", API_KEY,
              "--token-file", token_file.name, "--upstream", fake_url, "...")
        # Its log goes to a file, shown at the end, so it does not cut into the answer.
        log = (Path(tmp) / "kiro2api.log").open("w+")
        process = subprocess.Popen(command, cwd=MAIN, env=env, stderr=log)
        try:
            await wait_until_up(url, process)
            client = anthropic.AsyncAnthropic(base_url=url, api_key=API_KEY, max_retries=0)
            print(f"\n> {QUESTION}  (model {MODEL}, streaming)\n")
            async with client.messages.stream(
                model=MODEL, max_tokens=200,
                messages=[{"role": "user", "content": QUESTION}],
            ) as stream:
                async for piece in stream.text_stream:
                    print(piece, end="", flush=True)
                final = await stream.get_final_message()
            print(f"\n\nstop_reason={final.stop_reason} "
                  f"input_tokens={final.usage.input_tokens} "
                  f"output_tokens={final.usage.output_tokens}")
            await client.close()
        finally:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            await runner.cleanup()
            log.seek(0)
            print("\nkiro2api's log:")
            print("".join("  " + line for line in log), end="")
            log.close()
    print(f"stopped kiro2api (exit status {process.returncode}) and the fake backend")
    if process.returncode != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    # Requests to the two local servers go straight to them, whatever proxy
    # the environment names.
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, ("127.0.0.1,localhost", os.environ.get(name))))
    asyncio.run(main())
