"""See kiro2api work without a Kiro account: ``make demo`` (or ``python tests/demo.py``).

Starts the tests' fake Kiro backend (tests/fakes.py) on 127.0.0.1, runs
``kiro2api.py server`` in front of it with a made-up token file, asks it one
question through the Anthropic SDK and prints the answer as it streams in,
then stops both. Nothing leaves the machine.

``make fake`` (``python tests/demo.py --serve [--port N]``) starts the same
two and leaves them running for clients of your own, with kiro2api's log on
the terminal, until Ctrl-C (or SIGTERM); every answer is the fake's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
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


def the_answer() -> Stream:
    """The fake's answer: ANSWER, one frame per write, CHUNK_DELAY apart."""
    frames = text(*ANSWER) + tail(percentage=0.002)  # a short prompt: 0.002 % of the context
    return Stream(frames, delay=CHUNK_DELAY, split=tuple(len(f) for f in frames))


async def start_fake(fake: FakeUpstream) -> tuple[web.AppRunner, str]:
    """Serve ``fake`` on a free port of 127.0.0.1; its runner and URL."""
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def server_command(port: int, token_file: Path, fake_url: str) -> list[str]:
    return [sys.executable, str(MAIN / "kiro2api.py"), "server", "--port", str(port),
            "--api-key", API_KEY, "--token-file", str(token_file),
            "--upstream", fake_url, "--social-auth-url", fake_url, "--oidc-url", fake_url,
            "--management-url", fake_url + "/management"]


def server_env() -> dict[str, str]:
    # The developer's own KIRO2API_* settings stay out of the demo.
    return {k: v for k, v in os.environ.items() if not k.startswith("KIRO2API_")}


async def stop(process: subprocess.Popen) -> None:
    process.terminate()  # SIGTERM: kiro2api lets open streams finish, then exits 0
    try:
        await asyncio.to_thread(process.wait, 10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def main() -> None:
    try:
        import anthropic
    except ImportError:
        raise SystemExit("The demo needs the Anthropic SDK: run `make demo`, which installs "
                         "it, or `pip install anthropic`.") from None

    fake = FakeUpstream()
    fake.script.append(the_answer())
    runner, fake_url = await start_fake(fake)

    with tempfile.TemporaryDirectory(prefix="kiro2api-demo-") as tmp:
        token_file = Path(tmp) / "kiro-auth-token.json"
        write_token(token_file, mode=0o600)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = server_command(port, token_file, fake_url)
        env = server_env()
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
            await stop(process)
            await runner.cleanup()
            log.seek(0)
            print("\nkiro2api's log:")
            print("".join("  " + line for line in log), end="")
            log.close()
    print(f"stopped kiro2api (exit status {process.returncode}) and the fake backend")
    if process.returncode != 0:
        raise SystemExit(1)


async def serve(port: int) -> int:
    """``--serve``: the fake and kiro2api in front of it until Ctrl-C or SIGTERM; the
    exit status (1 if kiro2api stopped by itself or not cleanly)."""
    sys.stdout.reconfigure(line_buffering=True)  # the URL shows at once, also in a pipe
    fake = FakeUpstream()
    fake.answer = the_answer()
    runner, fake_url = await start_fake(fake)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    with tempfile.TemporaryDirectory(prefix="kiro2api-fake-") as tmp:
        token_file = Path(tmp) / "kiro-auth-token.json"
        write_token(token_file, mode=0o600)
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        # Its log goes to this terminal: one line per request. In a session of its
        # own, so that Ctrl-C reaches this script alone, which stops it with one SIGTERM
        # (a second signal while it shuts down would kill it).
        process = subprocess.Popen(server_command(port, token_file, fake_url), cwd=MAIN,
                                   env=server_env(), start_new_session=True)
        try:
            await wait_until_up(url, process)
            print(SERVING.format(fake_url=fake_url, url=url, key=API_KEY, model=MODEL,
                                 pid=process.pid))
            exited = asyncio.ensure_future(asyncio.to_thread(process.wait))
            signalled = asyncio.ensure_future(stopped.wait())
            await asyncio.wait({exited, signalled}, return_when=asyncio.FIRST_COMPLETED)
            signalled.cancel()
        finally:
            await stop(process)
            await runner.cleanup()
    print(f"stopped kiro2api (exit status {process.returncode}) and the fake backend")
    return 0 if stopped.is_set() and process.returncode == 0 else 1


SERVING = """
fake Kiro backend: {fake_url}
kiro2api:          {url}   client key: {key}

Point clients at it from another shell (every answer is the fake's):
  export ANTHROPIC_BASE_URL={url} ANTHROPIC_AUTH_TOKEN={key}    # Claude Code, Anthropic SDKs
  export OPENAI_BASE_URL={url}/v1 OPENAI_API_KEY={key}          # OpenAI SDKs
  curl -s {url}/v1/messages -H 'x-api-key: {key}' -H 'content-type: application/json' \\
    -d '{{"model":"{model}","max_tokens":100,"messages":[{{"role":"user","content":"Hi"}}]}}'

Ctrl-C stops both (kiro2api is process {pid}, in a session of its own).
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--serve", action="store_true",
                        help="keep kiro2api and the fake running until Ctrl-C (make fake)")
    parser.add_argument("--port", type=int, default=0,
                        help="kiro2api's port with --serve [default: a free one]")
    args = parser.parse_args()
    # Requests to the two local servers go straight to them, whatever proxy
    # the environment names.
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, ("127.0.0.1,localhost", os.environ.get(name))))
    if args.serve:
        sys.exit(asyncio.run(serve(args.port)))
    asyncio.run(main())
