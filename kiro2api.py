"""kiro2api: use a Kiro subscription from any Anthropic or OpenAI API client.

Run ``kiro2api server`` and point a client at it::

    eval "$(kiro2api export)"      # sets ANTHROPIC_BASE_URL and ANTHROPIC_AUTH_TOKEN
    claude                          # or any SDK, Cline, Qwen Code, ...

The server reads (and refreshes) the token file the Kiro IDE writes, serves
``POST /v1/messages`` and ``POST /v1/chat/completions``, forwards each request
to Kiro's backend (AWS CodeWhisperer ``generateAssistantResponse``), decodes
the binary event stream frame by frame (``eventstream.py``) and streams the
answer back in the client's own format (``convert.py``) as it arrives.

Under systemd, see ``kiro2api.service``; ``make dist`` builds a one-file
``kiro2api.pyz``.

Layout of this file: configuration, errors, token store, upstream client,
HTTP handlers, middlewares, application factory, command line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import click
from aiohttp import web

import convert
import eventstream

__version__ = "0.1.0"

log = logging.getLogger("kiro2api")

Json = dict[str, Any]

DEFAULT_PORT = 8080
DEFAULT_TOKEN_FILE = "~/.aws/sso/cache/kiro-auth-token.json"
DEFAULT_UPSTREAM = "https://q.{region}.amazonaws.com"
DEFAULT_SOCIAL_AUTH_URL = "https://prod.{region}.auth.desktop.kiro.dev"
DEFAULT_OIDC_URL = "https://oidc.{region}.amazonaws.com"
DEFAULT_REGION = "us-east-1"


# Configuration ############################################################


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the server and the commands are told; built once by the CLI."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    no_auth: bool = False
    token_files: tuple[Path, ...] = field(
        default_factory=lambda: (Path(DEFAULT_TOKEN_FILE).expanduser(),)
    )
    upstream: str = DEFAULT_UPSTREAM
    social_auth_url: str = DEFAULT_SOCIAL_AUTH_URL
    oidc_url: str = DEFAULT_OIDC_URL
    proxy: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    # Seconds. Streams are long, so there is no total timeout; these bound
    # connecting, the wait for the first upstream byte, and silence between
    # frames.
    connect_timeout: float = 10.0
    first_byte_timeout: float = 120.0
    idle_timeout: float = 120.0
    ping_interval: float = 15.0
    shutdown_timeout: float = 30.0
    # Largest client request body we read, in bytes.
    max_body_bytes: int = 32 * 1024 * 1024
    started: float = field(default_factory=time.time, compare=False)


# Application state keys ###################################################

CONFIG = web.AppKey("config", Config)
HTTP = web.AppKey("http", aiohttp.ClientSession)


# HTTP handlers ############################################################


async def handle_root(request: web.Request) -> web.Response:
    """``GET /`` and ``HEAD /``: a small answer (Claude Code probes ``HEAD /``)."""
    return web.json_response({"name": "kiro2api", "version": __version__})


async def handle_health(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "uptime_seconds": round(time.time() - config.started, 3),
        }
    )


# Application factory ######################################################


async def http_session_ctx(app: web.Application):
    """One outbound ClientSession for the whole application."""
    config = app[CONFIG]
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=config.connect_timeout, sock_read=config.idle_timeout
    )
    session = aiohttp.ClientSession(timeout=timeout, trust_env=config.proxy is None)
    app[HTTP] = session
    yield
    await session.close()


def make_app(config: Config) -> web.Application:
    """Build the aiohttp application for ``config``; the tests call this too."""
    app = web.Application(client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app.cleanup_ctx.append(http_session_ctx)
    app.router.add_get("/", handle_root)  # also answers HEAD
    app.router.add_get("/health", handle_health)
    return app


def serve(config: Config) -> None:
    """Run the server until SIGINT/SIGTERM (the seam the CLI tests replace)."""
    web.run_app(
        make_app(config),
        host=config.host,
        port=config.port,
        shutdown_timeout=config.shutdown_timeout,
        access_log=None,
        print=None,
    )


# Command line #############################################################


def configure_logging(level: str, fmt: str) -> None:
    # No timestamps: journald and terminals add their own.
    logging.basicConfig(
        level=level.upper(),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kiro2api")
def cli() -> None:
    """Use a Kiro subscription from Anthropic and OpenAI API clients.

    \b
    Quick start:
      kiro2api read                 # check the Kiro token file
      kiro2api server               # serve on http://127.0.0.1:8080
      eval "$(kiro2api export)"     # point Claude Code at it
    """


@cli.command()
@click.argument("port_arg", metavar="[PORT]", required=False, type=click.IntRange(0, 65535))
@click.argument("key_arg", metavar="[API_KEY]", required=False)
@click.option("--host", envvar="KIRO2API_HOST", show_envvar=True, default="127.0.0.1",
              show_default=True, help="Address to listen on; 0.0.0.0 exposes the server.")
@click.option("--port", envvar="KIRO2API_PORT", show_envvar=True, type=click.IntRange(0, 65535),
              default=None, help=f"Port to listen on [default: {DEFAULT_PORT}].")
@click.option("--api-key", envvar="KIRO2API_API_KEY", show_envvar=True, default=None,
              help="Key clients must send as x-api-key or Bearer.")
@click.option("--no-auth", is_flag=True, help="Accept any client (loopback hosts only).")
@click.option("--token-file", "token_files", envvar="KIRO2API_TOKEN_FILE", show_envvar=True,
              multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help=f"Kiro token file; repeat for an account pool [default: {DEFAULT_TOKEN_FILE}].")
@click.option("--upstream", envvar="KIRO2API_UPSTREAM", show_envvar=True,
              default=DEFAULT_UPSTREAM, show_default=True, help="CodeWhisperer base URL.")
@click.option("--social-auth-url", envvar="KIRO2API_SOCIAL_AUTH_URL", show_envvar=True,
              default=DEFAULT_SOCIAL_AUTH_URL, show_default=True,
              help="Kiro auth service for social logins.")
@click.option("--oidc-url", envvar="KIRO2API_OIDC_URL", show_envvar=True,
              default=DEFAULT_OIDC_URL, show_default=True, help="AWS SSO-OIDC base URL for IdC.")
@click.option("--proxy", envvar="KIRO2API_PROXY", show_envvar=True, default=None,
              help="Outbound HTTP(S) proxy URL (HTTPS_PROXY is honoured when unset).")
@click.option("--log-level", envvar="KIRO2API_LOG_LEVEL", show_envvar=True, default="INFO",
              show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", envvar="KIRO2API_LOG_FORMAT", show_envvar=True, default="text",
              show_default=True, type=click.Choice(["text", "json"]))
def server(port_arg, key_arg, host, port, api_key, no_auth, token_files, upstream,
           social_auth_url, oidc_url, proxy, log_level, log_format) -> None:
    """Run the proxy.

    \b
    Examples:
      kiro2api server                       # 127.0.0.1:8080
      kiro2api server 9000 my-secret-key    # port and client key
    """
    if port_arg is not None and port is not None and port_arg != port:
        raise click.UsageError(f"port given twice: {port_arg} and --port {port}")
    if key_arg is not None and api_key is not None and key_arg != api_key:
        raise click.UsageError("API key given both as an argument and as --api-key")
    config = Config(
        host=host,
        port=port if port is not None else (port_arg if port_arg is not None else DEFAULT_PORT),
        api_key=api_key if api_key is not None else key_arg,
        no_auth=no_auth,
        token_files=tuple(p.expanduser() for p in token_files)
        or (Path(DEFAULT_TOKEN_FILE).expanduser(),),
        upstream=upstream,
        social_auth_url=social_auth_url,
        oidc_url=oidc_url,
        proxy=proxy,
        log_level=log_level.upper(),
        log_format=log_format,
    )
    configure_logging(config.log_level, config.log_format)
    serve(config)


if __name__ == "__main__":
    cli()
