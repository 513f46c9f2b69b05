"""The forwarding floor: ``python bench/floor.py --upstream URL`` prints its port.

The least a proxy in kiro2api's place can do: take any POST, send its body
to ``URL/generateAssistantResponse`` through one shared ClientSession, and
write every upstream read back unchanged (``iter_any`` -> ``write``). No
decoding, no conversion, no auth. kiro2api's figures are read against it.

``--processes N`` runs N floors on one port (SO_REUSEPORT: the kernel deals
the connections out among them), as ``kiro2api server --workers N`` does:
this process starts them, prints the port once all of them listen, serves
nothing itself, and stops them on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from contextlib import contextmanager
from typing import Iterator

import aiohttp
from aiohttp import web

from upstream import serve

SESSION = web.AppKey("session", aiohttp.ClientSession)
TARGET = web.AppKey("target", str)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    async with request.app[SESSION].post(
            request.app[TARGET], data=body,
            headers={"Content-Type": "application/json"}) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            headers={"Content-Type": upstream.headers.get("Content-Type", "")})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application):
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[SESSION].close()


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[TARGET] = upstream.rstrip("/") + "/generateAssistantResponse"
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/{path:.*}", forward)
    return app


@contextmanager
def reserved_port(port: int) -> Iterator[int]:
    """Hold ``port`` (0: a free one) bound with SO_REUSEPORT but not listening, so
    that no other program takes it while the floors bind it too; the kernel
    gives connections to listening sockets only, so none come here."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        yield sock.getsockname()[1]


async def start_floors(upstream: str, port: int,
                       processes: int) -> list[asyncio.subprocess.Process]:
    """``processes`` floors on ``port``, each one listening once this returns."""
    floors = []
    for _ in range(processes):
        floors.append(await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--upstream", upstream, "--port", str(port),
            "--reuse-port", stdout=asyncio.subprocess.PIPE))
        if not (await floors[-1].stdout.readline()).strip():  # it printed no port
            await stop_floors(floors)
            raise SystemExit(f"floor {len(floors)} of {processes} did not start")
    return floors


async def stop_floors(floors: list[asyncio.subprocess.Process]) -> None:
    for floor in floors:
        if floor.returncode is None:
            floor.send_signal(signal.SIGTERM)
    for floor in floors:
        await floor.wait()


async def supervise(upstream: str, port: int, processes: int) -> None:
    """Run ``processes`` floors on one port until SIGTERM/SIGINT or one of them ends."""
    with reserved_port(port) as port:
        floors = await start_floors(upstream, port, processes)
    print(port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(floor.wait()) for floor in floors]
    await asyncio.wait([asyncio.ensure_future(stop.wait()), *waits],
                       return_when=asyncio.FIRST_COMPLETED)
    await stop_floors(floors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1,
                        help="floors on the port, each a process of its own")
    parser.add_argument("--reuse-port", action="store_true",
                        help="bind with SO_REUSEPORT (how --processes starts each floor)")
    args = parser.parse_args()
    if args.processes > 1:
        asyncio.run(supervise(args.upstream, args.port, args.processes))
    else:
        asyncio.run(serve(make_app(args.upstream), args.port, args.reuse_port))


if __name__ == "__main__":
    main()
