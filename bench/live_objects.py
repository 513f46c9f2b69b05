"""What a stream leaves behind: ``python bench/live_objects.py [--waves 3 --streams 2000]``.

Runs kiro2api's app and the tests' fake upstream (tests/fakes.py) in this
one process, sends waves of streamed ``/v1/messages`` through it (200 at a
time), and after each wave collects garbage and counts the live objects by
type against the count after a first, warm-up wave. A type that grows with
every wave is something each stream leaves behind. The fake keeps a record
of every request it served (``Recorded``, and a few dicts each): those grow
by design and are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

import kiro2api  # noqa: E402
from fakes import FakeUpstream  # noqa: E402
from helpers import API_KEY, write_token_file  # noqa: E402

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": True,
        "messages": [{"role": "user", "content": "hi"}]}
# Per request the fake records one Recorded with its headers, body and payload dicts.
FAKE_RECORDS = {"Recorded": 1, "dict": 3}


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def live_objects() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


async def wave(url: str, streams: int) -> None:
    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(url + "/v1/messages", json=BODY,
                                headers={"x-api-key": API_KEY}) as response:
            await response.read()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
        await asyncio.gather(*(one(session) for _ in range(streams)))


async def main(args: argparse.Namespace) -> None:
    fake = FakeUpstream()
    fake_runner, fake_url = await serve(fake.app())
    token_file = write_token_file(Path(tempfile.mkdtemp()) / "kiro-auth-token.json")
    config = kiro2api.Config(api_key=API_KEY, token_files=(token_file,), upstream=(fake_url,),
                             social_auth_url=fake_url, oidc_url=fake_url,
                             management_url=fake_url + "/management")
    runner, url = await serve(kiro2api.make_app(config))
    await wave(url, args.streams)
    base = live_objects()
    for n in range(1, args.waves + 1):
        await wave(url, args.streams)
        now = live_objects()
        grown = {name: now[name] - base[name] - FAKE_RECORDS.get(name, 0) * n * args.streams
                 for name in now}
        shown = sorted(((k, v) for k, v in grown.items() if v > 0), key=lambda kv: -kv[1])
        print(f"after wave {n} ({n * args.streams} streams): objects more than after the "
              f"warm-up: {sum(v for _, v in shown)}; by type: {shown[:8] or 'none'}",
              flush=True)
    await runner.cleanup()
    await fake_runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--streams", type=int, default=2000, help="streams a wave")
    asyncio.run(main(parser.parse_args()))
