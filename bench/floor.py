"""The forwarding floor: ``python bench/floor.py --upstream URL`` prints its port.

The least a proxy in kiro2api's place can do: take any POST, send its body
to ``URL/generateAssistantResponse`` through one shared ClientSession, and
write every upstream read back unchanged (``iter_any`` -> ``write``). No
decoding, no conversion, no auth. kiro2api's figures are read against it.
"""

from __future__ import annotations

import argparse
import asyncio

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(make_app(args.upstream), args.port))


if __name__ == "__main__":
    main()
