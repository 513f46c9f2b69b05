"""kiro2api: use a Kiro subscription from any Anthropic or OpenAI API client.

Run ``kiro2api server`` and point a client at it::

    eval "$(kiro2api export)"      # sets ANTHROPIC_BASE_URL and ANTHROPIC_AUTH_TOKEN
    claude                          # or any SDK, Cline, Qwen Code, ...

The server reads (and refreshes) the Kiro credentials of every kind (the
IDE's token file, kiro-cli's store, Kiro API keys), serves ``POST
/v1/messages`` and ``POST /v1/chat/completions``, forwards each request to
Kiro's backend (AWS CodeWhisperer ``generateAssistantResponse``, on the host
and in the request shape the account's kind takes), decodes
the binary event stream frame by frame (``eventstream.py``) and streams the
answer back in the client's own format (``convert.py``) as it arrives.

Under systemd, see ``kiro2api.service``; ``make dist`` builds a one-file
``kiro2api.pyz``.

Layout of this file: clock, configuration, errors, token files, refresh
protocols, token store, ways to call Kiro, account pool, shared state (the
replicas' Redis, ``--state``), application state keys, upstream client,
metrics, HTTP handlers, usage and the status page, relay (one for every
client API), middlewares, application factory, doctor, command line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import email.utils
import enum
import functools
import gc
import glob
import hashlib
import hmac
import importlib.util
import itertools
import ipaddress
import json
import logging
import math
import os
import pickle
import random
import re
import shlex
import signal
import socket
import sqlite3
import stat
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (see TokenFile._flock)
    fcntl = None  # type: ignore[assignment]

try:
    import aiohttp
    import click
    from aiohttp import web
    from click.core import ParameterSource

    if not hasattr(web, "AppKey"):  # Debian 12 ships aiohttp 3.8
        raise ImportError(f"kiro2api needs aiohttp 3.9 or newer, and {sys.executable} has "
                          f"{aiohttp.__version__}: pip install 'aiohttp>=3.9' (in a "
                          f"virtualenv if the system's is older)", name="aiohttp")
except ImportError as exc:
    # What to install, in one line: `python3 kiro2api.py` exits with it, and the
    # pyz's __main__.py prints it (an ImportError named aiohttp or click) alone.
    if exc.name not in ("aiohttp", "click"):
        raise
    if isinstance(exc, ModuleNotFoundError):
        exc = ModuleNotFoundError(
            f"kiro2api needs aiohttp and click, and {sys.executable} has no {exc.name}: "
            f"pip install 'aiohttp>=3.9' 'click>=8.1', or on Debian/Ubuntu apt install "
            f"python3-aiohttp python3-click", name=exc.name)
    if __name__ == "__main__":
        raise SystemExit(str(exc)) from None
    raise exc from None

import convert
import eventstream

__version__ = "0.1.0"

log = logging.getLogger("kiro2api")

Json = dict[str, Any]

DEFAULT_PORT = 8080
DEFAULT_TOKEN_FILE = "~/.aws/sso/cache/kiro-auth-token.json"
# Today's service first, the legacy host after it (PROTOCOL-2026.md 10.1.1, 10.5).
DEFAULT_UPSTREAMS = ("https://runtime.{region}.kiro.dev", "https://q.{region}.amazonaws.com")
DEFAULT_MANAGEMENT_URL = "https://management.{region}.kiro.dev"
# Regions Kiro's own hosts exist in; an IdC login region outside them (say
# ap-southeast-1) has none, and its calls go to us-east-1 (10.1.1).
KIRO_REGIONS = ("us-east-1", "eu-central-1", "us-gov-east-1", "us-gov-west-1")
# Hosts an external identity provider's token endpoint may be on, since the
# refresh token is sent there (10.6): Microsoft Entra ID's; --allow-idp-host adds.
DEFAULT_IDP_HOSTS = ("microsoftonline.com", "microsoftonline.us", "microsoftonline.cn")
DEFAULT_SOCIAL_AUTH_URL = "https://prod.{region}.auth.desktop.kiro.dev"
DEFAULT_OIDC_URL = "https://oidc.{region}.amazonaws.com"
DEFAULT_REGION = "us-east-1"


# Clock ####################################################################


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True, slots=True)
class Clock:
    """Where the token store and the cooldowns read the time; tests give one they move.

    ``monotonic`` measures intervals (retries, cooldowns, lock waits); ``now``
    is the wall clock that token expiry is read against.
    """

    monotonic: Callable[[], float] = time.monotonic
    now: Callable[[], datetime] = utcnow


SYSTEM_CLOCK = Clock()


def human_duration(seconds: float) -> str:
    """A duration as a person reads it: 42 s, 5 min, 3 h 10 min, 2 d 4 h."""
    seconds = int(abs(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


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
    # Candidate hosts in order (a single URL is one candidate); "#runtime" or
    # "#legacy" after a URL names its family where the host name does not.
    upstream: tuple[str, ...] | str = DEFAULT_UPSTREAMS
    management_url: str = DEFAULT_MANAGEMENT_URL
    region: str | None = None  # for accounts whose file names none
    kiro_version: convert.ClientVersions = field(default_factory=convert.ClientVersions)
    kiro_api_keys: tuple[str, ...] = field(default=(), repr=False)
    allow_idp_hosts: tuple[str, ...] = ()
    social_auth_url: str = DEFAULT_SOCIAL_AUTH_URL
    oidc_url: str = DEFAULT_OIDC_URL
    proxy: str | None = None
    # Replicas: the state store's URL (redis://, rediss://, unix://; it may hold a
    # password), and how long a refresh lock outlives a replica that died holding it.
    state: str | None = field(default=None, repr=False)
    state_lock_seconds: float = 45.0
    # Client model name -> the model to serve it with (--model-map FROM=TO).
    model_map: Mapping[str, str] = field(default_factory=dict)
    # How Claude Code's auto-mode safeguards are answered: "off" (each call
    # "not judged") or "kiro" (each call judged by a small Kiro model).
    safeguards: str = "off"
    log_level: str = "INFO"
    log_format: str = "text"
    # Whether text log lines start with the time; JSON lines always carry it.
    # The CLI turns it off when stderr goes to journald, which stamps every line.
    log_timestamps: bool = True
    # Seconds. Streams are long, so there is no total timeout; these bound
    # connecting, the wait for the first upstream byte, and silence between
    # frames.
    connect_timeout: float = 10.0
    first_byte_timeout: float = 120.0
    idle_timeout: float = 120.0
    # Before the first byte reaches the client, connection errors, 429 and
    # 5xx are retried up to this many times, within this many seconds.
    retries: int = 3
    retry_seconds: float = 30.0
    ping_interval: float = 15.0
    # How often the server looks at its token files for one that appeared or
    # changed (a stat each, so it can be often).
    watch_interval: float = 5.0
    shutdown_timeout: float = 30.0
    # Connections the system holds for the server to accept. A team's clients
    # connecting at once (2,000 streams opened within 2 s) overflowed aiohttp's
    # 128 while the event loop was busy starting the streams already accepted;
    # Linux caps the figure at net.core.somaxconn (4096 since Linux 5.4).
    backlog: int = 1024
    # The event loop serve runs on: "asyncio" or "uvloop" (the CLI turns --loop
    # auto into one of them).
    loop: str = "asyncio"
    # Server processes on one port (--workers). The supervisor gives each
    # worker its number (1..N; 0: not a worker) and its hub's Unix socket.
    workers: int = 1
    worker: int = 0
    hub: str | None = None
    # Largest client request body we read, in bytes.
    max_body_bytes: int = 32 * 1024 * 1024
    # Largest CodeWhisperer body we send, in bytes. The upstream refuses
    # larger ones ("Input is too long."); peers put the limit near 600 KB.
    max_input_bytes: int = 600_000
    # HTTP(S)_PROXY and NO_PROXY, read once when the Config is made (not per
    # request: aiohttp's trust_env costs two thread hops a request).
    environment_proxies: dict[str, str] = field(
        default_factory=urllib.request.getproxies_environment, compare=False, repr=False)
    started: float = field(default_factory=time.time, compare=False)
    clock: Clock = field(default=SYSTEM_CLOCK, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.upstream, str):
            object.__setattr__(self, "upstream", (self.upstream,))

    def proxy_for(self, url: str) -> str | None:
        """The outbound proxy for ``url``: ``--proxy``, else the environment's."""
        if self.proxy:
            return self.proxy
        parts = urllib.parse.urlsplit(url)
        proxies = self.environment_proxies
        if not proxies or urllib.request.proxy_bypass_environment(parts.hostname or "", proxies):
            return None
        return proxies.get(parts.scheme)


# Errors ###################################################################


class TokenError(Exception):
    """A Kiro token problem; ``str()`` is one line naming the file or URL and what to do."""


class TokenFileError(TokenError):
    """A token file or its IdC client registration is missing, unreadable or incomplete."""


class RefreshError(TokenError):
    """The auth service did not refresh the access token.

    ``permanent`` means it refused the refresh token itself (``invalid_grant``,
    "Invalid refresh token", HTTP 400 or 401): only logging in to Kiro again helps.
    """

    def __init__(self, message: str, *, status: int | None = None, reason: str | None = None,
                 permanent: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.permanent = permanent


class TokenLockError(TokenError):
    """Another process held a token file's lock for longer than any refresh takes."""


# user:password@ in a URL, as aiohttp's errors quote the proxy's URL.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@")


def describe(exc: BaseException) -> str:
    """An aiohttp client error as words for a client or a log, credentials removed."""
    text = str(exc) or type(exc).__name__
    return _USERINFO.sub(r"\1***@", text)


# Every error a client is answered with is a ``convert.Failure``: a kind, a
# status hint, a message (and retry-after, param, code). ``failure_of`` is the
# one place an exception becomes one, for the error middleware (before the
# response starts) and the relay (after, as the stream's in-band error) alike;
# each client API renders it in its own envelope (``convert.ClientApi``).


class UpstreamError(Exception):
    """Kiro refused the request or could not be reached, before the answer started."""

    def __init__(self, failure: convert.Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


# kiro2api's own bug, and a stream cut short by shutdown.
INTERNAL_FAILURE = convert.failure(500, "internal error in kiro2api; see its log")
SHUTDOWN_FAILURE = convert.failure(503, "kiro2api is shutting down; the answer was cut short")


def failure_of(exc: BaseException) -> convert.Failure:
    """How to answer a client for ``exc``; ``INTERNAL_FAILURE`` for one that says
    nothing (a bug, to be logged with its traceback by the caller)."""
    if isinstance(exc, UpstreamError):
        return exc.failure
    if isinstance(exc, convert.ConversionError):
        return convert.conversion_failure(exc)
    if isinstance(exc, RefreshError) and exc.permanent:  # only logging in again helps
        return convert.failure(401, str(exc))
    if isinstance(exc, TokenError):
        # A token file missing or unreadable, a stuck lock, an auth service that
        # failed: the proxy cannot serve now, and the message says what to do.
        return convert.failure(503, str(exc))
    if isinstance(exc, convert.StreamError):
        return convert.failure(429 if exc.error_type == "ThrottlingException" else 502,
                               f"Kiro ended the answer with an error: {exc}")
    if isinstance(exc, eventstream.EventStreamError):
        return convert.failure(502, f"the upstream stream was corrupt: {exc}")
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's read timeouts included
        return convert.failure(504, "the upstream stopped sending before the answer was "
                               "complete")
    if isinstance(exc, aiohttp.ClientError):
        return convert.failure(502, f"the upstream connection failed mid-answer: "
                               f"{describe(exc)}")
    if isinstance(exc, web.HTTPException):
        return convert.failure(exc.status, exc.reason)
    return INTERNAL_FAILURE


# Token files ##############################################################

# Refresh when less than this is left (peers use 5 to 10 minutes).
REFRESH_MARGIN = timedelta(minutes=5)
# How long to wait for another process's refresh; it is itself bounded by
# its own REFRESH_TIMEOUT_SECONDS.
LOCK_TIMEOUT_SECONDS = 60.0
LOCK_POLL_SECONDS = 0.05
TOKEN_FILE_MODE = 0o600

# authMethod values (matched case-insensitively) → ours, each a row of
# REFRESH_PROTOCOLS. PROTOCOL.md §1.1.
AUTH_METHODS = {"social": "social", "idc": "idc", "builder-id": "idc", "builderid": "idc",
                "iam": "idc", "external_idp": "external_idp", "externalidp": "external_idp"}

RELOGIN = "log in to Kiro again to rewrite it"
_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_CLIENT_ID_HASH = re.compile(r"[A-Za-z0-9_-]+")
_EXPIRES_AT = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}(?::\d{2})?)"  # date, time
    r"(?:[.,](\d+))?\s*(Z|z|[+-]\d{2}(?::?\d{2})?)?"  # fraction, zone
)


def parse_expires_at(value: Any) -> datetime | None:
    """An ``expiresAt`` as an aware datetime; None when missing or unreadable.

    Accepts ``Z`` or an offset, fractions of any length (nanoseconds are cut to
    microseconds) and, as some tools write, epoch seconds or milliseconds.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        try:
            return datetime.fromtimestamp(value / 1000 if value > 1e11 else value, timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str):
        return None
    match = _EXPIRES_AT.fullmatch(value.strip())
    if match is None:
        return None
    date, clock, fraction, zone = match.groups()
    if clock.count(":") == 1:
        clock += ":00"
    if zone is None or zone in "Zz":
        zone = "+00:00"
    elif len(zone) == 3:
        zone += ":00"
    elif ":" not in zone:
        zone = f"{zone[:3]}:{zone[3:]}"
    try:
        return datetime.fromisoformat(f"{date}T{clock}.{(fraction or '0')[:6]:0<6}{zone}")
    except ValueError:
        return None


def format_expires_at(moment: datetime) -> str:
    """The Kiro IDE's ``expiresAt`` format: UTC, milliseconds, ``Z``."""
    utc = moment.astimezone(timezone.utc)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Credentials:
    """One Kiro login, as its token file holds it (secrets are kept out of ``repr``)."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: datetime | None
    auth_method: str  # "api_key" or a key of REFRESH_PROTOCOLS: "social", "idc", "external_idp"
    provider: str | None = None
    region: str = DEFAULT_REGION
    profile_arn: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    start_url: str | None = None  # IdC: the organisation's start URL
    token_endpoint: str | None = None  # external IdP: where its refresh token goes
    scopes: str | None = None  # external IdP: the scopes asked for on refresh

    @property
    def kind(self) -> str:
        """Which of ``convert.KINDS`` this login is (Builder ID and IdC share a method)."""
        return convert.credential_kind(self.auth_method, self.provider, self.profile_arn,
                                       self.start_url)

    def seconds_left(self, now: datetime | None = None) -> float | None:
        if self.expires_at is None:
            return None
        return (self.expires_at - (now or utcnow())).total_seconds()

    def expiring(self, now: datetime | None = None) -> bool:
        """True when less than REFRESH_MARGIN is left; an unknown expiry is not expiring."""
        left = self.seconds_left(now)
        return left is not None and left < REFRESH_MARGIN.total_seconds()

    def expired(self, now: datetime | None = None) -> bool:
        """True when no time is left; an unknown expiry has not expired."""
        left = self.seconds_left(now)
        return left is not None and left <= 0


def _read_json_object(path: Path, *, missing: str | None, fix: str,
                      unreadable: str = "check that it is a readable file") -> Json:
    """The JSON object in ``path``, or a ``TokenFileError`` whose one line ends in ``fix``
    (``unreadable`` when the file cannot be read at all). ``missing`` is the error of
    an absent file; None lets its ``FileNotFoundError`` through."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing is None:
            raise
        raise TokenFileError(missing) from None
    except OSError as exc:
        raise TokenFileError(f"cannot read {path} ({exc.strerror or exc}); {unreadable}") \
            from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TokenFileError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); {fix}"
        ) from None
    except (ValueError, RecursionError):
        raise TokenFileError(f"{path} is not valid JSON (not UTF-8 text); {fix}") from None
    if not isinstance(data, dict):
        raise TokenFileError(f"{path} holds JSON but not an object; {fix}")
    return data


def _text(data: Json, key: str) -> str | None:
    value = data.get(key)
    return value.strip() if isinstance(value, str) and value.strip() else None


def read_token_file(path: Path) -> tuple[Json, Credentials]:
    """Parse a Kiro token file (and, for IdC, its client registration): the raw JSON and
    the credentials in it. Raises ``TokenFileError`` with a one-line reason."""
    data = _read_json_object(
        path, fix=RELOGIN,
        missing=f"{path} does not exist; log in to Kiro first, or point --token-file "
                f"(KIRO2API_TOKEN_FILE) at your token file")

    def required(key: str) -> str:
        value = _text(data, key)
        if value is None:
            raise TokenFileError(f"{path} has no {key}; {RELOGIN}")
        return value

    access_token, refresh_token = required("accessToken"), required("refreshToken")
    method_name = data.get("authMethod")
    if method_name is None:
        # Files rewritten by the original Go tool lost authMethod (PROTOCOL.md §2.5).
        method = "idc" if "clientIdHash" in data or "clientId" in data else "social"
    else:
        method = AUTH_METHODS.get(str(method_name).strip().lower(), "")
        if not method:
            raise TokenFileError(
                f"{path}: authMethod {method_name!r} is not supported; kiro2api handles social "
                f"(Google, GitHub), IdC (Builder ID, Enterprise) and external_idp (Entra ID, "
                f"Okta) logins")
    region = _text(data, "region") or DEFAULT_REGION
    if not _REGION.fullmatch(region):
        raise TokenFileError(f"{path}: region {region!r} is not an AWS region name; {RELOGIN}")
    # IdC: clientId/clientSecret inline (kiro.rs style), else in <clientIdHash>.json beside it.
    client_id, client_secret = _text(data, "clientId"), _text(data, "clientSecret")
    if method == "idc" and not (client_id and client_secret):
        client_id_hash = data.get("clientIdHash")
        if not isinstance(client_id_hash, str) or not _CLIENT_ID_HASH.fullmatch(client_id_hash):
            raise TokenFileError(f"{path} is an IdC login without a clientIdHash; {RELOGIN}")
        registration = path.parent / f"{client_id_hash}.json"
        fix = "log in to Kiro again to register it anew"
        reg = _read_json_object(
            registration, fix=fix,
            missing=f"{registration} (the IdC client registration {path.name} names) "
                    f"does not exist; {fix}")
        client_id, client_secret = _text(reg, "clientId"), _text(reg, "clientSecret")
        for key, value in (("clientId", client_id), ("clientSecret", client_secret)):
            if value is None:
                raise TokenFileError(f"{registration} has no {key}; {fix}")
    if method == "external_idp":
        for key in ("tokenEndpoint", "clientId"):
            required(key)
    return data, Credentials(
        access_token=access_token,
        refresh_token=refresh_token,
        expires_at=parse_expires_at(data.get("expiresAt")),
        auth_method=method,
        provider=_text(data, "provider"),
        region=region,
        profile_arn=_text(data, "profileArn"),
        client_id=client_id if method in ("idc", "external_idp") else None,
        client_secret=client_secret if method == "idc" else None,
        start_url=_text(data, "startUrl"),
        token_endpoint=_text(data, "tokenEndpoint"),
        scopes=_scopes(data.get("scopes")),
    )


def _scopes(value: Any) -> str | None:
    """``scopes`` as a list (the IDE) or a space-separated string, as one string."""
    if isinstance(value, list):
        value = " ".join(v for v in value if isinstance(v, str))
    return value.strip() or None if isinstance(value, str) else None


def write_json_atomic(path: Path, data: Json, *, mode: int) -> None:
    """Replace ``path`` (a symlink's target, if it is one) with ``data`` as JSON,
    atomically (``write_bytes_atomic``)."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` (a symlink's target, if it is one) with ``data``.

    The bytes go to a temporary file in the same directory, created 0600,
    which is fsynced, given ``mode`` and the old file's owner, and renamed
    over the old file: readers see the old file or the new one, never a mix.
    """
    target = Path(os.path.realpath(path))
    try:
        old: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if old is not None and hasattr(os, "chown") and old.st_uid != os.geteuid():
            # Root refreshing a user's file must not take it away from the user.
            with contextlib.suppress(OSError):
                os.chown(tmp, old.st_uid, old.st_gid)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        with contextlib.suppress(OSError):
            dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def why_unwritable(path: Path) -> str | None:
    """Why ``write_bytes_atomic`` could not replace ``path``, or None if it can.

    It needs to create a file in the directory and rename it over the file;
    ``os.access`` answers for the real user, and a read-only mount refuses
    even root.
    """
    directory = Path(os.path.realpath(path)).parent
    if not os.access(directory, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):  # no statvfs on Windows
            read_only = False
        return "read-only file system" if read_only else f"no permission to write in {directory}"
    return None


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of ``write_bytes_atomic`` that a writer killed before
    its rename left beside ``path``: they hold tokens. Call it under the file's lock,
    which every writer of those files holds."""
    target = Path(os.path.realpath(path))
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            leftover.unlink()
            log.info("removed %s, left by a writer that was killed", leftover)


class TokenFile:
    """A Kiro IDE token file as the token store uses it: read, lock, merge, write.

    The one place that knows where and how an account's tokens are kept;
    another kind of storage (kiro-cli's SQLite database) is a class with the
    same ``read``, ``lock``, ``ensure_writable`` and ``write``. Blocking file work
    runs in a thread, so the event loop never waits on the disk.
    """

    def __init__(self, path: Path, *, clock: Clock = SYSTEM_CLOCK,
                 lock_timeout: float = LOCK_TIMEOUT_SECONDS) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"<TokenFile {self.path}>"

    @property
    def identity(self) -> str:
        """What names the account to Kiro (its machine id is made from it)."""
        return str(self.path)

    @property
    def lock_path(self) -> Path:
        target = Path(os.path.realpath(self.path))
        return target.with_name(target.name + ".lock")

    async def read(self) -> tuple[Json, Credentials]:
        """The file's JSON and the credentials in it; ``TokenFileError`` if unusable."""
        return await asyncio.to_thread(read_token_file, self.path)

    def stamp(self) -> tuple[int, ...] | None:
        """What changes when the file is written (its inode, size and modification
        time); None while it does not exist. Blocking: a thread calls it."""
        return file_stamp(self.path)

    async def ensure_writable(self) -> None:
        """Raise ``TokenFileError`` if a token refreshed now could not be written."""
        unwritable = await asyncio.to_thread(why_unwritable, self.path)
        if unwritable:
            raise TokenFileError(
                f"cannot write {self.path} ({unwritable}), so a refreshed token would be lost "
                f"when this command ends: make the file and its directory writable, then try "
                f"again")

    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        """Hold ``<token file>.lock`` so that processes refresh one at a time.

        Under it, what a writer killed mid-write left beside the file is removed.
        """
        async with self._flock():
            await asyncio.to_thread(remove_stale_temporaries, self.path)
            yield

    async def write(self, data: Json, on_disk: Credentials, fresh: Credentials,
                    updates: Json) -> Credentials:
        """Merge ``updates`` into the file (unknown keys kept) and replace it atomically.

        ``data`` and ``on_disk`` are what was read under the lock. The Kiro IDE
        does not take our lock: the file is read once more, and a token another
        program wrote since that outlives ``fresh`` is kept (and returned)
        instead. Raises ``TokenFileError`` when the file cannot be written.
        """
        try:
            data, latest = await self.read()
        except TokenError:
            latest = on_disk  # gone or mid-write: merge into what was read under the lock
        if latest.access_token != on_disk.access_token and latest.expires_at is not None and (
                fresh.expires_at is None or latest.expires_at > fresh.expires_at):
            log.info("%s: another program wrote a newer token during the refresh; using it",
                     self.path)
            return latest
        merged = dict(data)
        merged.update(updates)  # known keys keep their place
        try:
            await asyncio.to_thread(write_json_atomic, self.path, merged, mode=TOKEN_FILE_MODE)
        except OSError as exc:
            raise TokenFileError(
                f"refreshed the token but cannot write {self.path} ({exc.strerror or exc}); "
                f"kiro2api keeps the new one in memory only: check the file and its directory"
            ) from None
        return fresh

    @contextlib.asynccontextmanager
    async def _flock(self) -> AsyncIterator[None]:
        # Polled without blocking, so the event loop never waits on it, a
        # waiting task can be cancelled, and a stuck holder is reported after
        # lock_timeout rather than waited for forever.
        if fcntl is None:
            # No flock on Windows: refreshes there are serialised within the
            # process only; the re-read before refreshing still catches most
            # refreshes made elsewhere.
            yield
            return
        lock_path = self.lock_path
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, TOKEN_FILE_MODE)
        except OSError as exc:
            # A read-only directory: nobody can write the token file there either.
            log.debug("no lock file %s (%s); refreshing without it", lock_path, exc)
            yield
            return
        try:
            deadline = self._clock.monotonic() + self._lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self._clock.monotonic() >= deadline:
                        raise TokenLockError(
                            f"{lock_path} stayed locked for {self._lock_timeout:g} s; another "
                            f"kiro2api seems stuck refreshing {self.path}: stop it and try again"
                        ) from None
                    await asyncio.sleep(LOCK_POLL_SECONDS)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


# kiro-cli keeps its logins in SQLite (PROTOCOL-2026.md 10.8): table auth_kv,
# a JSON value per key, snake_case. The first token row present is used.
SQLITE_MAGIC = b"SQLite format 3\x00"
KIRO_CLI_TOKEN_KEYS = (("kirocli:external-idp:token", "external_idp"),
                       ("kirocli:social:token", "social"),
                       ("kirocli:odic:token", "idc"), ("kirocli:oidc:token", "idc"),
                       ("codewhisperer:odic:token", "idc"))
KIRO_CLI_REGISTRATION_KEYS = ("kirocli:odic:device-registration",
                              "kirocli:oidc:device-registration",
                              "codewhisperer:odic:device-registration")
KIRO_CLI_PROFILE_KEY = "api.codewhisperer.profile"
# Our token file keys → kiro-cli's, for the write-back.
KIRO_CLI_KEYS = {"accessToken": "access_token", "refreshToken": "refresh_token",
                 "expiresAt": "expires_at"}
SQLITE_BUSY_SECONDS = 5.0


def file_stamp(path: Path) -> tuple[int, ...] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_ino, found.st_size, found.st_mtime_ns)


def is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return path.suffix in (".sqlite3", ".sqlite", ".db")


def _sqlite_json(rows: dict[str, str], key: str) -> Json:
    try:
        value = json.loads(rows.get(key) or "{}")
    except (ValueError, RecursionError):
        value = None
    return value if isinstance(value, dict) else {}


def read_kiro_cli_store(path: Path) -> tuple[Json, Credentials]:
    """kiro-cli's ``data.sqlite3``: ``{"key": its token row, "value": that row's JSON}``
    and the credentials in it. Raises ``TokenFileError`` with a one-line reason."""
    fix = "log in with kiro-cli again (kiro-cli login)"
    if not path.exists():  # sqlite3 would only say "unable to open database file"
        raise TokenFileError(f"{path} does not exist; log in with kiro-cli first (kiro-cli "
                             f"login), or point --token-file (KIRO2API_TOKEN_FILE) at its store")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                timeout=SQLITE_BUSY_SECONDS)) as db:
            rows = dict(db.execute("SELECT key, value FROM auth_kv"))
            state = dict(db.execute("SELECT key, value FROM state WHERE key = ?",
                                    (KIRO_CLI_PROFILE_KEY,))) if db.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'state'").fetchone() else {}
    except sqlite3.Error as exc:
        raise TokenFileError(f"cannot read kiro-cli's store {path} ({exc}); {fix}") from None
    for key, method in KIRO_CLI_TOKEN_KEYS:
        if key in rows:
            break
    else:
        raise TokenFileError(f"{path} holds no kiro-cli login; {fix}")
    value = _sqlite_json(rows, key)
    access, refresh = _text(value, "access_token"), _text(value, "refresh_token")
    if not access or not refresh:
        raise TokenFileError(f"{path}: the {key} row has no access_token or refresh_token; {fix}")
    registration = next((_sqlite_json(rows, k) for k in KIRO_CLI_REGISTRATION_KEYS if k in rows),
                        {})
    if method == "idc" and not (_text(registration, "client_id")
                                and _text(registration, "client_secret")):
        raise TokenFileError(f"{path} has an IdC login but no client registration; {fix}")
    arn = _text(_sqlite_json(state, KIRO_CLI_PROFILE_KEY), "arn")
    if arn == convert.SERVICE_PROFILE_ARN:
        arn = None  # after a Builder ID login: the service's, not the account's
    region = _text(value, "region") or DEFAULT_REGION
    return {"key": key, "value": value}, Credentials(
        access_token=access, refresh_token=refresh,
        expires_at=parse_expires_at(value.get("expires_at")), auth_method=method,
        provider=_text(value, "provider"), region=region if _REGION.fullmatch(region)
        else DEFAULT_REGION, profile_arn=arn,
        client_id=_text(registration, "client_id") or _text(value, "client_id"),
        client_secret=_text(registration, "client_secret") if method == "idc" else None,
        start_url=_text(value, "start_url") or _text(registration, "start_url"),
        token_endpoint=_text(value, "token_endpoint"), scopes=_scopes(value.get("scopes")))


def write_kiro_cli_row(path: Path, key: str, value: Json) -> None:
    """Replace one auth_kv row's JSON, in one transaction (kiro-cli may be reading)."""
    with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_BUSY_SECONDS)) as db:
        with db:
            db.execute("UPDATE auth_kv SET value = ? WHERE key = ?",
                       (json.dumps(value, ensure_ascii=False), key))


class KiroCliStore(TokenFile):
    """kiro-cli's SQLite store as an account's token source: the same ``read``,
    ``lock`` and ``write`` as a token file, written back in place (the row's
    other keys kept) under the same ``.lock``, so kiro-cli keeps working with
    the refreshed token instead of a refresh token we spent."""

    def __repr__(self) -> str:
        return f"<KiroCliStore {self.path}>"

    async def read(self) -> tuple[Json, Credentials]:
        return await asyncio.to_thread(read_kiro_cli_store, self.path)

    def stamp(self) -> tuple[int, ...] | None:
        # In WAL mode a write lands in the -wal file beside the database first.
        main = file_stamp(self.path)
        wal = file_stamp(self.path.with_name(self.path.name + "-wal"))
        return None if main is None else main + (wal or ())

    async def ensure_writable(self) -> None:
        await super().ensure_writable()
        if not os.access(self.path, os.W_OK):
            raise TokenFileError(f"cannot write {self.path}, so a refreshed token would be lost "
                                 f"when this command ends: make it writable, then try again")

    async def write(self, data: Json, on_disk: Credentials, fresh: Credentials,
                    updates: Json) -> Credentials:
        value = dict(data["value"])
        value.update({KIRO_CLI_KEYS[k]: v for k, v in updates.items() if k in KIRO_CLI_KEYS})
        try:
            await asyncio.to_thread(write_kiro_cli_row, self.path, data["key"], value)
        except sqlite3.Error as exc:
            raise TokenFileError(
                f"refreshed the token but cannot write {self.path} ({exc}); kiro2api keeps "
                f"the new one in memory only: check the file and its directory") from None
        return fresh


class KiroApiKey(TokenFile):
    """A Kiro API key (``ksk_…``, ``--kiro-api-key``) as an account: nothing to read
    from disk, nothing to lock, never refreshed (PROTOCOL-2026.md 10.7)."""

    def __init__(self, key: str, number: int, *, region: str) -> None:
        super().__init__(Path(f"kiro-api-key-{number}"))
        self._credentials = Credentials(access_token=key, refresh_token="", expires_at=None,
                                        auth_method="api_key", region=region)

    def __repr__(self) -> str:
        return f"<KiroApiKey {self.path}>"

    @property
    def identity(self) -> str:
        return self._credentials.access_token

    async def read(self) -> tuple[Json, Credentials]:
        return {}, self._credentials

    def stamp(self) -> tuple[int, ...] | None:
        return None  # no file: never changes

    async def ensure_writable(self) -> None:
        return None

    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        yield

    async def write(self, data: Json, on_disk: Credentials, fresh: Credentials,
                    updates: Json) -> Credentials:
        return fresh


def token_source(path: Path, *, clock: Clock = SYSTEM_CLOCK,
                 lock_timeout: float = LOCK_TIMEOUT_SECONDS) -> TokenFile:
    """The token source a ``--token-file`` names: kiro-cli's SQLite store, or a JSON file."""
    kind = KiroCliStore if is_sqlite(Path(path)) else TokenFile
    return kind(path, clock=clock, lock_timeout=lock_timeout)


# Refresh protocols ########################################################
#
# Each auth method is a pair of pure functions, a request (where to POST
# which JSON) and an answer reader (a 200 answer's credentials), and a row of
# REFRESH_PROTOCOLS; ``_call_auth_service`` makes the one HTTP call.

REFRESH_TIMEOUT_SECONDS = 30.0
DEFAULT_EXPIRES_IN_SECONDS = 3600
MAX_EXPIRES_IN_SECONDS = 366 * 24 * 3600  # keeps a silly expiresIn from overflowing datetime
# Error codes of the auth services that mean the refresh token is dead.
PERMANENT_REASONS = {"invalid_grant", "invalid_client", "unauthorized_client"}


def region_url(template: str, region: str) -> str:
    """A base URL (auth or upstream) with ``{region}`` filled in; other text stays as it is."""
    return template.replace("{region}", region).rstrip("/")


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """One refresh call: the URL, its JSON body, and the option that names the service."""

    url: str
    body: Json = field(repr=False)
    option: str
    form: bool = False  # form-encoded (OAuth 2) rather than JSON


def social_refresh_request(base: Credentials, config: Config) -> AuthRequest:
    """Kiro's own auth service, for Google and GitHub logins."""
    return AuthRequest(region_url(config.social_auth_url, base.region) + "/refreshToken",
                       {"refreshToken": base.refresh_token}, "--social-auth-url")


def idc_refresh_request(base: Credentials, config: Config) -> AuthRequest:
    """AWS SSO-OIDC's CreateToken, for Builder ID and IAM Identity Center logins."""
    return AuthRequest(region_url(config.oidc_url, base.region) + "/token",
                       {"clientId": base.client_id, "clientSecret": base.client_secret,
                        "grantType": "refresh_token", "refreshToken": base.refresh_token},
                       "--oidc-url")


def refreshed_credentials(base: Credentials, answer: Json,
                          now: datetime) -> tuple[Credentials, Json]:
    """The credentials in a 200 answer (both services answer in camelCase) and the token
    file keys to update. Raises ValueError saying what the answer lacks."""
    if not _text(answer, "accessToken"):
        raise ValueError("an answer without an accessToken")
    expires_in = answer.get("expiresIn")
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) \
            or not math.isfinite(expires_in) or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN_SECONDS
    expires_at = now + timedelta(seconds=min(expires_in, MAX_EXPIRES_IN_SECONDS))
    expires_at = expires_at.replace(microsecond=expires_at.microsecond // 1000 * 1000)
    fresh = dataclasses.replace(
        base,
        access_token=answer["accessToken"].strip(),
        # A rotated refresh token replaces the old one; none means keep it.
        refresh_token=_text(answer, "refreshToken") or base.refresh_token,
        expires_at=expires_at,
        profile_arn=_text(answer, "profileArn") or base.profile_arn,
    )
    updates: Json = {"accessToken": fresh.access_token,
                     "refreshToken": fresh.refresh_token,
                     "expiresAt": format_expires_at(expires_at)}
    if _text(answer, "profileArn"):
        updates["profileArn"] = fresh.profile_arn
    return fresh, updates


def idp_endpoint_problem(url: str, allowed: tuple[str, ...]) -> str | None:
    """Why the refresh token must not go to ``url``, or None: https only, a host name
    (no address), on DEFAULT_IDP_HOSTS or ``allowed`` (a name or its subdomains)."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme != "https":
        return "not an https URL"
    try:
        ipaddress.ip_address(host)
        return "an IP address, not a host name"
    except ValueError:
        pass
    for entry in (*DEFAULT_IDP_HOSTS, *allowed):
        entry = entry.lower().strip(".")
        if host == entry or host.endswith("." + entry):
            return None
    return f"{host or 'no host'} is not an allowed identity provider (--allow-idp-host)"


def external_idp_refresh_request(base: Credentials, config: Config) -> AuthRequest:
    """The organisation's OAuth 2 token endpoint (Entra ID, Okta): a public client's
    form-encoded refresh_token grant."""
    url = base.token_endpoint or ""
    problem = idp_endpoint_problem(url, config.allow_idp_hosts)
    if problem:
        raise RefreshError(f"will not send the refresh token to {url} ({problem}); if that is "
                           f"your organisation's identity provider, start kiro2api with "
                           f"--allow-idp-host {urllib.parse.urlsplit(url).hostname or 'HOST'}",
                           permanent=True)
    body = {"client_id": base.client_id or "", "grant_type": "refresh_token",
            "refresh_token": base.refresh_token}
    if base.scopes:
        body["scope"] = base.scopes
    return AuthRequest(url, body, "--allow-idp-host", form=True)


def refreshed_idp_credentials(base: Credentials, answer: Json,
                              now: datetime) -> tuple[Credentials, Json]:
    """An OAuth 2 answer (snake_case) read as the Kiro services' camelCase one."""
    camel = {"accessToken": answer.get("access_token"),
             "refreshToken": answer.get("refresh_token"),
             "expiresIn": answer.get("expires_in")}
    return refreshed_credentials(base, camel, now)


@dataclass(frozen=True, slots=True)
class RefreshProtocol:
    """How one auth method exchanges a refresh token: its request and its answer."""

    request: Callable[[Credentials, Config], AuthRequest]
    answer: Callable[[Credentials, Json, datetime], tuple[Credentials, Json]]


# Credentials.auth_method → its protocol. A new auth method is a new row.
REFRESH_PROTOCOLS = {
    "social": RefreshProtocol(social_refresh_request, refreshed_credentials),
    "idc": RefreshProtocol(idc_refresh_request, refreshed_credentials),
    "external_idp": RefreshProtocol(external_idp_refresh_request, refreshed_idp_credentials),
}


def _auth_failure(answer: Any, raw: bytes) -> tuple[str | None, str | None]:
    """The (error code, message) of an auth service's refusal, from its JSON or text."""
    reason = detail = None
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict):  # {"error": {"code": ..., "message": ...}}
            answer, error = error, error.get("code")
        reason = error if isinstance(error, str) else _text(answer, "__type")
        for key in ("error_description", "message", "Message", "errorMessage"):
            if isinstance(answer.get(key), str):
                detail = answer[key]
                break
    else:
        detail = raw.decode("utf-8", "replace")
    if detail:
        detail = " ".join(detail.split())[:200] or None
    return reason, detail


def refusal(request: AuthRequest, base: Credentials, whose: Path, status: int, answer: Any,
            raw: bytes) -> RefreshError:
    """The error for a refusal; permanent when the refresh token itself was refused."""
    reason, detail = _auth_failure(answer, raw)
    permanent = (status in (400, 401) or reason in PERMANENT_REASONS
                 or "invalid refresh token" in (detail or "").lower())
    what = " ".join(filter(None, (f"HTTP {status}", reason)))
    if detail:
        what += f": {detail}"
    for secret in (base.refresh_token, base.client_secret):
        if secret:
            what = what.replace(secret, "***")
    advice = "log in to Kiro again" if permanent else "try again later"
    return RefreshError(f"{request.url} refused to refresh the token of {whose} ({what}); "
                        f"{advice}", status=status, reason=reason, permanent=permanent)


async def post_auth(session: aiohttp.ClientSession, request: AuthRequest, *,
                    proxy: str | None, timeout: float) -> tuple[int, bytes]:
    """POST ``request``: the status and the body; RefreshError if there is no answer."""
    try:
        async with session.post(
            request.url, json=None if request.form else request.body,
            data=request.body if request.form else None, proxy=proxy,
            headers={"Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            return response.status, await response.read()
    except asyncio.TimeoutError:
        raise RefreshError(
            f"{request.url} did not answer within {timeout:g} s; check the network, --proxy "
            f"and {request.option}, then try again") from None
    except (aiohttp.ClientError, ValueError) as exc:
        # NonHttpUrlClientError: aiohttp 3.10+ (ftp://...)
        if isinstance(exc, (aiohttp.InvalidURL,
                            getattr(aiohttp, "NonHttpUrlClientError", aiohttp.InvalidURL))):
            reason = "not a valid http(s) URL"  # the URL or the proxy's
        else:
            reason = getattr(getattr(exc, "os_error", None), "strerror", None) or describe(exc)
        raise RefreshError(
            f"cannot reach {request.url} ({reason}); check the network, --proxy and "
            f"{request.option}") from None


async def _call_auth_service(session: aiohttp.ClientSession, config: Config, base: Credentials,
                             *, whose: Path, timeout: float = REFRESH_TIMEOUT_SECONDS,
                             now: Callable[[], datetime] = utcnow) -> tuple[Credentials, Json]:
    """Exchange ``base``'s refresh token: the new credentials and the token file keys to
    update. ``whose`` names the account in errors."""
    protocol = REFRESH_PROTOCOLS.get(base.auth_method)
    if protocol is None:  # a Kiro API key
        raise RefreshError(f"Kiro refused the API key {whose}; an API key cannot be refreshed: "
                           f"make a new one at app.kiro.dev", permanent=True)
    request = protocol.request(base, config)
    status, raw = await post_auth(session, request, proxy=config.proxy_for(request.url),
                                  timeout=timeout)
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        answer = None
    if status != 200:
        raise refusal(request, base, whose, status, answer, raw)
    try:
        if not isinstance(answer, dict):
            raise ValueError("no JSON")
        return protocol.answer(base, answer, now())
    except ValueError as exc:
        raise RefreshError(f"{request.url} answered HTTP 200 with {exc}; check {request.option}",
                           status=200) from None


# Token store ##############################################################
#
# Strategy of a ``TokenHolder``, the only shared mutable state in kiro2api:
# - ``credentials()`` reads the file first if needed and refreshes when less
#   than REFRESH_MARGIN is left, or when upstream rejected the token and no
#   refresh has replaced it yet.
# - The first caller starts the update as a task; everyone else waits for
#   that task and shares its result or error. The task is shielded, so a
#   client that hangs up cannot cancel a refresh between the auth service
#   rotating the refresh token and the file recording it.
# - Under the file's lock the file is read again (``refresh_base``): a token
#   another program wrote (the Kiro IDE, a CLI ``refresh``, another server) is
#   adopted instead of refreshing, and its refresh token is used otherwise.
# - A refresh token the auth service refused for good is not sent again
#   until the file holds a different one (the user logged in again).
# - When an early refresh (the token expiring, not expired or rejected)
#   fails, the token is used until it expires and the refresh is tried again
#   after ``retry_after`` seconds; ``error`` tells.
# - The auth service may rotate the refresh token, so a refreshed token that
#   cannot be written survives only in memory (and ``error`` says so); with
#   ``must_save`` (the CLI commands, which exit at once) a file that cannot
#   be written is not refreshed at all.

# After a proactive refresh fails while the token still works, how long the
# token is used before the auth service is asked again.
REFRESH_RETRY_SECONDS = 30.0
# Access tokens an account remembers for ``knows``: one per refresh, so about
# ten days of hourly refreshes.
HELD_TOKENS_MAX = 256


class HeldTokens:
    """The access tokens an account has held, oldest first, at most HELD_TOKENS_MAX."""

    def __init__(self) -> None:
        self._tokens: dict[bytes, None] = {}

    def add(self, token: str) -> None:
        held = token.encode("utf-8", "replace")
        self._tokens.pop(held, None)
        self._tokens[held] = None
        while len(self._tokens) > HELD_TOKENS_MAX:
            del self._tokens[next(iter(self._tokens))]

    def __contains__(self, token: str) -> bool:
        return token.encode("utf-8", "replace") in self._tokens

    def knows(self, token: str) -> bool:
        """Whether ``token`` was held, in constant time (``token`` may be a client's guess)."""
        if not token:
            return False
        candidate = token.encode("utf-8", "replace")
        found = False
        for held in self._tokens:
            found |= hmac.compare_digest(candidate, held)
        return found


class Mode(enum.Enum):
    """What an update of a ``TokenHolder`` may do."""

    LOAD = "load"  # read the file if it has not been read; never refresh
    AUTO = "auto"  # refresh if due; when an early refresh fails, keep the token a while
    FORCE = "force"  # refresh, unless the token upstream rejected is replaced already


Exchange = Callable[[Credentials], Awaitable[tuple[Credentials, Json]]]


def refresh_base(current: Credentials, on_disk: Credentials, held: HeldTokens,
                 now: datetime) -> Credentials | None:
    """Which credentials to refresh, given what the file holds now; None when the file
    holds a fresh token another program wrote, to be used as it is."""
    if on_disk.access_token == current.access_token:
        return on_disk
    if on_disk.access_token in held:
        return current  # the file is behind us: an earlier write-back failed
    if not on_disk.expiring(now):
        return None
    return on_disk  # newer than ours, but due too: refresh with its refresh token


class TokenHolder:
    """One account's credentials, refreshed one at a time however many callers ask
    (the strategy is at the top of this section)."""

    def __init__(self, file: TokenFile, exchange: Exchange, *, clock: Clock = SYSTEM_CLOCK,
                 retry_after: float = REFRESH_RETRY_SECONDS, must_save: bool = False) -> None:
        self.file = file
        self.clock = clock
        self.must_save = must_save
        self.current: Credentials | None = None
        self.error: TokenError | None = None  # the last failure, until something succeeds
        self.rejected: str | None = None  # the access token upstream refused
        self.held = HeldTokens()
        self.refreshes = 0  # refresh calls made (for /metrics)
        self.failures = 0  # loads and refreshes that failed (for /metrics)
        self.waiters = 0  # callers waiting for the update in flight
        # With --state: the account's record in the state store, which refreshes
        # go through (see "Shared state").
        self.shared: SharedAccount | None = None
        self._exchange = exchange
        self._retry_after = retry_after
        self._task: asyncio.Task[Credentials] | None = None
        self._dead: tuple[str, RefreshError] | None = None  # (refresh token, its refusal)
        self._retry_at = 0.0  # clock.monotonic() before which a failed refresh is not retried

    async def credentials(self) -> Credentials:
        """The current credentials; reads the file first if needed, refreshes if due."""
        while True:
            current = self.current
            if current is not None and not self.due(current):
                return current
            if self._task is None:
                return await self._run(Mode.AUTO)
            joined = await self._join()  # e.g. a load: check again
            if not self.due(joined):
                return joined

    async def load(self) -> Credentials:
        """Read the token file now if it has not been read yet; never refreshes."""
        return self.current or await self._run(Mode.LOAD)

    async def refresh(self, stale: str | None = None) -> Credentials:
        """Refresh now, e.g. after upstream rejected ``stale``; a token that already
        replaced ``stale`` is returned without refreshing again."""
        if stale is None:
            stale = (self.current or await self.load()).access_token
        elif self.current is not None and self.current.access_token == stale:
            self.rejected = stale
        while True:
            if self._task is None:
                return await self._run(Mode.FORCE, stale)
            joined = await self._join()
            if joined.access_token != stale:
                return joined

    def due(self, current: Credentials) -> bool:
        if current.access_token == self.rejected:
            return True
        now = self.clock.now()
        if not current.expiring(now):
            return False
        if self.shared is not None and not self.shared.fleet.up:
            # No early refresh without the fleet's lock: that is what logs accounts out.
            return current.expired(now)
        # A proactive refresh failed a moment ago but the token still works:
        # use it rather than asking the auth service again at every request.
        return current.expired(now) or self.clock.monotonic() >= self._retry_at

    def adopt(self, credentials: Credentials) -> None:
        self.current = credentials
        self.error = None
        self.held.add(credentials.access_token)

    async def _run(self, mode: Mode, stale: str | None = None) -> Credentials:
        if self._task is None:
            self._task = asyncio.create_task(self._update(mode, stale))
            # Nobody may be left waiting (all callers cancelled): retrieve the
            # outcome so asyncio does not report it as never retrieved.
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await self._join()

    async def _join(self) -> Credentials:
        assert self._task is not None
        self.waiters += 1
        try:
            return await asyncio.shield(self._task)
        finally:
            self.waiters -= 1

    async def _update(self, mode: Mode, stale: str | None) -> Credentials:
        try:
            if self.current is None:
                self.adopt((await self.file.read())[1])
                if self.shared is not None:
                    await self.shared.sync()  # the fleet may hold a newer login
            current = self.current
            assert current is not None
            if (mode is Mode.LOAD or (mode is Mode.AUTO and not self.due(current))
                    or (mode is Mode.FORCE and current.access_token != stale)):
                return current
            try:
                return await self._refresh_under_lock(current)
            except RefreshError as exc:
                if mode is not Mode.AUTO or current.access_token == self.rejected \
                        or current.expired(self.clock.now()):
                    raise
                # Refreshing early failed, but the token is still good for a
                # while: serve with it, and try again in a moment.
                self.error = exc
                self.failures += 1
                self._retry_at = self.clock.monotonic() + self._retry_after
                log.warning("%s; using the current token, valid %s more", exc,
                            human_duration(current.seconds_left(self.clock.now()) or 0))
                return current
        except TokenError as exc:
            self.error = exc
            self.failures += 1
            raise
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    async def _refresh_under_lock(self, current: Credentials) -> Credentials:
        if self.shared is None:
            return await self._refresh_file(current)
        try:
            return await self.shared.refresh(current, self._refresh_file)
        except StateDown:
            if not self.due(current):
                return current  # still valid: it serves until the state store is back
        log.warning("account %s: the state store is away and the token has expired; "
                    "refreshing it without the fleet's lock", self.file.path)
        fresh = await self._refresh_file(current)
        self.shared.refreshed_alone(current.refresh_token, fresh)
        return fresh

    async def _refresh_file(self, current: Credentials,
                            check: Callable[[], Awaitable[None]] | None = None) -> Credentials:
        """Refresh under the token file's lock; ``check`` runs just before the exchange."""
        async with self.file.lock():
            data, on_disk = await self.file.read()
            base = refresh_base(current, on_disk, self.held, self.clock.now())
            if base is None:
                log.info("%s: using the token another program refreshed", self.file.path)
                self.adopt(on_disk)
                return on_disk
            if self._dead is not None and self._dead[0] == base.refresh_token:
                raise self._dead[1]
            if self.must_save:
                await self.file.ensure_writable()
            if check is not None:
                await check()
            try:
                fresh, updates = await self._exchange(base)
            except RefreshError as exc:
                if exc.permanent:
                    self._dead = (base.refresh_token, exc)
                raise
            self.refreshes += 1
            try:
                kept = await self.file.write(data, on_disk, fresh, updates)
            except TokenFileError as exc:
                self.adopt(fresh)
                self.error = exc  # served from memory, and said so in /health
                log.warning("%s", exc)
                return fresh
            if kept is fresh:
                log.info("%s: refreshed (%s login), valid until %s", self.file.path,
                         fresh.auth_method, updates["expiresAt"])
            self.adopt(kept)
            return kept


# Ways to call Kiro ########################################################
#
# Kiro answers each kind of account on some hosts and in some request
# dialects only, and which ones changes (PROTOCOL-2026.md 10.1-10.5). An
# account's ways are every --upstream host with the dialects its kind may use
# there (``ways_for``); its ``KiroView`` remembers the way that worked
# (sticky, the preferred ones tried afresh after STICKY_SECONDS), skips one
# that was refused for a while, and keeps what the service said of the
# account: its profile ARN where it was looked up, its usage limits.

STICKY_SECONDS = 3600.0
WAY_REFUSED_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class Way:
    """One way to call Kiro: a host, a dialect, and which profile ARN to carry."""

    url: str  # the host's URL template, without its #family suffix
    dialect: convert.Dialect
    arn: str  # convert.OWN_ARN, SERVICE_ARN or NO_ARN

    def __str__(self) -> str:
        return f"{self.url} ({self.dialect.name})"


def way_names(way: Way) -> list[str]:
    return [way.url, way.dialect.name, way.arn]


def named_way(url: str, dialect: str, arn: str) -> Way | None:
    """The ``Way`` that ``way_names`` gave these names, if this version knows the dialect."""
    known = convert.DIALECTS.get(dialect)
    return Way(url, known, arn) if known else None


def ways_for(kind: str, upstreams: tuple[str, ...]) -> tuple[Way, ...]:
    """Every way to try for an account of ``kind``, in order (PROTOCOL-2026.md 10.5)."""
    ways = []
    for upstream in upstreams:
        family = convert.host_family(upstream)
        url = upstream.partition("#")[0].rstrip("/")
        ways += [Way(url, dialect, arn)
                 for dialect, arn in convert.ATTEMPTS.get((family, kind), ())]
    return tuple(ways)


class KiroView:
    """What Kiro has shown of one account: the way that works, the ways it refused,
    the profile ARN it listed, and the usage limits it gave (with when)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.ways: tuple[Way, ...] = ()
        self.profile_arn: str | None = None  # looked up with ListAvailableProfiles
        self.rejected_arn: str | None = None  # the file's, when Kiro called it invalid
        self.profile_problem = ""  # what the last ListAvailableProfiles that failed said
        self.usage: convert.UsageLimits | None = None
        self.usage_read_at = -math.inf  # clock.monotonic()
        # Why the last read of the usage limits failed (None: it did not), and when
        # it was tried: a failure is not asked again for USAGE_FRESH_SECONDS either.
        self.usage_failure: str | None = None
        self.usage_tried_at = -math.inf
        self._sticky: Way | None = None
        self._sticky_until = 0.0
        self._refused: dict[Way, tuple[float, str]] = {}  # way -> (until, why)
        self.on_change: Callable[[], None] = lambda: None  # the fleet hears of it

    def order(self, ways: tuple[Way, ...]) -> list[Way]:
        """``ways`` to try now: the one that worked, the others, then those refused."""
        if ways != self.ways:  # the account's kind became known, or changed with a login
            self.ways = ways
            self._refused = {w: r for w, r in self._refused.items() if w in ways}
            if self._sticky not in ways:
                self._sticky = None
        now = self.clock.monotonic()
        sticky = self._sticky if now < self._sticky_until else None
        resting = [w for w in ways if w != sticky and self._refused.get(w, (0.0,))[0] > now]
        usable = [w for w in ways if w not in resting]
        usable.sort(key=lambda w: w != sticky)  # stable: the others keep their order
        return usable + resting

    def worked(self, way: Way) -> None:
        was_refused = self._refused.pop(way, None) is not None
        news = self._sticky != way or was_refused
        if self._sticky != way:
            log.info("Kiro answers this account at %s", way)
        self._sticky, self._sticky_until = way, self.clock.monotonic() + STICKY_SECONDS
        if news:
            self.on_change()

    def refused(self, way: Way, why: str) -> None:
        self._refused[way] = (self.clock.monotonic() + WAY_REFUSED_SECONDS, why)
        if self._sticky == way:
            self._sticky = None
        self.on_change()

    def remember_usage(self, usage: convert.UsageLimits) -> convert.UsageLimits:
        self.usage, self.usage_read_at = usage, self.clock.monotonic()
        self.usage_failure = None
        self.on_change()
        return usage

    def usage_due(self) -> bool:
        """Whether the usage limits are to be read (again): neither read nor tried
        within USAGE_FRESH_SECONDS."""
        last = max(self.usage_read_at, self.usage_tried_at)
        return self.clock.monotonic() - last > USAGE_FRESH_SECONDS

    def usage_read_wall(self) -> float | None:
        """When the usage limits held were read, in epoch seconds."""
        if self.usage is None:
            return None
        return self.clock.now().timestamp() - (self.clock.monotonic() - self.usage_read_at)

    def shared(self, wall: Callable[[float], float]) -> Json:
        """What the fleet shares of this view, its times turned by ``wall`` into epoch
        seconds: the way that works, the ways refused, the usage limits."""
        now = self.clock.monotonic()
        sticky = self._sticky if self._sticky_until > now else None
        return {
            "sticky": sticky and [*way_names(sticky), wall(self._sticky_until)],
            "refused": [[*way_names(w), wall(until), why]
                        for w, (until, why) in self._refused.items() if until > now],
            "usage": self.usage and [dataclasses.asdict(self.usage), wall(self.usage_read_at)],
        }

    def absorb(self, shared: Json, monotonic: Callable[[float], float]) -> None:
        """Take what another replica shared (``shared``'s form), where it is newer;
        ``monotonic`` turns its epoch seconds into this clock's."""
        if shared.get("sticky"):
            *names, until = shared["sticky"]
            way, until = named_way(*names), monotonic(until)
            if way is not None and until > self._sticky_until:
                self._sticky, self._sticky_until = way, until
        for *names, until, why in shared.get("refused") or ():
            way, until = named_way(*names), monotonic(until)
            if way is not None and until > self._refused.get(way, (0.0,))[0]:
                self._refused[way] = (until, why)
                if self._sticky == way:
                    self._sticky = None
        if shared.get("usage"):
            fields, read_at = shared["usage"]
            if monotonic(read_at) > self.usage_read_at:
                self.usage = convert.UsageLimits.from_fields(fields)
                self.usage_read_at = monotonic(read_at)
                self.usage_failure = None

    def health(self) -> Json:
        way, now = self._sticky, self.clock.monotonic()
        return {"host": way.url if way else None, "shape": way.dialect.name if way else None,
                "refused": {str(w): why for w, (until, why) in self._refused.items()
                            if until > now}}


# Account pool #############################################################

# With no client key, an unknown token sends an account to its file, in case
# the Kiro IDE or ``kiro2api refresh`` wrote a new one: at most this often.
REREAD_SECONDS = 1.0


class TokenStore:
    """One account of the pool: its token holder, and what the pool reads of it.

    ``credentials()``, ``load()`` and ``refresh()`` are its ``TokenHolder``'s;
    the rest is the account's own: the machine id Kiro's user agent names, the
    cooldown the pool sets (``set_aside``), the counters of ``/metrics``, the
    ``/health`` view, and the client-key registry (``knows``, ``reread``).
    One store per token file lives on the application, in ``app[ACCOUNTS]``.
    """

    def __init__(self, path: Path, *, config: Config, session: aiohttp.ClientSession,
                 timeout: float = REFRESH_TIMEOUT_SECONDS,
                 lock_timeout: float = LOCK_TIMEOUT_SECONDS,
                 retry_after: float = REFRESH_RETRY_SECONDS,
                 must_save: bool = False, clock: Clock | None = None,
                 source: TokenFile | None = None) -> None:
        self.clock = clock or config.clock
        self.file = source or token_source(path, clock=self.clock, lock_timeout=lock_timeout)
        self.path = self.file.path
        exchange = functools.partial(_call_auth_service, session, config, whose=self.path,
                                     timeout=timeout, now=self.clock.now)
        self.holder = TokenHolder(self.file, exchange, clock=self.clock,
                                  retry_after=retry_after, must_save=must_save)
        # Kiro's user agent names a machine; ours is the account's file, so one
        # account is one machine however it is called.
        self.machine_id = hashlib.sha256(f"kiro2api:{self.file.identity}".encode()).hexdigest()
        # Set by the pool when upstream throttles or refuses this account: a
        # clock.monotonic() before which others are tried first.
        self.cooldown_until = 0.0
        self.cooldown_reason: str | None = None
        self.cooldown_state: str | None = None  # "suspended", "exhausted": Kiro's word
        self.kiro = KiroView(self.clock)
        self.credits = 0.0  # Kiro credits its answers were billed (meteringEvent)
        # The read of the usage limits under way (fresh_usage), which callers share.
        self.usage_task: asyncio.Task | None = None
        self.kiro.on_change = self.changed
        # Who else serves the account and hears what this process learns of its
        # health: the fleet (--state) or the other workers (--workers); None: nobody.
        self.peers: SharedAccount | HubAccount | None = None
        self._reread_at = 0.0  # clock.monotonic() before which reread() does not read again
        # The file's stamp (TokenFile.stamp) when the server last looked at it
        # for a change (watch_token_files).
        self.seen_stamp: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"<TokenStore {self.path}>"

    @property
    def region(self) -> str | None:
        return self.holder.current.region if self.holder.current else None

    @property
    def profile_arn(self) -> str | None:
        return self.holder.current.profile_arn if self.holder.current else None

    @property
    def error(self) -> TokenError | None:
        """The last load or refresh failure, until something succeeds again."""
        return self.holder.error

    @property
    def refreshes(self) -> int:
        return self.holder.refreshes

    @property
    def failures(self) -> int:
        return self.holder.failures

    @property
    def lock_path(self) -> Path:
        return self.file.lock_path

    async def credentials(self) -> Credentials:
        """The current credentials; reads the file first if needed, refreshes if due."""
        return await self.holder.credentials()

    async def load(self) -> Credentials:
        """Read the token file now if it has not been read yet; never refreshes."""
        return await self.holder.load()

    async def refresh(self, *, stale_access_token: str | None = None) -> Credentials:
        """Refresh now, e.g. after upstream rejected ``stale_access_token``."""
        return await self.holder.refresh(stale_access_token)

    async def reread(self) -> None:
        """Adopt a token another program wrote to the file since (the Kiro IDE, a
        CLI ``refresh``), so a client can present it at once. Reads at most once
        every REREAD_SECONDS, however often it is asked (strangers ask too)."""
        now = self.clock.monotonic()
        if now < self._reread_at:
            return
        self._reread_at = now + REREAD_SECONDS
        try:
            _, on_disk = await self.file.read()
        except TokenError:
            return  # the next credentials() call reports it
        # Only a token new to us: one held before is older than ours (a
        # write-back of ours failed), and its refresh token may be spent.
        if not self.knows(on_disk.access_token) and not on_disk.expired(self.clock.now()):
            self.holder.adopt(on_disk)
            log.info("%s: using the new token another program wrote", self.path)

    async def file_changed(self) -> None:
        """The token file appeared or was written (``watch_token_files``): read it now
        rather than at the next request, so that clients and ``/health`` see it."""
        if self.holder.current is not None:
            self._reread_at = 0.0
            await self.reread()
            return
        await self.read_first()

    async def read_first(self, note: str = "") -> None:
        """Read the file for the first time and say what it holds (or, with ``note``,
        why it cannot be read)."""
        try:
            credentials = await self.load()
        except TokenError as exc:
            log.warning("%s%s", exc, note)
            return
        log_account(self, credentials)

    def knows(self, token: str) -> bool:
        """Whether ``token`` is an access token this account has held (constant time)."""
        return self.holder.held.knows(token)

    def changed(self) -> None:
        """Something Kiro showed of the account changed: the fleet or the other
        workers hear it."""
        if self.peers is not None:
            self.peers.share_health()

    def health(self) -> Json:
        """The account's state for ``/health``; never a token."""
        current, error = self.holder.current, self.holder.error
        now = self.clock.now()
        left = current.seconds_left(now) if current else None
        if error is not None:
            state = "error"
        elif current is None:
            state = "unknown"  # not read yet
        elif current.access_token == self.holder.rejected or (left is not None and left <= 0):
            state = "expired"
        elif current.expiring(now):
            state = "expiring"
        else:
            state = "ok"
        resting = self.cooldown_until - self.clock.monotonic()
        if resting > 0 and self.cooldown_state:
            state = self.cooldown_state
        return {
            "path": str(self.path),
            "kind": current.kind if current else None,
            "auth_method": current.auth_method if current else None,
            "provider": current.provider if current else None,
            "region": current.region if current else None,
            "expires_at": format_expires_at(current.expires_at)
            if current and current.expires_at else None,
            "seconds_left": None if left is None else int(left),
            "state": state,
            "error": str(error) if error else None,
            "refreshes": self.refreshes,
            "credits": round(self.credits, 6),
            "cooldown_seconds": max(0, round(resting)),
            "cooldown_reason": self.cooldown_reason if resting > 0 else None,
            **self.kiro.health(),
        }


def accounts(config: Config, session: aiohttp.ClientSession, **options: Any) -> list[TokenStore]:
    """One account per ``--token-file``, then one per ``--kiro-api-key``."""
    stores = [TokenStore(path, config=config, session=session, **options)
              for path in config.token_files]
    region = config.region or DEFAULT_REGION
    stores += [TokenStore(Path(f"kiro-api-key-{n}"), config=config, session=session,
                          source=KiroApiKey(key, n, region=region), **options)
               for n, key in enumerate(config.kiro_api_keys, 1)]
    return stores


def log_account(store: TokenStore, credentials: Credentials) -> None:
    left = credentials.seconds_left(store.clock.now())
    log.info("account %s: %s login, region %s, %s", store.path, credentials.auth_method,
             credentials.region, "expiry unknown" if left is None
             else f"expires in {human_duration(left)}" if left > 0 else "expired")


async def load_accounts_ctx(app: web.Application) -> AsyncIterator[None]:
    """Read every token file at startup (no refresh): ``/health`` then knows the
    accounts, and a missing or broken file is reported at once, not at the first
    request. The server starts either way, and reads a file again when it
    changes (``watch_token_files``) or a request needs it."""
    for store in app[ACCOUNTS]:
        store.seen_stamp = await asyncio.to_thread(store.file.stamp)
        await store.read_first(" (kiro2api reads it again as soon as it changes)")
    yield


WATCHER_TASK = "kiro2api token file watcher"  # the task's name


async def watch_token_files(stores: list[TokenStore], interval: float) -> None:
    """Every ``interval`` seconds, look whether a token file appeared or changed (the
    first login after the server started, the Kiro IDE's refresh, a new login),
    and if so read it: a stat per file, in a thread, and a read only on a change."""
    while True:
        await asyncio.sleep(interval)
        stamps = await asyncio.to_thread(lambda: [store.file.stamp() for store in stores])
        for store, stamp in zip(stores, stamps):
            if stamp == store.seen_stamp:
                continue
            store.seen_stamp = stamp
            if stamp is None:
                continue  # removed: the token held serves on
            try:
                await store.file_changed()
            except Exception:  # a bug of ours: say so, and keep watching the others
                log.exception("reading %s again after it changed", store.path)


async def watch_token_files_ctx(app: web.Application) -> AsyncIterator[None]:
    """Watch the token files from startup until the server stops."""
    watcher = asyncio.create_task(
        watch_token_files(app[ACCOUNTS], app[CONFIG].watch_interval), name=WATCHER_TASK)
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


# Shared state #############################################################
#
# With --state URL, the replicas of a fleet keep what they must agree on in
# Redis (DESIGN.md "Beyond one machine"); without it, nothing here runs. An
# account is known by an id: the digest of the first refresh token (or Kiro
# API key) the fleet saw for it. Its keys:
#
#   kiro2api:alias:<digest>   the id that a refresh token, old or new, leads to
#   kiro2api:login:<id>       hash: epoch, version, login (the token file keys, JSON)
#   kiro2api:fence:<id>       the counter that refresh locks take fences from
#   kiro2api:lock:<id>        the fleet's refresh lock: a fence, with a time-to-live
#   kiro2api:health:<id>      hash: cooldown, kiro (what Kiro showed), JSON
#   kiro2api:usage:<id>       held for a minute by the replica reading usage limits
#   channel kiro2api:changes  "<id> login" or "<id> health" after each write
#
# The request path reads none of it: a replica holds the credentials in
# memory, hears of changes on the channel, and looks again every
# STATE_RESYNC_SECONDS. A refresh takes the lock, takes a login another
# replica stored meanwhile instead of refreshing, else refreshes from the
# stored refresh token and stores the result only while its fence still
# holds the lock (STORE_LOGIN). While Redis is away, a replica serves with
# what it holds, refreshes only a token that has expired, and hands that
# login over when Redis is back (or takes the fleet's, if one is newer).

STATE_CHANNEL = "kiro2api:changes"
STATE_SCHEMES = ("redis", "rediss", "unix")
STATE_PACKAGE_MISSING = ("--state needs the redis package: pip install 'kiro2api[redis]' "
                         "(or: pip install redis)")
STATE_TIMEOUT_SECONDS = 3.0  # one Redis call, before the state store counts as away
STATE_POLL_SECONDS = 0.1  # how often a replica waiting for another's refresh looks
STATE_RESYNC_SECONDS = 30.0  # how often each account's record is read anyway
STATE_BACKOFF_SECONDS = (0.5, 10.0)  # reconnecting: the first wait, the longest
ALIAS_SECONDS = 90 * 86400  # how long an old refresh token still leads to its account
HEALTH_SECONDS = 30 * 86400

# KEYS: login, lock, alias of the new refresh token. ARGV: the fence, the
# login, the account id, the alias's lifetime, the channel, the refresh token
# the login was refreshed with, and an epoch for a record made anew. A fence
# must still hold the lock; with no fence (a login refreshed while Redis was
# away, or the first of the account), only the login whose refresh token it
# was refreshed with is replaced. Answers {version, epoch}: versions count
# within an epoch, which starts again when Redis lost the record. -1 if the
# fence lost the lock, -2 if the fleet moved on meanwhile.
STORE_LOGIN = """
if ARGV[1] ~= '' then
  if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
else
  local stored = redis.call('HGET', KEYS[1], 'login')
  if stored and cjson.decode(stored)['refreshToken'] ~= ARGV[6] then return -2 end
end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[7])
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'login', ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[3] .. ' login')
return {version, redis.call('HGET', KEYS[1], 'epoch')}
"""
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class StateDown(Exception):
    """The state store did not answer; the caller goes on as without ``--state``."""


def state_location(url: str) -> str:
    """The state store's URL without its user and password, for logs and ``/health``."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def state_digest(secret: str) -> str:
    return hashlib.sha256(f"kiro2api:{secret}".encode()).hexdigest()[:32]


def login_of(credentials: Credentials) -> Json:
    """What the fleet stores of a login: the keys a refresh changes."""
    return {"accessToken": credentials.access_token, "refreshToken": credentials.refresh_token,
            "expiresAt": credentials.expires_at and format_expires_at(credentials.expires_at),
            "profileArn": credentials.profile_arn}


def with_login(base: Credentials, login: Json) -> Credentials:
    return dataclasses.replace(
        base, access_token=login["accessToken"], refresh_token=login["refreshToken"],
        expires_at=parse_expires_at(login.get("expiresAt")),
        profile_arn=login.get("profileArn") or base.profile_arn)


class Fleet:
    """This replica's link to the state store: the Redis client, whether it answers
    (``up``, said once per change, failures counted), and the accounts it shares."""

    def __init__(self, config: Config) -> None:
        try:
            import redis.asyncio
            import redis.exceptions
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:
            raise click.ClickException(STATE_PACKAGE_MISSING) from None
        assert config.state
        self.config = config
        self.where = state_location(config.state)
        # One quick retry (a pooled connection Redis closed), then StateDown.
        self.client = redis.asyncio.from_url(
            config.state, decode_responses=True, socket_timeout=STATE_TIMEOUT_SECONDS,
            socket_connect_timeout=STATE_TIMEOUT_SECONDS, retry=Retry(NoBackoff(), 1))
        self._failures = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)
        self.up = False
        self.problem: str | None = "not connected yet"
        self.errors = 0  # failed calls (for /metrics)
        self.accounts: list[SharedAccount] = []
        self._told = False  # whether being away was logged
        # Set at shutdown: redis-py's timed reads may swallow a cancellation.
        self.stopping = False
        self._background: set[asyncio.Task[Any]] = set()

    async def call(self, use: Callable[[Any], Awaitable[Any]]) -> Any:
        """``use(client)``'s answer; ``StateDown`` when Redis is away or fails now."""
        if not self.up:
            raise StateDown(self.problem)
        try:
            return await use(self.client)
        except self._failures as exc:
            self.lost(exc)
            raise StateDown(self.problem) from None

    def lost(self, exc: BaseException) -> None:
        self.errors += 1
        self.problem = describe(exc)
        if self.up or not self._told:
            log.warning("state store %s is unreachable (%s): serving with the tokens held, "
                        "reconnecting", self.where, self.problem)
        self.up, self._told = False, True

    async def connect(self) -> bool:
        """Try Redis now; on success, bring every account up to date with the fleet."""
        try:
            await self.client.ping()
        except self._failures as exc:
            self.lost(exc)
            return False
        if not self.up:
            log.info("state store %s: connected", self.where)
        self.up, self.problem, self._told = True, None, False
        for account in self.accounts:
            await account.sync()
        return self.up

    async def watch(self) -> None:
        """Hear the other replicas' changes; reconnect with backoff while Redis is away."""
        delay = STATE_BACKOFF_SECONDS[0]
        while not self.stopping:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(STATE_CHANNEL)
                    if await self.connect():
                        delay = STATE_BACKOFF_SECONDS[0]
                        await self._listen(pubsub)
            except self._failures as exc:
                self.lost(exc)
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, STATE_BACKOFF_SECONDS[1])

    async def _listen(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        resync_at = loop.time() + STATE_RESYNC_SECONDS
        while self.up and not self.stopping:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and message.get("type") == "message":
                account_id, _, what = str(message["data"]).partition(" ")
                for account in self.accounts:
                    if account.id == account_id:
                        self.spawn(account.pull_login() if what == "login"
                                   else account.pull_health())
            if loop.time() >= resync_at:  # a message lost in a reconnect, say
                resync_at = loop.time() + STATE_RESYNC_SECONDS
                await self.client.ping()
                for account in self.accounts:
                    await account.sync()

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run ``work`` in the background (a write, a read a message asked for)."""
        async def quietly() -> None:
            with contextlib.suppress(StateDown):
                await work
        task = asyncio.create_task(quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.client.aclose()

    def health(self) -> Json:
        return {"location": self.where, "status": "ok" if self.up else "degraded",
                "problem": self.problem, "errors": self.errors}


class SharedAccount:
    """One account's record in the state store, as this replica uses it: the login
    it holds (``version``), the fleet's refresh lock, and the account's health."""

    def __init__(self, fleet: Fleet, store: TokenStore) -> None:
        self.fleet = fleet
        self.store = store
        self.id: str | None = None  # known once the account's file was read with Redis up
        # The record's epoch and version of the login held; None: the file's own.
        self.epoch: str | None = None
        self.version = 0
        # A login refreshed while Redis was away, and the refresh token it replaced.
        self.alone: Credentials | None = None
        self.alone_from: str | None = None
        # Health pushes one at a time, each with the state of its own moment: two
        # in flight on two connections could land in either order, the older last.
        self._pushing = asyncio.Lock()

    def key(self, what: str) -> str:
        return f"kiro2api:{what}:{self.id}"

    async def sync(self) -> None:
        """Catch up with the fleet: find the account's id, hand over a login refreshed
        alone, take the newest stored login and health. Quiet when Redis is away."""
        with contextlib.suppress(StateDown):
            if await self.resolve():
                await self.hand_over()
                current = self.store.holder.current
                if not await self.pull_login() and current is not None \
                        and current.auth_method != "api_key":  # a key is not stored
                    await self.store_login(current, "", current.refresh_token)  # the first
                await self.pull_health()

    async def resolve(self) -> bool:
        """Find the account's id from the refresh token held (False: none read yet)."""
        current = self.store.holder.current
        if self.id is not None or current is None:
            return self.id is not None
        digest = state_digest(self.alone_from or current.refresh_token
                              or current.access_token)
        alias = f"kiro2api:alias:{digest}"

        async def find(r: Any) -> str:
            await r.set(alias, digest, nx=True, ex=ALIAS_SECONDS)
            return await r.get(alias) or digest
        self.id = await self.fleet.call(find)
        return True

    async def pull_login(self) -> bool:
        """Take the stored login if it is newer than the one held (and write it back
        to the token file, so that this replica can start without Redis). False when
        the fleet has no login for the account.

        Newer: any stored login for a replica that holds its file's own; a higher
        version in the same epoch; a later expiry when Redis lost the record and a
        replica made it anew (a new epoch)."""
        version, login, epoch = await self.fleet.call(
            lambda r: r.hmget(self.key("login"), "version", "login", "epoch"))
        current = self.store.holder.current
        if not login or current is None:
            return bool(login)
        stored, version = with_login(current, json.loads(login)), int(version or 0)
        if stored.access_token == current.access_token or self.epoch is None:
            newer = stored.access_token != current.access_token
        elif epoch == self.epoch:
            newer = version > self.version
        else:
            newer = bool(stored.expires_at and current.expires_at
                         and stored.expires_at > current.expires_at)
        if newer:
            await write_back(self.store.file, stored)  # the file is never behind memory
        if newer or stored.access_token == current.access_token:
            # Together, with no await between: a pull running meanwhile must not
            # see the version as taken before the login is.
            self.epoch, self.version = epoch, version
        if newer:
            self.store.holder.adopt(stored)
            log.info("account %s: took the login the fleet stored (version %d)",
                     self.store.path, version)
        return True

    async def refresh(self, current: Credentials,
                      refresh_file: Callable[..., Awaitable[Credentials]]) -> Credentials:
        """Refresh under the fleet's lock, or take the login another replica stored
        meanwhile. ``StateDown`` when Redis is away before the exchange."""
        if not await self.resolve():
            raise StateDown("account not read")
        fence = await self.acquire(current)
        holder = self.store.holder
        try:
            if fence is None:
                assert holder.current is not None
                return holder.current  # another replica refreshed while this one waited
            await self.pull_login()
            latest = holder.current or current
            if latest.access_token != current.access_token and not holder.due(latest):
                return latest

            async def still_held() -> None:
                if await self.fleet.call(lambda r: r.get(self.key("lock"))) != fence:
                    raise TokenLockError(
                        f"the fleet's refresh lock of {self.store.path} ran out before the "
                        f"refresh (--state-lock-seconds); not refreshing")
            fresh = await refresh_file(latest, still_held)
            await self.store_login(fresh, fence, latest.refresh_token)
            if self.alone is None and isinstance(holder.error, TokenFileError):
                holder.error = None  # a file it cannot write: the fleet keeps the login
            return fresh
        finally:
            if fence is not None:
                self.fleet.spawn(self.fleet.call(
                    lambda r: r.eval(RELEASE_LOCK, 1, self.key("lock"), fence)))

    async def acquire(self, current: Credentials) -> str | None:
        """Take the account's refresh lock: its fence, or None when, while waiting,
        another replica stored a login that serves."""
        config, holder = self.fleet.config, self.store.holder
        loop = asyncio.get_running_loop()  # a real wait, whatever the account's clock
        fence = str(await self.fleet.call(lambda r: r.incr(self.key("fence"))))
        deadline = loop.time() + 2 * config.state_lock_seconds
        ttl = int(config.state_lock_seconds * 1000)
        while not await self.fleet.call(
                lambda r: r.set(self.key("lock"), fence, nx=True, px=ttl)):
            await self.pull_login()
            held = holder.current
            if held is not None and held.access_token != current.access_token \
                    and not holder.due(held):
                return None
            if loop.time() >= deadline:
                raise TokenLockError(
                    f"another replica held the refresh lock of {self.store.path} for "
                    f"{2 * config.state_lock_seconds:g} s; check the other replicas' logs")
            await asyncio.sleep(STATE_POLL_SECONDS)
        return fence

    async def store_login(self, fresh: Credentials, fence: str, spent: str) -> None:
        """Store a login refreshed with the refresh token ``spent`` (STORE_LOGIN); one
        that cannot be stored now (Redis away) is handed over when Redis is back."""
        alias = f"kiro2api:alias:{state_digest(fresh.refresh_token)}"
        try:
            stored = await self.fleet.call(lambda r: r.eval(
                STORE_LOGIN, 3, self.key("login"), self.key("lock"), alias, fence,
                json.dumps(login_of(fresh)), self.id, ALIAS_SECONDS, STATE_CHANNEL, spent,
                random_uuid()))
        except StateDown:
            self.refreshed_alone(spent, fresh)
            return
        self.alone = self.alone_from = None
        if isinstance(stored, list):
            self.version, self.epoch = int(stored[0]), stored[1]
        else:
            log.warning("account %s: the fleet stored another login during this refresh; "
                        "taking the newest", self.store.path)
            await self.pull_login()

    def refreshed_alone(self, spent: str, fresh: Credentials) -> None:
        self.alone = fresh
        self.alone_from = self.alone_from or spent  # the one the fleet may still hold

    async def hand_over(self) -> None:
        """Store the login refreshed while Redis was away, unless the fleet moved on
        from the refresh token it replaced (``pull_login`` then takes the fleet's)."""
        if self.alone is not None and self.alone_from is not None:
            log.info("account %s: handing the login refreshed alone to the fleet",
                     self.store.path)
            await self.store_login(self.alone, "", self.alone_from)

    def share_health(self) -> None:
        """Tell the fleet what this replica learnt of the account (in the background)."""
        if self.id is not None and self.fleet.up:
            self.fleet.spawn(self._push_health())

    async def _push_health(self) -> None:
        async with self._pushing:
            await self._push_health_now()

    async def _push_health_now(self) -> None:
        record = health_record(self.store)

        async def push(r: Any) -> None:
            async with r.pipeline(transaction=True) as pipe:
                pipe.hset(self.key("health"), mapping=record)
                pipe.expire(self.key("health"), int(HEALTH_SECONDS))
                pipe.publish(STATE_CHANNEL, f"{self.id} health")
                await pipe.execute()
        await self.fleet.call(push)

    async def pull_health(self) -> None:
        """Take what other replicas learnt of the account, where it is newer."""
        absorb_health(self.store, await self.fleet.call(
            lambda r: r.hgetall(self.key("health"))))

    async def claim_usage(self) -> bool:
        """Whether this replica reads the usage limits now: one replica a minute does."""
        if self.id is None:
            return True
        try:
            return bool(await self.fleet.call(lambda r: r.set(
                self.key("usage"), "1", nx=True, ex=int(USAGE_FRESH_SECONDS))))
        except StateDown:
            return True


def health_record(store: TokenStore) -> dict[str, str]:
    """What other replicas or workers learn of the account: its cooldown and what
    Kiro showed (``KiroView.shared``), times in epoch seconds, each part as JSON."""
    offset = store.clock.now().timestamp() - store.clock.monotonic()

    def wall(moment: float) -> float:
        return round(moment + offset, 3)
    return {"cooldown": json.dumps([wall(store.cooldown_until), store.cooldown_reason,
                                    store.cooldown_state]),
            "kiro": json.dumps(store.kiro.shared(wall))}


def absorb_health(store: TokenStore, record: dict[str, str]) -> None:
    """Take another replica's or worker's ``health_record``, where it is newer."""
    offset = store.clock.monotonic() - store.clock.now().timestamp()

    def monotonic(moment: float) -> float:
        return moment + offset
    if record.get("cooldown"):
        until, reason, state = json.loads(record["cooldown"])
        if monotonic(until) > store.cooldown_until + 1.0:
            store.cooldown_until = monotonic(until)
            store.cooldown_reason, store.cooldown_state = reason, state
            log.info("account %s set aside by another replica or worker for %s: %s", store.path,
                     human_duration(monotonic(until) - store.clock.monotonic()), reason)
    if record.get("kiro"):
        store.kiro.absorb(json.loads(record["kiro"]), monotonic)


async def write_back(file: TokenFile, fresh: Credentials) -> None:
    """Write a login the fleet stored to this replica's own token file, if it can."""
    try:
        async with file.lock():
            data, on_disk = await file.read()
            if on_disk.access_token != fresh.access_token:
                await file.write(data, on_disk, fresh, login_of(fresh))
    except TokenError as exc:
        log.info("%s", exc)


async def shared_state_ctx(app: web.Application) -> AsyncIterator[None]:
    """With --state: share every account with the fleet, catch up with it, and hear
    its changes until the server stops."""
    config = app[CONFIG]
    if not config.state:
        yield
        return
    fleet = app[FLEET] = Fleet(config)
    for store in app[ACCOUNTS]:
        store.holder.shared = store.peers = SharedAccount(fleet, store)
        fleet.accounts.append(store.holder.shared)
    await fleet.connect()
    watcher = asyncio.create_task(fleet.watch())
    yield
    fleet.stopping = True
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await fleet.close()


# Workers: the link to the supervisor ########################################
#
# With --workers N the server is N worker processes on one port (SO_REUSEPORT),
# started and watched by a supervisor that serves no HTTP (``supervise``). The
# workers coordinate refreshes through the token file's lock, as any processes
# sharing a file do. What they must agree on beyond the file goes through the
# supervisor's hub, one JSON object a line on a Unix socket, unless --state
# shares it through Redis as for replicas: the accounts' health (cooldowns,
# the way that works, usage limits: ``health_record``), and who reads the usage
# limits this minute. The counts behind /metrics, /health and the status page
# always go through the hub: whichever worker answers gathers the others'
# tallies and adds them to its own (``server_tally``), so that the answer
# describes the whole server.
#
# Worker to hub: {"op": "hello", "worker": K}, {"op": "ready"} once listening,
# {"op": "health", "account": PATH, "record": {...}}, {"op": "tally", "tally":
# {...}} (when asked, every HUB_TALLY_SECONDS, and at exit), and questions with
# an "ask" number: "claim" (key, seconds), "record" (account), "gather" (with
# the asker's own tally). Hub to worker: {"answer": N, "value": ...}, another
# worker's "health", and {"op": "tally"}.

HUB_GATHER_SECONDS = 1.0  # how long a worker's tally is waited for
# How often each worker tells the hub its tally anyway: what a worker killed
# outright had counted since is lost to the server's counters.
HUB_TALLY_SECONDS = 5.0


class HubLink:
    """A worker's connection to the supervisor's hub."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._asked = itertools.count(1)
        self._answers: dict[int, asyncio.Future[Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.closing = False

    async def connect(self, path: str) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(path, limit=2 ** 24)
        self.send({"op": "hello", "worker": self.app[CONFIG].worker})
        self._tasks = [asyncio.create_task(self._listen(), name="kiro2api hub link"),
                       asyncio.create_task(self._tell_tallies(), name="kiro2api tallies")]

    def send(self, message: Json) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def ask(self, message: Json, default: Any) -> Any:
        """The hub's answer to ``message``, or ``default`` if it gives none in time."""
        number = next(self._asked)
        answer = self._answers[number] = asyncio.get_running_loop().create_future()
        self.send({**message, "ask": number})
        try:
            # The hub's own wait for the others' tallies, and a second for the rest.
            return await asyncio.wait_for(answer, HUB_GATHER_SECONDS + 1.0)
        except asyncio.TimeoutError:
            return default
        finally:
            del self._answers[number]

    async def gather(self, own: Json) -> Json:
        """The other workers' tallies (and those of workers gone: ``tallies``), and how
        many workers run and were started again; telling the hub this worker's own
        (``own``) on the way."""
        return await self.ask({"op": "gather", "tally": own},
                              {"tallies": [], "workers": None, "restarts": None})

    def tell_tally(self) -> None:
        self.send({"op": "tally", "tally": Tally.of(self.app).state()})

    async def _tell_tallies(self) -> None:
        while True:
            await asyncio.sleep(HUB_TALLY_SECONDS)
            self.tell_tally()

    async def _listen(self) -> None:
        try:
            await self._take_messages()
        except (OSError, ValueError) as exc:
            log.error("the link to the supervisor broke: %s", describe(exc))
        if not self.closing:  # the supervisor is gone: so is this worker
            log.error("the supervisor went away; shutting down")
            os.kill(os.getpid(), signal.SIGTERM)

    async def _take_messages(self) -> None:
        assert self.reader is not None
        while line := await self.reader.readline():
            message = json.loads(line)
            if "answer" in message:
                answer = self._answers.get(message["answer"])
                if answer is not None and not answer.done():
                    answer.set_result(message["value"])
            elif message["op"] == "tally":
                self.tell_tally()
            elif message["op"] == "health":
                for store in self.app[ACCOUNTS]:
                    if str(store.path) == message["account"]:
                        absorb_health(store, message["record"])

    async def close(self) -> None:
        """Say this worker's last tally, then hang up."""
        self.closing = True
        self.tell_tally()
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


HUB = web.AppKey("hub", HubLink)  # in a worker of --workers only


class HubAccount:
    """One account as the workers share it through the hub (``SharedAccount``'s
    health methods, without Redis)."""

    def __init__(self, link: HubLink, store: TokenStore) -> None:
        self.link, self.store = link, store

    def share_health(self) -> None:
        self.link.send({"op": "health", "account": str(self.store.path),
                        "record": health_record(self.store)})

    async def pull_health(self) -> None:
        record = await self.link.ask({"op": "record", "account": str(self.store.path)}, None)
        if record:
            absorb_health(self.store, record)

    async def claim_usage(self) -> bool:
        """Whether this worker reads the usage limits now: one worker a minute does."""
        return await self.link.ask({"op": "claim", "key": f"usage {self.store.path}",
                                    "seconds": USAGE_FRESH_SECONDS}, True)


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    """In a worker of --workers: join the hub; accounts not shared through --state
    share their health through it."""
    config = app[CONFIG]
    if not config.hub:
        yield
        return
    link = app[HUB] = HubLink(app)
    await link.connect(config.hub)
    for store in app[ACCOUNTS]:
        if store.peers is None:
            store.peers = HubAccount(link, store)
    yield
    await link.close()


async def server_tally(app: web.Application) -> Tally:
    """The whole server's counts: this process's, and with --workers the others'."""
    own = Tally.of(app)
    link = app.get(HUB)
    if link is None:
        return own
    whole, state = Tally(), own.state()
    gathered = await link.gather(state)
    for each in [state, *gathered["tallies"]]:
        whole.add(each)
    whole.workers, whole.restarts = gathered["workers"], gathered["restarts"]
    return whole


# Application state keys ###################################################

@dataclass
class RequestLog:
    """What the one log line of a request reports, gathered as it is served."""

    id: str = ""
    model: str = "-"
    retries: int = 0
    failure: str | None = None
    account: str | None = None
    upstream_first_byte: float | None = None  # seconds from the upstream call to its headers
    failovers: int = 0  # accounts set aside while serving this request
    bytes_out: int = 0  # body bytes of a streamed answer (keep-alive pings aside)
    credits: float | None = None  # what Kiro billed for it (safeguard checks included)
    usage: str | None = None  # where its token figures came from (Assembler.usage_source)


# RequestKey arrived in aiohttp 3.12; a plain string key works before it.
_RequestKey = getattr(web, "RequestKey", None)
REQUEST_LOG = _RequestKey("log", RequestLog) if _RequestKey else "kiro2api.log"

CONFIG = web.AppKey("config", Config)
HTTP = web.AppKey("http", aiohttp.ClientSession)
STREAMS = web.AppKey("streams", set)  # the tasks of streams in flight, for shutdown
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)
ACCOUNTS = web.AppKey("accounts", list)  # list[TokenStore], in the order given
FLEET = web.AppKey("fleet", Fleet)  # with --state only


# Upstream client ##########################################################
#
# ``open_upstream`` walks the accounts, ``call_account`` one account's ways,
# ``call_way`` one way with its refresh and retries, ``post_generate`` one
# POST; what each refusal means is ``convert.rejection``'s (PROTOCOL-2026.md
# 10.5, 10.9). The control plane (profiles, usage limits) comes first.

# An account Kiro suspended is set aside this long; one whose credits ran out
# until their reset (when GetUsageLimits tells it), else this long.
SUSPENDED_SECONDS = 12 * 3600.0
EXHAUSTED_SECONDS = 3600.0
# A 200 that ends before any frame is asked again this often before the
# client gets a 502 (PROTOCOL-2026.md 10.9).
EMPTY_STREAM_RETRIES = 2
CONTROL_TIMEOUT_SECONDS = 15.0
USAGE_FRESH_SECONDS = 60.0
# Both names of the control-plane service are seen (PROTOCOL-2026.md 10.4.1).
PROFILE_TARGETS = ("AmazonCodeWhispererService.ListAvailableProfiles",
                   "KiroControlPlaneBearerService.ListAvailableProfiles")
USAGE_TARGET = "AmazonCodeWhispererService.GetUsageLimits"
OS_NAME = {"darwin": "macos", "win32": "windows"}.get(sys.platform, "linux")


def kiro_region(credentials: Credentials, arn: str | None, config: Config) -> str:
    """The region of Kiro's hosts for an account: its profile ARN's, else --region, else
    its file's if Kiro has hosts there, else us-east-1 (PROTOCOL-2026.md 10.1.1)."""
    if arn and arn != convert.SERVICE_PROFILE_ARN:
        region = convert.api_region(arn, "")
        if region in KIRO_REGIONS:
            return region
    if config.region:
        return config.region
    return credentials.region if credentials.region in KIRO_REGIONS else DEFAULT_REGION


def kiro_headers(config: Config, store: TokenStore, credentials: Credentials,
                 dialect: convert.Dialect, arn: str | None = None) -> dict[str, str]:
    """The headers of one call to Kiro in ``dialect`` for this account."""
    return convert.kiro_headers(
        dialect, access_token=credentials.access_token, kind=credentials.kind,
        machine_id=store.machine_id, versions=config.kiro_version, os_name=OS_NAME,
        invocation_id=random_uuid(), profile_arn=None if dialect is convert.IDE else arn)


def legacy_upstream(config: Config) -> str:
    """The first --upstream of the legacy family (REST calls), else the first of all."""
    urls = [u for u in config.upstream if convert.host_family(u) == "legacy"]
    return (urls or list(config.upstream))[0].partition("#")[0].rstrip("/")


def control_bases(config: Config) -> tuple[str, ...]:
    """Where control-plane RPCs go: --management-url, then a legacy host's RPC form."""
    return tuple(dict.fromkeys((config.management_url, legacy_upstream(config))))


async def json_call(app: web.Application, method: str, url: str, headers: dict[str, str],
                    **options: Any) -> tuple[int, Any]:
    """One short call to Kiro's control plane: the status and the answer's JSON (None
    when it is not JSON)."""
    async with app[HTTP].request(method, url, headers=headers,
                                 proxy=app[CONFIG].proxy_for(url),
                                 timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_SECONDS),
                                 **options) as response:
        raw = await response.read()
    try:
        return response.status, json.loads(raw)
    except (ValueError, RecursionError):
        return response.status, None


async def control_call(app: web.Application, store: TokenStore, credentials: Credentials,
                       target: str, body: Json, *, region: str, base: str | None = None,
                       query: dict[str, str] | None = None) -> tuple[int, Any]:
    """One control-plane RPC on ``base`` (--management-url by default): the status and
    the answer's JSON (None when it is not JSON). Raises aiohttp.ClientError,
    asyncio.TimeoutError."""
    config = app[CONFIG]
    headers = kiro_headers(config, store, credentials, convert.CLI)
    headers["x-amz-target"] = target
    return await json_call(app, "POST", region_url(base or config.management_url, region) + "/",
                           headers, params=query, data=json.dumps(body))


async def legacy_get(app: web.Application, store: TokenStore, credentials: Credentials,
                     path: str, params: dict[str, str], *, region: str) -> tuple[int, Any]:
    """One REST call on a legacy host (the IDE's form): the status and the answer's
    JSON (None when it is not JSON). Raises aiohttp.ClientError, asyncio.TimeoutError."""
    config = app[CONFIG]
    return await json_call(app, "GET", region_url(legacy_upstream(config), region) + path,
                           kiro_headers(config, store, credentials, convert.IDE), params=params)


async def look_up_profile(app: web.Application, store: TokenStore,
                          credentials: Credentials) -> str | None:
    """The account's own profile ARN from ListAvailableProfiles, cached on the account:
    asked on each control-plane base, in the account's region first, then in the
    others Kiro has profiles in, under both names of the service; None when none
    lists one (``store.kiro.profile_problem`` says what the last one answered)."""
    if store.kiro.profile_arn:
        return store.kiro.profile_arn
    config = app[CONFIG]
    home = kiro_region(credentials, None, config)
    regions = dict.fromkeys((home, "us-east-1", "eu-central-1"))
    for base, region, target in itertools.product(control_bases(config), regions,
                                                  PROFILE_TARGETS):
        arns = await list_profiles(app, store, credentials, base, region, target)
        if arns:
            arns.sort(key=lambda a: convert.api_region(a, "") != home)
            store.kiro.profile_arn = arns[0]
            log.info("account %s: profile %s", store.path.name, arns[0])
            return arns[0]
    return None


async def list_profiles(app: web.Application, store: TokenStore, credentials: Credentials,
                        base: str, region: str, target: str) -> list[str]:
    """The profile ARNs one ListAvailableProfiles call lists; [] if it failed."""
    try:
        status, answer = await control_call(app, store, credentials, target, {},
                                            region=region, base=base)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        store.kiro.profile_problem = describe(exc) or "timed out"
        return []
    profiles = answer.get("profiles") if isinstance(answer, dict) else None
    if status != 200 or not isinstance(profiles, list):
        store.kiro.profile_problem = f"HTTP {status} {json.dumps(answer)[:300]}"
        return []
    arns = [p.get("arn") or p.get("profileArn") for p in profiles if isinstance(p, dict)]
    arns = [a for a in arns if isinstance(a, str) and a.startswith("arn:")]
    if not arns:
        store.kiro.profile_problem = f"no profile in {region}"
    return arns


async def profile_for(app: web.Application, store: TokenStore, credentials: Credentials,
                      way: Way) -> str | None:
    """The profile ARN a call ``way`` carries for this account."""
    if way.arn == convert.NO_ARN:
        return None
    if way.arn == convert.SERVICE_ARN:
        return convert.SERVICE_PROFILE_ARN
    if credentials.profile_arn and credentials.profile_arn != store.kiro.rejected_arn:
        return credentials.profile_arn
    return await look_up_profile(app, store, credentials)


async def read_usage_limits(app: web.Application, store: TokenStore,
                            credentials: Credentials) -> convert.UsageLimits:
    """The account's GetUsageLimits: the RPC with its profile ARN, then without one
    (Builder ID has none), then the REST form on a legacy host. Raises UpstreamError."""
    config = app[CONFIG]
    arn = credentials.profile_arn or store.kiro.profile_arn
    region = kiro_region(credentials, arn, config)
    tried: list[str] = []
    for with_arn in dict.fromkeys((bool(arn), False)):
        body: Json = {"origin": "AI_EDITOR", "isEmailRequired": False}
        if with_arn:
            body["profileArn"] = arn
        query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in body.items()}
        try:
            status, answer = await control_call(app, store, credentials, USAGE_TARGET, body,
                                                region=region, query=query)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            tried.append(describe(exc) or "timed out")
            continue
        limits = convert.usage_limits(answer) if status == 200 else None
        if limits is not None:
            return store.kiro.remember_usage(limits)
        tried.append(f"HTTP {status}")
    params = {"origin": "AI_EDITOR", "resourceType": "AGENTIC_REQUEST", **(
        {"profileArn": arn} if arn else {})}
    try:
        status, answer = await legacy_get(app, store, credentials, "/getUsageLimits", params,
                                          region=region)
        tried.append(f"HTTP {status}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        status, answer = 0, None
        tried.append(describe(exc) or "timed out")
    limits = convert.usage_limits(answer) if status == 200 else None
    if limits is not None:
        return store.kiro.remember_usage(limits)
    raise UpstreamError(convert.failure(
        502, f"Kiro did not give the usage limits ({', '.join(tried)})"))


# Backoff between retries: 0.5 s, 1 s, 2 s ... with +/-25% jitter so that
# clients retrying together do not hit the upstream together again.
RETRY_BASE_SECONDS = 0.5
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


def retry_delay(attempt: int, retry_after: str | None) -> float:
    """Seconds to wait before retry ``attempt``: what ``Retry-After`` asks (seconds or an
    HTTP date), else exponential backoff with jitter."""
    asked = parse_retry_after(retry_after)
    if asked is not None:
        return asked
    return RETRY_BASE_SECONDS * 2 ** (attempt - 1) * random.uniform(0.75, 1.25)


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds from now (0 for a date in the past); None if
    missing or unreadable."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # RFC 9110 dates are GMT; parsedate calls "-0000" naive
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, (moment - utcnow()).total_seconds())


# aiohttp 3.10+ tells a connect timeout from a read timeout by class; 3.9 by message.
_ConnectTimeout = getattr(aiohttp, "ConnectionTimeoutError", None)
# What aiohttp raises when sock_read runs out (3.10+; ServerTimeoutError in 3.9),
# and so what the watchdog raises for --idle-timeout.
_ReadTimeout = getattr(aiohttp, "SocketTimeoutError", aiohttp.ServerTimeoutError)


def timeout_failure(exc: BaseException, config: Config, url: str) -> convert.Failure:
    """A 504 naming the limit that ran out: connecting, the first byte, or silence."""
    if isinstance(exc, aiohttp.ServerTimeoutError) and (
            (_ConnectTimeout is not None and isinstance(exc, _ConnectTimeout))
            or "connect" in str(exc).lower()):
        message = (f"could not connect to Kiro at {url} within {config.connect_timeout:g} s "
                   f"(--connect-timeout)")
    elif isinstance(exc, aiohttp.ServerTimeoutError):  # a read: --idle-timeout
        message = (f"Kiro did not start answering within {config.idle_timeout:g} s "
                   f"(--idle-timeout)")
    else:
        message = (f"Kiro did not start answering within {config.first_byte_timeout:g} s "
                   f"(--first-byte-timeout)")
    return convert.failure(504, message, code="timeout")


# An account the upstream throttles, finds out of quota or refuses is set
# aside for a while, so the next requests go to the others first.
COOLDOWN_SECONDS = {429: 60.0, 402: 3600.0, 403: 600.0, 401: 300.0}
TOKEN_COOLDOWN_SECONDS = 300.0


def account_order(stores: list[TokenStore]) -> list[TokenStore]:
    """Accounts to try, in order: the usable ones as configured, then the rest."""
    ready = [s for s in stores if s.cooldown_until <= s.clock.monotonic()]
    resting = sorted((s for s in stores if s not in ready), key=lambda s: s.cooldown_until)
    return ready + resting


def set_aside(store: TokenStore, seconds: float, reason: str, *,
              state: str | None = None) -> None:
    """Try ``store`` after the others for ``seconds`` (on its clock), saying why;
    ``state`` ("suspended", "exhausted") is what ``/health`` shows meanwhile."""
    store.cooldown_until = store.clock.monotonic() + seconds
    store.cooldown_reason = reason
    store.cooldown_state = state
    log.warning("account %s set aside for %s: %s", store.path, human_duration(seconds), reason)
    store.changed()


# Upstream timeouts ########################################################
#
# aiohttp's sock_read timeout cancels a timer and schedules a new one on
# every read of the socket, a frame every 50-100 ms on each of a thousand
# streams. Instead one task per app, the watchdog, looks at every open call
# to generateAssistantResponse every WATCH_TICK_SECONDS (or a tenth of the
# shorter limit) and aborts those silent past --idle-timeout or without
# their first bytes past --first-byte-timeout, with what aiohttp's timeout
# or ``asyncio.wait_for`` raised before, so every caller sees the same
# failures. A limit may run over by one tick. One difference: sock_read
# started once the request was out, the watchdog's idle clock starts with
# the call, so connecting (bounded by --connect-timeout) counts as silence;
# knowing when the request is out takes aiohttp's tracing, which cost 3% of
# a streamed request's CPU. It shows only with --idle-timeout the shorter.

WATCH_TICK_SECONDS = 1.0
IDLE, FIRST_BYTE = "idle", "first byte"


class UpstreamWatch:
    """One call as the watchdog sees it.

    ``turns`` goes up by one when the caller starts waiting on Kiro (the call
    begins, a read begins) and by one when something arrives: it is odd while
    the caller waits. Two increments a read are all the bookkeeping there is.
    The watchdog keeps ``seen``, the last ``turns`` it saw, and ``quiet_since``,
    the tick at which it saw it change (or the caller not waiting).
    """

    __slots__ = ("turns", "seen", "quiet_since", "first_byte_by", "opening", "content",
                 "response", "expired")

    def __init__(self, now: float, first_byte_by: float) -> None:
        self.turns = self.seen = 0
        self.quiet_since = now
        self.first_byte_by = first_byte_by  # inf once the first bytes are in
        self.opening: asyncio.Future | None = None  # the call until its first bytes
        self.content: aiohttp.StreamReader | None = None  # the body, once it is read
        self.response: aiohttp.ClientResponse | None = None
        self.expired: str | None = None  # IDLE or FIRST_BYTE, once aborted

    def wait(self) -> None:
        """Something happened, and the caller waits on Kiro now."""
        self.turns += 2 if self.turns & 1 else 1

    def rest(self) -> None:
        """Something happened, and the caller does not wait on Kiro now."""
        self.turns += 1 if self.turns & 1 else 2

    def timeout(self) -> asyncio.TimeoutError:
        """What the limit that ran out raised before the watchdog (timeout_failure's input)."""
        if self.expired == IDLE:
            return _ReadTimeout("Timeout on reading data from socket")
        return asyncio.TimeoutError()


class Watchdog:
    """The open calls to Kiro and their two limits, checked every ``tick`` seconds."""

    def __init__(self, config: Config) -> None:
        self.idle = config.idle_timeout
        self.first_byte = config.first_byte_timeout
        self.tick = min(WATCH_TICK_SECONDS, self.idle / 10, self.first_byte / 10)
        # Each call's own timeout: connecting stays aiohttp's (one timer a connection).
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout)
        self.watches: set[UpstreamWatch] = set()

    def watch(self) -> UpstreamWatch:
        now = asyncio.get_running_loop().time()
        watch = UpstreamWatch(now, now + self.first_byte)
        self.watches.add(watch)
        return watch

    def forget(self, watch: UpstreamWatch) -> None:
        self.watches.discard(watch)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Watchdog]:
        task = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick)
            self.check(loop.time())

    def check(self, now: float) -> None:
        """Abort every call past a limit at ``now``; forget those already released."""
        for watch in list(self.watches):
            if watch.response is not None and watch.response.closed:
                self.watches.discard(watch)  # released by a caller that did not say so
                continue
            if watch.turns != watch.seen or not watch.turns & 1:
                watch.seen, watch.quiet_since = watch.turns, now
            elif now - watch.quiet_since >= self.idle:
                self.abort(watch, IDLE)
                continue
            if now >= watch.first_byte_by:
                self.abort(watch, FIRST_BYTE)

    def abort(self, watch: UpstreamWatch, limit: str) -> None:
        watch.expired = limit
        self.watches.discard(watch)
        if watch.opening is not None:
            watch.opening.cancel()  # opening() turns that into watch.timeout()
        elif watch.content is not None:
            # The pending read raises, as it did when aiohttp's sock_read ran out;
            # releasing the response then closes its connection (unread body).
            watch.content.set_exception(watch.timeout())


async def opening(watch: UpstreamWatch, call: Awaitable[Any]) -> Any:
    """``call`` (the request until its first bytes) in a task of its own that the
    watchdog cancels at a limit; then raises what the limit raised before."""
    task = watch.opening = asyncio.ensure_future(call)
    try:
        await asyncio.wait((task,))
    except asyncio.CancelledError:  # the client went away: the call goes too
        task.cancel()
        await asyncio.wait((task,))
        if not task.cancelled() and task.exception() is None:
            task.result()[0].close()  # an answer that came in just then
        raise
    finally:
        watch.opening = None
    if task.cancelled():
        raise watch.timeout()
    return task.result()


WATCHDOG = web.AppKey("watchdog", Watchdog)


class UpstreamAnswer:
    """A 200 from Kiro with the first bytes of its body, read before anything goes
    to the client (so that an empty answer is asked again, never relayed)."""

    def __init__(self, response: aiohttp.ClientResponse, head: bytes,
                 watch: UpstreamWatch, watchdog: Watchdog) -> None:
        self.response = response
        self.head = head
        self.store: TokenStore | None = None  # the account that answered
        self.watch, self.watchdog = watch, watchdog
        watch.content = response.content

    async def __aenter__(self) -> UpstreamAnswer:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Done with the answer: the watchdog forgets it, its connection goes back."""
        self.watchdog.forget(self.watch)
        self.response.release()


class WayRefused(UpstreamError):
    """Kiro answered that this host or dialect will not do for the account."""


class AccountRefused(UpstreamError):
    """Kiro suspended the account, or its credits are gone: ``state`` says which."""

    def __init__(self, failure: convert.Failure, state: str) -> None:
        super().__init__(failure)
        self.state = state


class KiroRefusal(Exception):
    """A call that gave no answer: what it means (``convert.rejection``), the error the
    client would get, the access token it was made with, and Kiro's Retry-After."""

    def __init__(self, meaning: str, error: UpstreamError, *, retryable: bool,
                 access_token: str = "", retry_after: str | None = None,
                 answer: str | None = None) -> None:
        super().__init__(error.failure.message)
        self.meaning = meaning
        self.error = error
        self.answer = answer or error.failure.message  # Kiro's words, for doctor
        self.retryable = retryable
        self.access_token = access_token
        self.retry_after = retry_after


@dataclass
class CallBudget:
    """One request's retries, shared by the ways of one account."""

    deadline: float  # loop.time()
    attempt: int = 0
    refreshed: bool = False
    empty: int = 0

    def ask_again_empty(self, error: BaseException) -> None:
        """Count an empty answer; raise ``error`` past EMPTY_STREAM_RETRIES of them."""
        self.empty += 1
        if self.empty > EMPTY_STREAM_RETRIES:
            raise error

    def next_wait(self, config: Config, retryable: bool, asked: str | None) -> float | None:
        """Seconds to wait before the next attempt after a failed one (``asked``: its
        Retry-After); None when no attempt is left, or none would end in time."""
        self.attempt += 1
        delay = retry_delay(self.attempt, asked)
        if (not retryable or self.attempt > config.retries
                or asyncio.get_running_loop().time() + delay > self.deadline):
            return None
        return delay


async def open_upstream(request: web.Request, prepared: convert.Prepared) -> UpstreamAnswer:
    """POST the payload for the first account that can take it; return its answer.

    An account whose token cannot be refreshed, that Kiro throttles (429),
    suspended or finds out of credits, or that refuses (401, 403), is set
    aside and the next one is tried: one account's trouble never fails a
    request another account could serve.
    """
    app = request.app
    stores = account_order(app[ACCOUNTS])
    for i, store in enumerate(stores):
        others = i + 1 < len(stores)
        request[REQUEST_LOG].account = store.path.name
        try:
            answer = await call_account(app, request[REQUEST_LOG], prepared, store,
                                        failover=others)
            answer.store = store
            return answer
        except TokenError as exc:
            if not others:
                raise
            set_aside(store, TOKEN_COOLDOWN_SECONDS, str(exc))
        except AccountRefused as exc:
            set_aside(store, refused_seconds(store, exc.state), exc.failure.message,
                      state=exc.state)
            if not others:
                raise
        except UpstreamError as exc:
            status = exc.failure.status
            if not others or status not in COOLDOWN_SECONDS:
                raise
            seconds = COOLDOWN_SECONDS[status]
            asked = parse_retry_after(exc.failure.retry_after)
            if status == 429 and asked is not None:
                seconds = asked
            set_aside(store, seconds, exc.failure.message)
        app[METRICS].failovers += 1
        request[REQUEST_LOG].failovers += 1
    raise AssertionError("no accounts configured")  # make_app always has one


def refused_seconds(store: TokenStore, state: str) -> float:
    """How long an account is set aside for: a suspended one for long, one out of
    credits until they reset (when its usage limits tell the date)."""
    if state != convert.EXHAUSTED:
        return SUSPENDED_SECONDS
    reset = store.kiro.usage.reset_at if store.kiro.usage else None
    if reset is None:
        return EXHAUSTED_SECONDS
    return max(60.0, reset - store.clock.now().timestamp())


async def call_account(app: web.Application, entry: RequestLog, prepared: convert.Prepared,
                       store: TokenStore, *, failover: bool) -> UpstreamAnswer:
    """One account's attempt: its ways in turn, moving on when Kiro says "not this way".
    When every way is refused, the client hears the first (the account's usual) refusal."""
    config = app[CONFIG]
    credentials = await store.credentials()
    budget = CallBudget(asyncio.get_running_loop().time() + config.retry_seconds)
    ways = store.kiro.order(ways_for(credentials.kind, config.upstream))
    if not ways:
        raise UpstreamError(convert.failure(
            502, f"no --upstream host serves a {credentials.kind} account; add one of the "
                 f"families {', '.join(convert.HOST_FAMILIES)}"))
    refusals: list[WayRefused] = []
    for way in ways:
        try:
            answer = await call_way(app, entry, prepared, store, way, budget,
                                    failover=failover)
        except WayRefused as exc:
            store.kiro.refused(way, exc.failure.message)
            log.info("account %s: %s refused the call (%s)", store.path.name, way,
                     exc.failure.message)
            refusals.append(exc)
            continue
        store.kiro.worked(way)
        return answer
    raise refusals[0]


async def call_way(app: web.Application, entry: RequestLog, prepared: convert.Prepared,
                   store: TokenStore, way: Way, budget: CallBudget, *,
                   failover: bool) -> UpstreamAnswer:
    """Call Kiro one way: refresh once on a rejected token, look the profile up again
    when Kiro calls it invalid, send the history again without its thinking when
    Kiro refuses a replayed signature, and retry transient failures.

    Connection errors, timeouts before the answer starts, 429 and 5xx are
    retried with backoff within ``config.retries`` and ``config.retry_seconds``
    (a 429 is not, when ``failover`` says another account can take it); an
    empty answer is asked again up to EMPTY_STREAM_RETRIES times.
    """
    config = app[CONFIG]
    looked_up = False
    while True:
        try:
            return await post_generate(app, entry, prepared, store, way)
        except KiroRefusal as refusal:
            meaning, error = refusal.meaning, refusal.error
            stale_token, asked = refusal.access_token, refusal.retry_after
            retryable = refusal.retryable
        if meaning == convert.REFRESH and not budget.refreshed:
            log.info("upstream rejected the access token of %s; refreshing", store.path)
            budget.refreshed = True
            await store.refresh(stale_access_token=stale_token)
            continue
        if meaning in (convert.REFRESH, convert.NEXT_WAY):
            raise WayRefused(error.failure)
        if meaning == convert.UNSIGNED and (unsigned := convert.without_reasoning(prepared)):
            log.info("Kiro refused a thinking signature the history replayed; sending the "
                     "history again without its thinking")
            prepared = unsigned
            continue
        if meaning == convert.FIND_PROFILE and not looked_up and way.arn == convert.OWN_ARN:
            looked_up = True
            store.kiro.rejected_arn = (await store.credentials()).profile_arn
            store.kiro.profile_arn = None  # stale, or never known: list it again
            continue
        if meaning in (convert.SUSPENDED, convert.EXHAUSTED):
            raise AccountRefused(error.failure, meaning)
        if meaning == convert.EXHAUSTED_MAYBE:
            used_up = await credits_used_up(app, store)
            if used_up is not None:
                raise AccountRefused(used_up, convert.EXHAUSTED)
            retryable = not failover
        if meaning == convert.EMPTY:
            budget.ask_again_empty(error)
            log.info("Kiro answered an empty stream; asking again")
            entry.retries += 1
            app[METRICS].retries += 1
            continue
        delay = budget.next_wait(config, retryable, asked)
        if delay is None:
            raise error
        entry.retries += 1
        app[METRICS].retries += 1
        log.info("upstream attempt %d failed (%s); retrying in %.1f s",
                 budget.attempt, error.failure.message, delay)
        await asyncio.sleep(delay)


async def credits_used_up(app: web.Application, store: TokenStore) -> convert.Failure | None:
    """A 402 when the account's usage limits say its credits are gone (a plain 429
    can mean that on Free and Pro plans, PROTOCOL-2026.md 10.9); None otherwise."""
    usage = await fresh_usage(app, store)
    if usage is None or not usage.exhausted:
        return None
    reset = ""
    if usage.reset_at is not None:
        moment = datetime.fromtimestamp(usage.reset_at, timezone.utc)
        reset = f"; they come back on {moment:%Y-%m-%d %H:%M} UTC"
    return convert.failure(402, f"the Kiro credits of this account are used up "
                                f"({usage.used:g} of {usage.limit:g}){reset}")


async def fresh_usage(app: web.Application, store: TokenStore) -> convert.UsageLimits | None:
    """The account's usage limits, read from Kiro at most once a USAGE_FRESH_SECONDS
    however many ask (``/v1/usage``, the status page, a 429): one read at a time,
    whose answer every caller waiting shares, and with --state one replica a minute
    for the fleet. None when the last read failed (``store.kiro.usage_failure`` says
    why; ``store.kiro.usage`` keeps what an earlier read gave)."""
    read = usage_read(app, store)
    if read is not None:
        await asyncio.shield(read)  # a caller that goes away leaves the read to the others
    return store.kiro.usage if store.kiro.usage_failure is None else None


def usage_read(app: web.Application, store: TokenStore) -> asyncio.Task | None:
    """The read of the account's usage limits under way, started if they are due; None
    when what the account holds is fresh (or failed) within USAGE_FRESH_SECONDS."""
    if not store.kiro.usage_due():
        return None
    if store.usage_task is None or store.usage_task.done():
        store.usage_task = asyncio.create_task(read_usage_once(app, store),
                                               name=f"kiro2api usage of {store.path.name}")
    return store.usage_task


async def read_usage_once(app: web.Application, store: TokenStore) -> None:
    """One read of the usage limits for ``fresh_usage``; a failure is remembered."""
    view, shared = store.kiro, store.peers
    try:
        if shared is not None and not await shared.claim_usage():
            # Another replica reads them this minute: its answer, if the fleet has it yet.
            with contextlib.suppress(StateDown):
                await shared.pull_health()
            if view.usage is not None:
                return
        await read_usage_limits(app, store, await store.credentials())
    except (UpstreamError, TokenError) as exc:
        view.usage_failure = str(exc)
        log.info("could not read the usage limits of %s: %s", store.path.name, exc)
    finally:
        view.usage_tried_at = store.clock.monotonic()


async def post_generate(app: web.Application, entry: RequestLog, prepared: convert.Prepared,
                        store: TokenStore, way: Way) -> UpstreamAnswer:
    """One POST of GenerateAssistantResponse; its answer once the first bytes are in.
    Raises ``KiroRefusal`` for anything else."""
    config, session = app[CONFIG], app[HTTP]
    credentials = await store.credentials()
    arn = await profile_for(app, store, credentials, way)
    body = encode_payload(prepared, way.dialect, arn, config)
    url = region_url(way.url, kiro_region(credentials, arn, config)) + way.dialect.path
    headers = kiro_headers(config, store, credentials, way.dialect, arn)
    watchdog = app[WATCHDOG]
    watch = watchdog.watch()
    watch.wait()  # the idle clock starts with the call
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def first_bytes() -> tuple[aiohttp.ClientResponse, bytes]:
        response = await session.post(url, data=body, headers=headers,
                                      proxy=config.proxy_for(url), timeout=watchdog.timeout)
        watch.wait()  # the headers are in; the body is next
        watch.response = response
        entry.upstream_first_byte = loop.time() - started
        app[METRICS].observe_first_byte(loop.time() - started)
        if response.status != 200:
            return response, b""
        try:
            return response, await response.content.readany()
        except BaseException:
            response.close()
            raise

    try:
        try:
            response, head = await opening(watch, first_bytes())
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise transport_refusal(exc, config, url) from None
        watch.rest()
        watch.first_byte_by = math.inf
        if response.status == 200 and head:
            return UpstreamAnswer(response, head, watch, watchdog)
        if response.status == 200:
            response.release()
            raise KiroRefusal(convert.EMPTY, UpstreamError(convert.failure(
                502, "Kiro answered with an empty stream (no event at all), each time it "
                     "was asked")), retryable=True)
        watch.content = response.content
        watch.wait()  # for the rest of the refusal
        async with response:
            text = await response.text(errors="replace")
    except BaseException:
        watchdog.forget(watch)
        raise
    watchdog.forget(watch)
    log.debug("upstream %s answered %d: %s", url, response.status, text[:2000])
    meaning = convert.rejection(response.status, text)
    failure = convert.upstream_failure(response.status, text,
                                       response.headers.get("x-amzn-errortype", ""),
                                       retry_after=response.headers.get("Retry-After"))
    retryable = response.status in RETRYABLE_STATUSES or meaning == convert.CAPACITY
    raise KiroRefusal(meaning, UpstreamError(failure), retryable=retryable,
                      access_token=credentials.access_token,
                      retry_after=response.headers.get("Retry-After"),
                      answer=f"HTTP {response.status} {text.strip()[:500]}")


def transport_refusal(exc: BaseException, config: Config, url: str) -> KiroRefusal:
    """A call that failed before Kiro answered: a 504 for a timeout (ours, or the
    session's connect or read timeout), else a 502; both worth another try."""
    if isinstance(exc, asyncio.TimeoutError):
        failure = timeout_failure(exc, config, url)
    else:
        failure = convert.failure(502, f"could not reach Kiro at {url}: {describe(exc)}")
    return KiroRefusal(convert.FINAL, UpstreamError(failure), retryable=True)


def encode_payload(prepared: convert.Prepared, dialect: convert.Dialect, arn: str | None,
                   config: Config) -> bytes:
    """The request body for Kiro, within --max-input-bytes."""
    try:
        body = json.dumps(convert.kiro_body(prepared.payload, dialect, profile_arn=arn,
                                            continuation_id=random_uuid()),
                          ensure_ascii=False).encode()
    except RecursionError:  # the client's JSON parsed, but nests deeper than we can write
        raise convert.ConversionError("request body nests JSON too deeply") from None
    if len(body) > config.max_input_bytes:
        raise convert.ConversionError(
            f"{convert.PROMPT_TOO_LONG}: the request is {len(body)} bytes for Kiro, over its "
            f"{config.max_input_bytes}-byte limit; compact or shorten the conversation",
            code="context_length_exceeded")
    return body


async def upstream_frames(upstream: UpstreamAnswer) -> AsyncIterator[list[eventstream.Message]]:
    """The frames of each upstream read, as they arrive (the answer's first bytes, then
    every read of the rest); raises on framing errors."""
    decoder = eventstream.Decoder()
    decoder.feed(upstream.head)
    frames = decoder.take()
    if frames:
        yield frames
    read, watch = upstream.response.content.readany, upstream.watch
    while True:
        watch.turns += 1  # odd: waiting on Kiro (see UpstreamWatch)
        chunk = await read()
        watch.turns += 1
        if not chunk:
            break
        decoder.feed(chunk)
        frames = decoder.take()
        if frames:
            yield frames
    decoder.close()


# Metrics ##################################################################


class Histogram:
    """A Prometheus histogram: cumulative buckets, sum and count."""

    BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

    def __init__(self) -> None:
        self.counts = [0] * len(self.BUCKETS)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.BUCKETS):
            if value <= bound:
                self.counts[i] += 1

    def state(self) -> list[Any]:
        return [self.counts, self.sum, self.count]

    def add(self, state: list[Any]) -> None:
        """Add another worker's counts (``state()``'s form)."""
        counts, total, count = state
        self.counts = [a + b for a, b in zip(self.counts, counts)]
        self.sum += total
        self.count += count

    def lines(self, name: str, labels: str = "") -> list[str]:
        """The sample lines; ``labels`` (``key="value"``, escaped) go on each."""
        within = labels + "," if labels else ""
        out = [f'{name}_bucket{{{within}le="{bound:g}"}} {count}'
               for bound, count in zip(self.BUCKETS, self.counts)]
        braced = f"{{{labels}}}" if labels else ""
        out += [f'{name}_bucket{{{within}le="+Inf"}} {self.count}',
                f"{name}_sum{braced} {self.sum:.6f}", f"{name}_count{braced} {self.count}"]
        return out


class MinuteRing:
    """The last hour, one slot a minute, for the status page: requests by route and
    status, and the count and sum of the upstream's times to first byte.

    O(1) a request: a slot is emptied when its minute comes round again, an
    hour later; a minute nothing happened in is a slot that still holds an older
    minute, and reads as empty. Times are ``time.monotonic()`` seconds.
    """

    SLOTS = 60
    SLOT_SECONDS = 60.0

    def __init__(self) -> None:
        self.minutes = [-1] * self.SLOTS  # the minute each slot holds
        self.requests: list[dict[tuple[str, int], int]] = [{} for _ in range(self.SLOTS)]
        self.first_bytes = [0] * self.SLOTS
        self.first_byte_seconds = [0.0] * self.SLOTS

    def _slot(self, now: float) -> int:
        minute = int(now // self.SLOT_SECONDS)
        slot = minute % self.SLOTS
        if self.minutes[slot] != minute:
            self.minutes[slot] = minute
            self.requests[slot] = {}
            self.first_bytes[slot], self.first_byte_seconds[slot] = 0, 0.0
        return slot

    def count_request(self, route: str, status: int, now: float) -> None:
        counts = self.requests[self._slot(now)]
        counts[route, status] = counts.get((route, status), 0) + 1

    def observe_first_byte(self, seconds: float, now: float) -> None:
        slot = self._slot(now)
        self.first_bytes[slot] += 1
        self.first_byte_seconds[slot] += seconds

    def _held(self, now: float) -> list[int | None]:
        """The slot of each of the last SLOTS minutes, oldest first (None: empty)."""
        current = int(now // self.SLOT_SECONDS)
        return [slot if self.minutes[slot] == minute else None
                for minute in range(current - self.SLOTS + 1, current + 1)
                for slot in (minute % self.SLOTS,)]

    def state(self) -> list[list[Any]]:
        """Every minute held: [minute, [[route, status, count]...], first bytes, seconds]."""
        return [[minute, [[route, status, n] for (route, status), n in counts.items()],
                 first_bytes, seconds]
                for minute, counts, first_bytes, seconds in zip(
                    self.minutes, self.requests, self.first_bytes, self.first_byte_seconds)
                if minute >= 0]

    def add(self, state: list[list[Any]]) -> None:
        """Add another worker's minutes (``state()``'s form); older ones than a slot
        holds are past the hour."""
        for minute, counts, first_bytes, seconds in state:
            slot = minute % self.SLOTS
            if self.minutes[slot] > minute:
                continue
            if self.minutes[slot] < minute:
                self.minutes[slot], self.requests[slot] = minute, {}
                self.first_bytes[slot], self.first_byte_seconds[slot] = 0, 0.0
            held = self.requests[slot]
            for route, status, n in counts:
                held[route, status] = held.get((route, status), 0) + n
            self.first_bytes[slot] += first_bytes
            self.first_byte_seconds[slot] += seconds

    def totals(self, now: float) -> dict[tuple[str, int], int]:
        """Requests of the last hour by (route, status)."""
        found: dict[tuple[str, int], int] = {}
        for slot in self._held(now):
            for key, count in self.requests[slot].items() if slot is not None else ():
                found[key] = found.get(key, 0) + count
        return found

    def series(self, now: float, *, leave_out: frozenset[str] = frozenset()) -> list[Json]:
        """Each of the last SLOTS minutes, oldest first: requests and errors (4xx, 5xx)
        on the routes not in ``leave_out``, and the mean time to first byte (ms)."""
        out = []
        for slot in self._held(now):
            counts = self.requests[slot] if slot is not None else {}
            counted = [(status, n) for (route, status), n in counts.items()
                       if route not in leave_out]
            first_bytes = self.first_bytes[slot] if slot is not None else 0
            out.append({
                "requests": sum(n for _, n in counted),
                "errors": sum(n for status, n in counted if status >= 400),
                "first_byte_ms": round(1000 * self.first_byte_seconds[slot] / first_bytes, 1)
                if slot is not None and first_bytes else None})
        return out


@dataclass
class Metrics:
    """What ``GET /metrics`` reports, and the status page from the same counts; updated
    by the middleware and the upstream client."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (route, status)
    retries: int = 0
    failovers: int = 0
    upstream_first_byte: Histogram = field(default_factory=Histogram)
    # By route, so that scrapes of /metrics and /health stay apart from answers.
    request_duration: defaultdict[str, Histogram] = field(
        default_factory=lambda: defaultdict(Histogram))
    # --safeguards kiro: checks made, by verdict or reason (flagged, timeout...).
    safeguard_checks: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    # The last hour of the requests and first bytes counted above, by minute.
    recent: MinuteRing = field(default_factory=MinuteRing)

    def count_request(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.request_duration[route].observe(seconds)
        self.recent.count_request(route, status, time.monotonic())

    def observe_first_byte(self, seconds: float) -> None:
        self.upstream_first_byte.observe(seconds)
        self.recent.observe_first_byte(seconds, time.monotonic())

    def state(self) -> Json:
        """The counts as JSON, for another worker to add (``add``)."""
        return {"requests": [[route, status, n] for (route, status), n in self.requests.items()],
                "retries": self.retries, "failovers": self.failovers,
                "first_byte": self.upstream_first_byte.state(),
                "durations": {route: h.state() for route, h in self.request_duration.items()},
                "safeguards": dict(self.safeguard_checks), "recent": self.recent.state()}

    def add(self, state: Json) -> None:
        for route, status, n in state["requests"]:
            self.requests[route, status] = self.requests.get((route, status), 0) + n
        self.retries += state["retries"]
        self.failovers += state["failovers"]
        self.upstream_first_byte.add(state["first_byte"])
        for route, histogram in state["durations"].items():
            self.request_duration[route].add(histogram)
        for result, n in state["safeguards"].items():
            self.safeguard_checks[result] += n
        self.recent.add(state["recent"])


METRICS = web.AppKey("metrics", Metrics)


@dataclass
class Tally:
    """What ``/metrics``, ``/health`` and the status page count: one worker's own
    (``of``), or the whole server's, added up over its workers (``server_tally``).

    The accounts' own state (token, cooldown) is every worker's alike; what each
    counts apart is here: the metrics, the streams open, and by account path its
    refreshes, failed refreshes and credits.
    """

    metrics: Metrics = field(default_factory=Metrics)
    streams_open: int = 0
    accounts: dict[str, list[float]] = field(default_factory=dict)
    # With --workers, from the supervisor: the workers running, and those started
    # again after they died (None: it did not answer in time).
    workers: int | None = None
    restarts: int | None = None

    @classmethod
    def of(cls, app: web.Application) -> Tally:
        """This process's counts (the app's own objects, not copies)."""
        return cls(app[METRICS], len(app[STREAMS]),
                   {str(s.path): [s.refreshes, s.failures, s.credits] for s in app[ACCOUNTS]})

    def state(self) -> Json:
        return {"metrics": self.metrics.state(), "streams_open": self.streams_open,
                "accounts": self.accounts}

    def add(self, state: Json) -> None:
        """Add another worker's tally (``state()``'s form)."""
        self.metrics.add(state["metrics"])
        self.streams_open += state["streams_open"]
        for path, counts in state["accounts"].items():
            held = self.accounts.setdefault(path, [0, 0, 0.0])
            self.accounts[path] = [a + b for a, b in zip(held, counts)]

    def of_account(self, store: TokenStore) -> list[float]:
        """The account's refreshes, failed refreshes and credits."""
        return self.accounts.get(str(store.path)) or [0, 0, 0.0]

    def health_of(self, store: TokenStore) -> Json:
        """``store.health()`` with the counts of this tally in place of the process's own."""
        health = store.health()
        health["refreshes"], _, credits = self.of_account(store)
        health["credits"] = round(credits, 6)
        return health

    def render(self, app: web.Application) -> str:
        """The Prometheus text of ``GET /metrics``."""
        m = self.metrics
        def family(name: str, kind: str, help_text: str) -> list[str]:
            return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

        def single(name: str, kind: str, help_text: str, value: float) -> list[str]:
            return [*family(name, kind, help_text), f"{name} {value}"]

        lines = family("kiro2api_requests_total", "counter",
                       "Requests served, by route and status.")
        lines += [f'kiro2api_requests_total{{route="{route}",status="{status}"}} {count}'
                  for (route, status), count in sorted(m.requests.items())]
        lines += single("kiro2api_streams_open", "gauge", "Streaming answers in flight.",
                        self.streams_open)
        lines += single("kiro2api_upstream_retries_total", "counter",
                        "Upstream calls retried before the answer started.", m.retries)
        lines += single("kiro2api_account_failovers_total", "counter",
                        "Requests moved to another account.", m.failovers)
        if m.safeguard_checks:
            lines += family("kiro2api_safeguard_checks_total", "counter",
                            "Tool calls judged for Claude Code's auto mode, by result.")
            lines += [f'kiro2api_safeguard_checks_total{{result="{result}"}} {count}'
                      for result, count in sorted(m.safeguard_checks.items())]
        lines += family("kiro2api_upstream_first_byte_seconds", "histogram",
                        "Time from calling Kiro to its answer's headers.")
        lines += m.upstream_first_byte.lines("kiro2api_upstream_first_byte_seconds")
        lines += family("kiro2api_request_duration_seconds", "histogram",
                        "Time to serve a request, streams included, by route.")
        for route, histogram in sorted(m.request_duration.items()):
            lines += histogram.lines("kiro2api_request_duration_seconds", f'route="{route}"')
        stores = app[ACCOUNTS]
        for name, kind, help_text, value in (
            ("kiro2api_token_refreshes_total", "counter", "Token refreshes made.",
             lambda s, h: self.of_account(s)[0]),
            ("kiro2api_token_failures_total", "counter", "Token loads or refreshes that failed.",
             lambda s, h: self.of_account(s)[1]),
            ("kiro2api_credits_total", "counter",
             "Kiro credits the account's answers were billed (meteringEvent).",
             lambda s, h: round(self.of_account(s)[2], 6)),
            ("kiro2api_account_up", "gauge", "1 if the account can serve requests now.",
             lambda s, h: int(h["state"] in ("ok", "expiring", "unknown")
                              and not h["cooldown_seconds"])),
            ("kiro2api_account_token_seconds_left", "gauge", "Seconds until the token expires.",
             lambda s, h: h["seconds_left"] if h["seconds_left"] is not None else "NaN"),
        ):
            lines += family(name, kind, help_text)
            for store in stores:
                label = str(store.path).replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{name}{{account="{label}"}} {value(store, store.health())}')
        if self.workers is not None:
            lines += single("kiro2api_workers", "gauge",
                            "Worker processes running (--workers).", self.workers)
            lines += single("kiro2api_worker_restarts_total", "counter",
                            "Workers started again after they died.", self.restarts)
        fleet = app.get(FLEET)
        if fleet is not None:
            lines += single("kiro2api_state_store_up", "gauge",
                            "1 if the state store (--state) answers.", int(fleet.up))
            lines += single("kiro2api_state_store_errors_total", "counter",
                            "Calls to the state store that failed.", fleet.errors)
        return "\n".join(lines) + "\n"




# HTTP handlers ############################################################


# A \uD800-\uDFFF escape: JSON may spell a lone surrogate, which no UTF-8
# text (and so no upstream body or answer) can hold.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; a ``ConversionError`` (400) if it is not JSON.

    Lone surrogates (half an emoji cut by a client) become U+FFFD, as a UTF-8
    decoder would make of them.
    """
    raw = await request.read()
    try:
        # Strict UTF-8 first: json.loads would take UTF-16, and encoded
        # surrogates, which no upstream request can carry.
        text = raw.decode("utf-8")
        data = json.loads(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError included
        raise convert.ConversionError("request body is not valid JSON in UTF-8") from None
    if _SURROGATE_ESCAPE.search(text):  # rare: the walk costs nothing otherwise
        try:
            data = without_lone_surrogates(data)
        except RecursionError:
            raise convert.ConversionError("request body nests JSON too deeply") from None
    # The log line names the model the body asked for, also when it is refused.
    if isinstance(data, dict) and isinstance(data.get("model"), str) and data["model"]:
        request[REQUEST_LOG].model = logged_model(data["model"])
    return data


# A model name longer than this is cut short in the log line (a body may be megabytes).
LOGGED_MODEL_CHARS = 100


def logged_model(model: str) -> str:
    return model if len(model) <= LOGGED_MODEL_CHARS else model[:LOGGED_MODEL_CHARS] + "..."


def without_lone_surrogates(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (and keys) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {without_lone_surrogates(k): without_lone_surrogates(v) for k, v in value.items()}
    return value


def new_id(prefix: str) -> str:
    return f"{prefix}{random.getrandbits(96):024x}"


def random_uuid() -> str:
    """A version 4 UUID from the ``random`` module: these ids are not secrets,
    and ``uuid.uuid4()`` costs a system call each."""
    return str(uuid.UUID(int=random.getrandbits(128), version=4))


async def handle_health(request: web.Request) -> web.Response:
    """Liveness for anyone (``status``, ``version``); with the client key, also the
    uptime, every account's state and the state store's.

    Load balancers and uptime checks need no key; the details (token file
    paths, providers, regions, expiry) are for those who may use the API.
    """
    config = request.app[CONFIG]
    accounts = [store.health() for store in request.app[ACCOUNTS]]
    fleet = request.app.get(FLEET)
    serving = any(a["state"] in ("ok", "expiring") for a in accounts)
    answer: Json = {
        "status": "ok" if serving and (fleet is None or fleet.up) else "degraded",
        "version": __version__,
    }
    if not await client_allowed(request):
        return web.json_response(answer)
    tally = await server_tally(request.app)
    accounts = [tally.health_of(store) for store in request.app[ACCOUNTS]]
    answer["uptime_seconds"] = round(time.time() - config.started, 3)
    if config.workers > 1:
        answer["worker"] = config.worker  # the one that answered
        answer["workers"] = {"running": tally.workers, "restarts": tally.restarts}
    answer["accounts"] = accounts
    if fleet is not None:
        answer["state_store"] = fleet.health()
    return web.json_response(answer)


async def handle_metrics(request: web.Request) -> web.Response:
    """Prometheus text, behind the client key (``KEYED_PATHS``): the account labels
    are token file paths."""
    tally = await server_tally(request.app)
    return web.Response(text=tally.render(request.app),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


# How long the account's model list is kept, and how long a failure to get
# it is (the built-in table serves meanwhile).
MODELS_TTL_SECONDS = 3600.0
MODELS_RETRY_SECONDS = 60.0
MODELS_PAGES_MAX = 5


@dataclass
class ModelCache:
    entries: list[Json] | None = None
    listed: tuple[str, ...] = ()  # the Kiro ids the service listed (none: the built-in list)
    windows: dict[str, int] = field(default_factory=dict)  # Kiro id -> its context window
    stood_in: set[str] = field(default_factory=set)  # ids served by another, logged once
    expires: float = 0.0  # config.clock.monotonic()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


MODEL_CACHE = web.AppKey("model_cache", ModelCache)


async def fetch_models(app: web.Application) -> list[Json] | None:
    """Every model some account lists (``ListAvailableModels``, each once, in the
    accounts' order); None if no account can list them."""
    found: dict[str, Json] = {}
    listed = False
    for store in account_order(app[ACCOUNTS]):
        try:
            credentials = await store.credentials()
            models = await list_models(app, store, credentials)
        except TokenError:
            continue
        except (UpstreamError, aiohttp.ClientError, asyncio.TimeoutError,
                ValueError) as exc:  # ValueError: an answer that is not JSON
            log.warning("could not list the models of account %s (%s)", store.path.name,
                        describe(exc))
            continue
        listed = True
        for model in models:
            if isinstance(model, dict) and isinstance(model.get("modelId"), str):
                found.setdefault(model["modelId"], model)
    if not listed:
        log.warning("no account could list its models; using the built-in list")
        return None
    return list(found.values())


MODELS_TARGET = "AmazonCodeWhispererService.ListAvailableModels"


async def list_models(app: web.Application, store: TokenStore,
                      credentials: Credentials) -> list[Json]:
    """One account's ``ListAvailableModels``, every page of it: the RPC on
    --management-url where the account has a profile ARN (PROTOCOL-2026.md
    10.4.3), else, or when that fails, the REST form on a legacy host."""
    config = app[CONFIG]
    arn = credentials.profile_arn or store.kiro.profile_arn
    region = kiro_region(credentials, arn, config)

    async def rpc(params: dict[str, str]) -> tuple[int, Any]:
        return await control_call(app, store, credentials, MODELS_TARGET,
                                  {**params, "origin": "KIRO_CLI"}, region=region,
                                  query={"origin": "KIRO_CLI", "profileArn": arn or ""})

    async def rest(params: dict[str, str]) -> tuple[int, Any]:
        return await legacy_get(app, store, credentials, "/ListAvailableModels",
                                {"origin": "AI_EDITOR", "maxResults": "50", **params},
                                region=region)

    first = {"profileArn": arn} if arn else {}
    if arn:
        try:
            return await model_pages(rpc, first)
        except (UpstreamError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.info("ListAvailableModels on %s failed (%s); asking a legacy host",
                     config.management_url, describe(exc) or "timed out")
    return await model_pages(rest, first)


async def model_pages(fetch: Callable[[dict[str, str]], Awaitable[tuple[int, Any]]],
                      params: dict[str, str]) -> list[Json]:
    """Every page ``fetch`` gives (``nextToken`` in, ``nextToken`` out), at most
    MODELS_PAGES_MAX; raises UpstreamError for a refusal or an answer without models."""
    models: list[Json] = []
    for _ in range(MODELS_PAGES_MAX):
        status, data = await fetch(params)
        if status != 200:
            said = json.dumps(data)[:200] if data is not None else "a body that is not JSON"
            raise UpstreamError(convert.failure(502, f"Kiro answered HTTP {status}: {said}"))
        page = data.get("models") if isinstance(data, dict) else None
        if not isinstance(page, list):
            raise UpstreamError(convert.failure(502, "Kiro answered without a list of models"))
        models += page
        if not isinstance(data.get("nextToken"), str) or not data["nextToken"]:
            break
        params = {**params, "nextToken": data["nextToken"]}
    if not models:  # no account serves nothing: the built-in list is the better guess
        raise UpstreamError(convert.failure(502, "Kiro listed no models"))
    return models


async def cached_models(app: web.Application) -> list[Json]:
    """The ``/v1/models`` entries, from the cache or fetched anew when it is stale."""
    cache = app[MODEL_CACHE]
    async with cache.lock:  # one upstream call however many clients ask at once
        clock = app[CONFIG].clock
        if cache.entries is None or clock.monotonic() >= cache.expires:
            upstream = await fetch_models(app)
            cache.entries = convert.model_list(upstream)
            cache.listed = tuple(m["modelId"] for m in upstream or ()
                                 if isinstance(m, dict) and isinstance(m.get("modelId"), str))
            cache.windows = {entry["id"]: entry["context_window"] for entry in cache.entries
                             if isinstance(entry.get("context_window"), int)}
            cache.expires = clock.monotonic() + (
                MODELS_TTL_SECONDS if upstream is not None else MODELS_RETRY_SECONDS)
        return cache.entries


async def handle_models(request: web.Request) -> web.Response:
    data = await cached_models(request.app)
    return web.json_response({"object": "list", "data": data, "has_more": False,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None})


async def handle_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{id}``: one entry of the list (both SDKs' ``models.retrieve``)."""
    wanted = request.match_info["model_id"]
    for entry in await cached_models(request.app):
        if entry["id"] == wanted:
            return web.json_response(entry)
    raise convert.ConversionError(f"model {wanted!r} is not in GET /v1/models",
                                  status=404, param="model", code="model_not_found")


async def handle_count_tokens(request: web.Request) -> web.Response:
    body = await read_json(request)
    # The same validation as a real request, so count_tokens refuses what
    # /v1/messages would refuse.
    convert.anthropic_to_codewhisperer(body, conversation_id="count")
    return web.json_response({"input_tokens": convert.estimate_input_tokens(body)})


async def handle_responses_input_tokens(request: web.Request) -> web.Response:
    """The Responses API's count (``client.responses.input_tokens.count``), estimated."""
    normalised = convert.responses_to_anthropic(await read_json(request))
    convert.anthropic_to_codewhisperer(normalised, conversation_id="count")
    return web.json_response({"object": "response.input_tokens",
                              "input_tokens": convert.estimate_input_tokens(normalised)})


async def handle_stored_response(request: web.Request) -> web.Response:
    """GET, DELETE or cancel a stored response: there are none to find."""
    raise convert.ConversionError(f"no response {request.match_info['response_id']}: "
                                  f"{convert.RESPONSES_NOT_KEPT}", status=404,
                                  param="response_id")


# Usage and the status page ###############################################
#
# ``GET /v1/usage`` (and ``kiro2api usage``) give each account's usage limits
# as ``usage_report`` spells them, read at most once a minute (``fresh_usage``).
# ``GET /`` in a browser is the status page: one HTML page, its CSS and script
# inline, with no data of its own. Its script asks for the client key, keeps it
# in sessionStorage, and every few seconds fetches ``GET /v1/status`` with it
# (behind the key as the API is): the numbers /metrics counts, per account
# what /health and /v1/usage show. Without the key it shows "locked".

NEAR_LIMIT_PERCENT = 90.0  # an account this far into its credits gets a warning
# How long /v1/status waits for usage limits being read before it answers
# with what it has (the read goes on, and the next refresh shows it).
STATUS_USAGE_WAIT_SECONDS = 2.0
# The routes the status page's chart and request count leave out: probes,
# scrapes, and the page's own.
MONITORING_ROUTES = frozenset({"/", "/api/hello", "/health", "/metrics", "/v1/status"})


def epoch_text(seconds: float | None) -> str | None:
    """Epoch seconds as RFC 3339 in UTC with milliseconds (as ``expires_at``)."""
    if seconds is None:
        return None
    return format_expires_at(datetime.fromtimestamp(seconds, timezone.utc))


def usage_report(store: TokenStore) -> Json:
    """One account's usage limits, for ``/v1/usage`` and ``kiro2api usage --json``: what
    the last read gave (``read_at``, None if none did), and why the last read failed
    (``error``); never a token."""
    view, current = store.kiro, store.holder.current
    report: Json = {
        "account": str(store.path), "kind": current.kind if current else None,
        "plan": None, "credits": None, "overage": None, "reset_at": None,
        "seconds_until_reset": None, "days_until_reset": None, "exhausted": None,
        "near_limit": None, "extra_credits": [],
        "read_at": epoch_text(view.usage_read_wall()), "error": view.usage_failure,
    }
    usage = view.usage
    if usage is None:
        return report
    left = None if usage.used is None or usage.limit is None else max(
        0.0, usage.limit - usage.used)
    percent = usage.percent
    reset = usage.reset_at
    report.update(
        plan=usage.plan,
        credits={"used": usage.used, "limit": usage.limit, "left": left,
                 "percent": None if percent is None else round(percent, 1)},
        overage={"enabled": usage.overage, "used": usage.overage_used},
        reset_at=epoch_text(reset),
        seconds_until_reset=None if reset is None else max(
            0, int(reset - store.clock.now().timestamp())),
        days_until_reset=usage.days_until_reset,
        exhausted=usage.exhausted,
        near_limit=percent is not None and percent >= NEAR_LIMIT_PERCENT,
        extra_credits=[{**extra, "expires_at": epoch_text(extra.get("expires_at"))}
                       for extra in usage.extra])
    return report


async def handle_usage(request: web.Request) -> web.Response:
    """``GET /v1/usage``: every account's usage limits, each read at most once a minute."""
    stores = request.app[ACCOUNTS]
    await asyncio.gather(*(fresh_usage(request.app, store) for store in stores))
    return web.json_response({"accounts": [usage_report(store) for store in stores]})


def shown_state(health: Json, usage: Json) -> str:
    """An account's state as the status page names it."""
    state = health["state"]
    if state in ("suspended", "error", "expired"):
        return state
    if state == "exhausted" or usage["exhausted"]:
        return "credits exhausted"
    if health["cooldown_seconds"]:
        return "cooling down"
    return state  # ok, expiring, unknown (not read yet)


def account_status(store: TokenStore, tally: Tally) -> Json:
    """One account on the status page: /health's view of it and its usage limits."""
    health, usage = tally.health_of(store), usage_report(store)
    return {
        "name": health["path"], "kind": health["kind"], "state": shown_state(health, usage),
        "expires_at": health["expires_at"], "seconds_left": health["seconds_left"],
        "host": health["host"], "shape": health["shape"],
        "error": health["error"] or health["cooldown_reason"],
        "credits_spent": health["credits"],
        "usage": {key: usage[key] for key in (
            "plan", "credits", "overage", "reset_at", "seconds_until_reset", "exhausted",
            "near_limit", "extra_credits", "read_at", "error")},
    }


async def handle_status(request: web.Request) -> web.Response:
    """``GET /v1/status``: what the status page shows, from the counters of /metrics."""
    app = request.app
    stores = app[ACCOUNTS]
    reads = [task for store in stores if (task := usage_read(app, store)) is not None]
    if reads:
        await asyncio.wait(reads, timeout=STATUS_USAGE_WAIT_SECONDS)
    tally = await server_tally(app)
    metrics, now = tally.metrics, time.monotonic()
    minutes = metrics.recent.series(now, leave_out=MONITORING_ROUTES)
    return web.json_response({
        "version": __version__,
        "uptime_seconds": round(time.time() - app[CONFIG].started, 3),
        "streams_open": tally.streams_open,
        "credits_spent": round(sum(tally.of_account(store)[2] for store in stores), 6),
        "accounts": [account_status(store, tally) for store in stores],
        "last_hour": {
            "requests": sum(m["requests"] for m in minutes),
            "errors": sum(m["errors"] for m in minutes),
            "by_route": [{"route": route, "status": status, "count": count}
                         for (route, status), count in sorted(metrics.recent.totals(now).items())],
            "minutes": minutes,
        },
    }, headers={"Cache-Control": "no-store"})


def accept_quality(accept: str, media_type: str) -> tuple[int, float]:
    """How an Accept header ranks ``media_type``: the match that names it most closely
    (2 itself, 1 its type/*, 0 */*, -1 none) and the q that match gives it."""
    family = media_type.partition("/")[0] + "/*"
    best, quality = -1, 0.0
    for item in accept.split(","):
        name, *params = (part.strip() for part in item.split(";"))
        name = name.lower()
        rank = {media_type: 2, family: 1, "*/*": 0}.get(name, -1)
        if rank <= best:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        best, quality = rank, q
    return best, quality


def prefers_html(accept: str) -> bool:
    """Whether a client asks for HTML above JSON, naming it (a browser does; curl's */*
    and the SDKs' application/json do not)."""
    html_rank, html = accept_quality(accept, "text/html")
    return html_rank == 2 and html > 0 and html > accept_quality(accept, "application/json")[1]


async def handle_root(request: web.Request) -> web.Response:
    """``GET /`` and ``HEAD /``, ``/api/hello`` too: a small answer, no key needed
    (Claude Code probes ``HEAD /``, and since 2.1.332 ``/api/hello``); a browser's
    ``GET /`` gets the status page."""
    if request.path != "/":
        return web.json_response({"name": "kiro2api", "version": __version__})
    if request.method == "GET" and prefers_html(request.headers.get("Accept", "")):
        body, headers = status_page(open_to_all=request.app[CONFIG].no_auth)
        return web.Response(body=body, content_type="text/html", charset="utf-8",
                            headers={**headers, "Vary": "Accept"})
    return web.json_response({"name": "kiro2api", "version": __version__},
                             headers={"Vary": "Accept"})


@functools.cache
def status_page(*, open_to_all: bool) -> tuple[bytes, dict[str, str]]:
    """The status page and its headers: a Content-Security-Policy that lets only its
    own inline style and script run and only this server be fetched from."""
    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() \
            + "'"
    page = (STATUS_PAGE.replace("@STYLE@", STATUS_STYLE).replace("@SCRIPT@", STATUS_SCRIPT)
            .replace("@OPEN@", "true" if open_to_all else "false"))
    policy = (f"default-src 'none'; style-src {digest(STATUS_STYLE)}; "
              f"script-src {digest(STATUS_SCRIPT)}; connect-src 'self'; img-src data:; "
              f"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page.encode(), {"Content-Security-Policy": policy, "Cache-Control": "no-store",
                           "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}


STATUS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kiro2api</title>
<link rel="icon" href="data:,">
<style>@STYLE@</style>
</head>
<body data-open="@OPEN@">
<section id="locked" hidden>
  <h1>locked</h1>
  <form id="unlock">
    <label for="key">Client key (a server without one takes a Kiro access token:
      <code>kiro2api export</code> prints it)</label>
    <input id="key" type="password" autocomplete="off" spellcheck="false" required>
    <button type="submit">Unlock</button>
  </form>
  <p id="refused" class="error" hidden>The server refused that key.</p>
</section>
<main id="status" hidden>
  <header>
    <h1>kiro2api</h1>
    <span id="version"></span><span id="uptime"></span><span id="live"></span>
    <button id="lock" type="button">Lock</button>
  </header>
  <section class="cards">
    <div class="card"><span>requests, last hour</span><b id="requests"></b></div>
    <div class="card"><span>errors, last hour</span><b id="errors"></b></div>
    <div class="card"><span>streams open</span><b id="streams"></b></div>
    <div class="card"><span>credits spent since start</span><b id="credits"></b></div>
  </section>
  <h2>Accounts</h2>
  <div id="accounts"></div>
  <h2>Last hour</h2>
  <svg id="chart" viewBox="0 0 600 170" role="img"
       aria-label="requests a minute and upstream time to first byte, last hour"></svg>
  <p class="legend"><i class="swatch requests"></i>requests a minute
    <i class="swatch errors"></i>errors <i class="swatch first-byte"></i>upstream time to
    first byte</p>
  <table id="routes">
    <thead><tr><th>route</th><th>status</th><th>requests</th></tr></thead>
    <tbody></tbody>
  </table>
</main>
<script>@SCRIPT@</script>
</body>
</html>
"""

STATUS_STYLE = """
:root { color-scheme: light dark; --fg: #1d2330; --muted: #667085; --line: #d0d5dd;
  --card: #f5f7fa; --accent: #4f6bed; --bad: #d92d20; --warn: #dc6803; --good: #12b76a; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e4e7ec; --muted: #98a2b3; --line: #344054; --card: #1d2939; } }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 60rem; padding: 1rem; color: var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: .4rem 1rem; }
header #lock { margin-left: auto; }
h1 { font-size: 1.4rem; margin: 0; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
#version, #uptime, #live, .muted { color: var(--muted); }
#live.stale { color: var(--bad); }
form { display: grid; gap: .5rem; max-width: 26rem; }
input, button { font: inherit; padding: .45rem .6rem; border: 1px solid var(--line);
  border-radius: .4rem; background: transparent; color: inherit; }
button { cursor: pointer; }
.cards { display: grid; gap: .6rem; grid-template-columns: repeat(auto-fit, minmax(9rem, 1fr));
  margin-top: 1rem; }
.card, .account { background: var(--card); border-radius: .6rem; padding: .7rem .9rem; }
.card span { display: block; color: var(--muted); font-size: .85rem; }
.card b { font-size: 1.5rem; font-variant-numeric: tabular-nums; }
#accounts { display: grid; gap: .6rem; }
.account h3 { margin: 0 0 .4rem; font-size: 1rem; word-break: break-all; }
.badge { display: inline-block; font-size: .8rem; padding: 0 .45rem; margin-left: .3rem;
  border-radius: 1rem; border: 1px solid var(--line); font-weight: normal; }
.state-ok, .state-expiring { color: var(--good); }
.state-cooling, .state-unknown { color: var(--warn); }
.state-bad { color: var(--bad); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .15rem .8rem; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.bar { height: .6rem; background: var(--line); border-radius: .3rem; overflow: hidden;
  margin: .3rem 0 .1rem; }
.fill { height: 100%; width: 0; background: var(--accent); }
.fill.near { background: var(--warn); }
.fill.full { background: var(--bad); }
.error { color: var(--bad); margin: .4rem 0 0; overflow-wrap: anywhere; }
svg { width: 100%; height: auto; display: block; }
svg .requests { fill: var(--accent); }
svg .errors { fill: var(--bad); }
svg .first-byte { fill: none; stroke: var(--warn); stroke-width: 2; }
svg .first-byte-point { fill: var(--warn); }
svg text { fill: var(--muted); font-size: 11px; }
@media (max-width: 40rem) { svg text { font-size: 20px; } }
svg .axis { stroke: var(--line); }
.legend { color: var(--muted); font-size: .85rem; }
.swatch { display: inline-block; width: .8rem; height: .8rem; margin: 0 .3rem 0 .6rem;
  vertical-align: -.1rem; border-radius: .15rem; }
.swatch.requests { background: var(--accent); }
.swatch.errors { background: var(--bad); }
.swatch.first-byte { background: var(--warn); }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid var(--line); }
td:last-child, th:last-child { text-align: right; }
"""

STATUS_SCRIPT = """
"use strict";
const REFRESH_MS = 3000;
const KEY_NAME = "kiro2api-key";
const SVG = "http://www.w3.org/2000/svg";
const openToAll = document.body.dataset.open === "true";
const byId = (id) => document.getElementById(id);
let key = sessionStorage.getItem(KEY_NAME) || "";
let timer = null;

function element(tag, className, text) {
  const made = document.createElement(tag);
  if (className) made.className = className;
  if (text !== undefined) made.textContent = text;
  return made;
}

function duration(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  if (seconds < 60) return seconds + " s";
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return minutes + " min";
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return hours + " h " + (minutes % 60) + " min";
  return Math.floor(hours / 24) + " d " + (hours % 24) + " h";
}

function when(text) {
  return text ? text.slice(0, 16).replace("T", " ") + " UTC" : "unknown";
}

function number(value) {
  return value === null || value === undefined ? "?" : String(Math.round(value * 100) / 100);
}

function lock(refused) {
  clearTimeout(timer);
  key = "";
  sessionStorage.removeItem(KEY_NAME);
  byId("status").hidden = true;
  byId("accounts").replaceChildren();
  byId("routes").tBodies[0].replaceChildren();
  byId("chart").replaceChildren();
  byId("refused").hidden = !refused;
  byId("locked").hidden = false;
  byId("key").focus();
}

async function refresh() {
  clearTimeout(timer);
  let response;
  try {
    response = await fetch("/v1/status", {
      headers: key ? {"Authorization": "Bearer " + key} : {},
      cache: "no-store", credentials: "omit"});
  } catch (failure) {
    stale("unreachable");
    return;
  }
  if (response.status === 401 || response.status === 403) {
    lock(true);
    return;
  }
  if (!response.ok) {
    stale("HTTP " + response.status);
    return;
  }
  show(await response.json());
  timer = setTimeout(refresh, REFRESH_MS);
}

function stale(why) {
  byId("live").textContent = why;
  byId("live").className = "stale";
  timer = setTimeout(refresh, REFRESH_MS);
}

function show(status) {
  byId("locked").hidden = true;
  byId("status").hidden = false;
  byId("version").textContent = "version " + status.version;
  byId("uptime").textContent = "up " + duration(status.uptime_seconds);
  byId("live").textContent = "updated " + new Date().toLocaleTimeString();
  byId("live").className = "";
  byId("requests").textContent = status.last_hour.requests;
  byId("errors").textContent = status.last_hour.errors;
  byId("streams").textContent = status.streams_open;
  byId("credits").textContent = number(status.credits_spent);
  byId("accounts").replaceChildren(...status.accounts.map(account));
  chart(status.last_hour.minutes);
  byId("routes").tBodies[0].replaceChildren(...status.last_hour.by_route.map((row) => {
    const tr = element("tr");
    tr.append(element("td", "", row.route), element("td", "", row.status),
              element("td", "", row.count));
    return tr;
  }));
}

const STATE_CLASSES = {"ok": "state-ok", "expiring": "state-ok", "unknown": "state-unknown",
                       "cooling down": "state-cooling"};

function account(entry) {
  const card = element("article", "account");
  const title = element("h3", "", entry.name);
  title.append(" ", element("span", "badge", entry.kind || "kind unknown"), " ",
               element("span", "badge " + (STATE_CLASSES[entry.state] || "state-bad"),
                       entry.state));
  const facts = element("dl");
  const fact = (name, value) => {
    const dd = element("dd");
    dd.append(value);
    facts.append(element("dt", "", name), dd);
  };
  fact("token", entry.expires_at ? "expires " + when(entry.expires_at) +
       (entry.seconds_left > 0 ? " (in " + duration(entry.seconds_left) + ")" : " (expired)")
       : "no expiry known");
  fact("serving", entry.host ? entry.host + " (" + entry.shape + ")" : "not yet");
  const usage = entry.usage;
  if (usage.credits) {
    fact("credits", credits(usage));
    fact("plan", usage.plan || "unknown");
    fact("resets", usage.reset_at ? when(usage.reset_at) + " (in " +
         duration(usage.seconds_until_reset) + ")" : "unknown");
    for (const extra of usage.extra_credits) {
      fact(extra.kind === "bonus" ? "bonus" : "trial", extra.name + ": " + number(extra.used) +
           " of " + number(extra.limit) + (extra.expires_at ? ", until " +
           when(extra.expires_at) : ""));
    }
  } else {
    fact("credits", usage.error ? "not known" : "being read");
  }
  fact("spent here", number(entry.credits_spent) + " since start");
  card.append(title, facts);
  for (const problem of [entry.error, usage.error]) {
    if (problem) card.append(element("p", "error", problem));
  }
  return card;
}

function credits(usage) {
  const box = element("div");
  const bar = element("div", "bar");
  const percent = usage.credits.percent || 0;
  const fill = element("div", "fill" + (usage.exhausted ? " full" : usage.near_limit ?
                                        " near" : ""));
  fill.style.width = Math.min(100, percent) + "%";
  bar.append(fill);
  box.append(bar, number(usage.credits.used) + " of " + number(usage.credits.limit) +
             " used (" + percent + " %)" + (usage.overage && usage.overage.enabled ?
             ", overage on" : ""));
  return box;
}

function shape(tag, attributes, text) {
  const made = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, value);
  if (text !== undefined) made.textContent = text;
  return made;
}

function chart(minutes) {
  const width = 600, top = 24, height = 120, slot = width / minutes.length;
  const most = Math.max(1, ...minutes.map((m) => m.requests));
  const slowest = Math.max(1, ...minutes.map((m) => m.first_byte_ms || 0));
  const parts = [shape("line", {"class": "axis", x1: 0, x2: width, y1: top + height,
                                y2: top + height})];
  const points = [], dots = [];
  minutes.forEach((m, i) => {
    const x = i * slot;
    const tall = height * m.requests / most, bad = height * m.errors / most;
    if (m.requests) parts.push(shape("rect", {"class": "requests", x: x + 1,
      y: top + height - tall, width: slot - 2, height: tall}));
    if (m.errors) parts.push(shape("rect", {"class": "errors", x: x + 1,
      y: top + height - bad, width: slot - 2, height: bad}));
    if (m.first_byte_ms !== null) {
      const y = top + height - height * m.first_byte_ms / slowest;
      points.push((x + slot / 2) + "," + y);
      dots.push(shape("circle", {"class": "first-byte-point", cx: x + slot / 2, cy: y, r: 3}));
    }
  });
  if (points.length) parts.push(shape("polyline", {"class": "first-byte",
                                                   points: points.join(" ")}), ...dots);
  parts.push(shape("text", {x: 0, y: 18}, "up to " + most + " a minute"),
             shape("text", {x: width, y: 18, "text-anchor": "end"},
                   "first byte up to " + Math.round(slowest) + " ms"),
             shape("text", {x: 0, y: top + height + 22}, "60 min ago"),
             shape("text", {x: width, y: top + height + 22, "text-anchor": "end"}, "now"));
  byId("chart").replaceChildren(...parts);
}

byId("unlock").addEventListener("submit", (event) => {
  event.preventDefault();
  key = byId("key").value.trim();
  byId("key").value = "";
  if (!key) return;
  sessionStorage.setItem(KEY_NAME, key);
  refresh();
});
byId("lock").addEventListener("click", () => lock(false));

if (key || openToAll) {
  refresh();
} else {
  lock(false);
}
"""


# Relay ####################################################################
#
# Every client API is served by ``relay``: its ``convert.ClientApi`` says how
# its body becomes an Anthropic one and how its answer is spelled; what is
# the same for all of them (the upstream call, streaming, keep-alives, the
# idle timeout, disconnects, shutdown, the in-band failure ending) is here once.


async def collect_events(upstream: UpstreamAnswer,
                         assembler: convert.Assembler) -> list[convert.Event]:
    """Every neutral event of a whole answer (the non-streamed answer); a failure
    propagates to the error middleware, which answers it with ``failure_of``."""
    events: list[convert.Event] = []
    async for frames in upstream_frames(upstream):
        for headers, payload in frames:
            assembler.feed_into(events, headers, payload)
        if assembler.stop_reason is not None:
            break
    return events + assembler.finish()


# What can go wrong once the upstream has answered 200.
STREAM_FAILURES = (eventstream.EventStreamError, convert.StreamError, aiohttp.ClientError,
                   asyncio.TimeoutError)


def end_with_error(request: web.Request, renderer: convert.Renderer,
                   events: list[convert.Event], failure: convert.Failure) -> bytes:
    """What a failed stream still sends: the events the read gave before it, then the error."""
    request[REQUEST_LOG].failure = failure.message
    try:
        return renderer.render(events) + renderer.error(failure)
    except Exception:  # nothing may escape once the headers are out
        log.exception("could not render the error that ends the stream")
        return renderer.error(INTERNAL_FAILURE)


async def send_keepalives(response: web.StreamResponse, renderer: convert.Renderer,
                          interval: float, written: Callable[[], int]) -> None:
    """Write the renderer's keep-alive whenever the stream has been quiet for ``interval``
    (``written()``, the bytes the stream has sent, has not moved)."""
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        last = written()
        while True:
            await asyncio.sleep(interval)
            if written() == last:
                await response.write(renderer.keepalive())
            last = written()


SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


# What the relay runs on each read's events once they are out (the safeguard check).
EventCheck = Callable[[list[convert.Event]], Awaitable[None]]


@dataclass
class Relayed:
    """A streamed answer as it goes: the round being relayed, one read's events (what
    a failure still sends), and the bytes sent, which the keep-alives watch (aiohttp's
    body_length restarts from 0 at each drain, or stays 0 until the end)."""

    upstream: UpstreamAnswer
    assembler: convert.Assembler
    events: list[convert.Event] = field(default_factory=list)
    sent: int = 0


async def stream_sse(request: web.Request, upstream: UpstreamAnswer,
                     assembler: convert.Assembler, renderer: convert.Renderer,
                     check: EventCheck | None = None,
                     search: WebSearchRun | None = None) -> web.StreamResponse:
    """Relay an upstream answer as server-sent events, one write per upstream read.

    A failure after the headers are out ends the stream with the renderer's
    in-band error and never with its normal ending. ``check`` sees each
    read's events after they were written; ``search`` runs the web searches the
    answer asks for, and the rounds of the answer that follow them.
    """
    config = request.app[CONFIG]
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    now = Relayed(upstream, assembler)
    keepalive = asyncio.create_task(
        send_keepalives(response, renderer, config.ping_interval, lambda: now.sent))
    streams = request.app[STREAMS]
    task = asyncio.current_task()
    streams.add(task)
    try:
        tail = await relay_rounds(response, renderer, now, check, search)
    except (*STREAM_FAILURES, UpstreamError, TokenError) as exc:  # the last two: a search round
        # What the read rendered before the failure still goes out, then the error.
        failure = failure_of(exc)
        log.warning("stream failed after the response started: %s", failure.message)
        tail = end_with_error(request, renderer, now.events, failure)
    except ConnectionError:
        log.debug("client went away mid-stream")
        request[REQUEST_LOG].failure = "client disconnected"
        return response
    except asyncio.CancelledError:
        if not request.app[SHUTTING_DOWN].is_set():
            # The client went away (aiohttp cancels its handler); leaving
            # the ``async with`` of the caller closes the upstream at once.
            request[REQUEST_LOG].failure = "client disconnected"
            raise
        tail = end_with_error(request, renderer, now.events, SHUTDOWN_FAILURE)
    except Exception:
        # A bug of ours: the headers are out, so the error middleware can no
        # longer answer; the client must still see a failure, not a clean end.
        log.exception("unhandled error while streaming %s", request.path)
        tail = end_with_error(request, renderer, [], INTERNAL_FAILURE)
    finally:
        keepalive.cancel()
        streams.discard(task)
        request[REQUEST_LOG].bytes_out = now.sent
        now.upstream.close()  # a later search round's (the first is the caller's too)
        count_credits(request, now.upstream, now.assembler)
    with contextlib.suppress(ConnectionError):
        await response.write_eof(tail)  # the last events and the end of the body: one send
        request[REQUEST_LOG].bytes_out += len(tail)
    return response


async def relay_rounds(response: web.StreamResponse, renderer: convert.Renderer, now: Relayed,
                       check: EventCheck | None, search: WebSearchRun | None) -> bytes:
    """Write the answer's events as each read brings them, round after round (with
    searches); return the bytes that end it."""
    data = renderer.start()
    now.sent += len(data)
    await response.write(data)
    events, upstream, assembler = now.events, now.upstream, now.assembler
    feed = assembler.feed_into
    while True:
        async for frames in upstream_frames(upstream):
            for headers, payload in frames:  # unpacking: cheaper than two attribute reads
                feed(events, headers, payload)
            if events:
                data = renderer.render(events)
                now.sent += len(data)
                await response.write(data)
                if check is not None:
                    await check(events)
                events.clear()
            if assembler.stop_reason is not None:
                break  # refusal, stop sequence or output limit: nothing more will count
        if search is None:
            tail = renderer.render(assembler.finish())
            break
        tail, step = await search.end_round(renderer, upstream, assembler)
        if step is None:
            break
        now.sent += len(tail)
        await response.write(tail)  # the round so far, and the search results
        upstream, assembler = now.upstream, now.assembler = step
        feed = assembler.feed_into
    return tail + renderer.finish(assembler.stop_reason, usage_of(assembler, search),
                                  assembler.stop_sequence)


async def refuse_in_band(request: web.Request, renderer: convert.Renderer,
                         failure: convert.Failure) -> web.StreamResponse:
    """A stream that opens and at once ends with ``failure`` (a refusal before any answer)."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    data = renderer.start() + end_with_error(request, renderer, [], failure)
    with contextlib.suppress(ConnectionError):
        await response.write_eof(data)
        request[REQUEST_LOG].bytes_out = len(data)
    return response


async def relay(request: web.Request, api: convert.ClientApi) -> web.StreamResponse:
    """Serve one request of ``api``: convert it, call Kiro, answer streamed or whole."""
    body = await read_json(request)
    normalised = api.normalise(body)
    if isinstance(normalised, dict) and isinstance(normalised.get("model"), str):
        normalised["model"] = await served_model(request.app, normalised["model"])
    conversation_id = conversation_of(request, body, normalised)
    prepared = convert.anthropic_to_codewhisperer(normalised, conversation_id=conversation_id)
    model = normalised["model"]
    request[REQUEST_LOG].model = logged_model(model)
    input_tokens = convert.estimate_input_tokens(normalised)
    assembler = convert.Assembler.for_request(
        prepared, input_tokens=input_tokens, client_model=model,
        window=request.app[MODEL_CACHE].windows.get(prepared.model_id))
    renderer = api.renderer(body, convert.Answer(
        id=new_id(api.id_prefix), model=model, created=int(time.time()),
        input_tokens=input_tokens))
    streamed = body.get("stream") is True
    try:
        upstream = await open_upstream(request, prepared)
    except (UpstreamError, TokenError) as exc:
        failure = await name_the_models(request.app, failure_of(exc))
        if not (streamed and api.refusals_in_band):
            raise UpstreamError(failure) from exc
        return await refuse_in_band(request, renderer, failure)
    check = safeguard_check(request, body, renderer)
    search = WebSearchRun(request, normalised, prepared, conversation_id) \
        if prepared.web_search else None
    async with upstream:
        if streamed:
            response = await stream_sse(request, upstream, assembler, renderer,
                                        both(check, search and search.observe), search)
            request[REQUEST_LOG].usage = assembler.usage_source
            return response
        return await answer_whole(request, upstream, assembler, renderer, check, search)


async def answer_whole(request: web.Request, upstream: UpstreamAnswer,
                       assembler: convert.Assembler, renderer: convert.Renderer,
                       check: EventCheck | None, search: WebSearchRun | None) -> web.Response:
    """The non-streamed answer: every event, and every search round, folded into one."""
    events = latest = await collect_events(upstream, assembler)
    while search is not None:
        await search.observe(latest)  # the round's own events, once
        found, step = await search.next_round(upstream, assembler)
        events = events + found
        if step is None:
            break
        upstream, assembler = step
        try:
            latest = await collect_events(upstream, assembler)
        finally:
            upstream.close()
        events += latest
    count_credits(request, upstream, assembler)
    request[REQUEST_LOG].usage = assembler.usage_source
    if check is not None:
        await check(events)
    return web.json_response(renderer.collect(events, assembler.stop_reason,
                                              usage_of(assembler, search),
                                              assembler.stop_sequence))


# Web search ###############################################################
#
# A request that offers the hosted search tool has its searches run here, on
# Kiro's MCP endpoint (PROTOCOL-2026.md 10.14). A round of the answer that asks
# for searches ends with their results, and the model is asked again with
# them: one client request, one answer, however many rounds (SEARCH_ROUNDS at
# most). A search that fails is an error result the model reads, never a
# broken answer.

MCP_TARGETS = {"kas": "KiroRuntimeService.InvokeMCP"}  # by dialect; the rest:
MCP_TARGET = "AmazonCodeWhispererStreamingService.InvokeMCP"


class SearchFailed(Exception):
    """A search that found nothing to show; ``code`` is Anthropic's error code."""

    def __init__(self, code: str, why: str) -> None:
        super().__init__(why)
        self.code = code


async def search_web(app: web.Application, store: TokenStore, query: str,
                     search: convert.WebSearch) -> tuple[Json, ...]:
    """One search on Kiro's MCP endpoint, on the host the account answers on, with
    its profile ARN as header and body field. Raises SearchFailed."""
    config = app[CONFIG]
    credentials = await store.credentials()
    way = store.kiro.order(ways_for(credentials.kind, config.upstream))[0]
    arn = await profile_for(app, store, credentials, way)
    headers = kiro_headers(config, store, credentials, way.dialect, arn)
    headers["x-amz-target"] = MCP_TARGETS.get(way.dialect.name, MCP_TARGET)
    body = convert.mcp_search_request(convert.search_query(query, search),
                                      new_id("web_search_tooluse_"))
    if arn:
        headers["x-amzn-kiro-profile-arn"] = body["profileArn"] = arn
    url = region_url(way.url, kiro_region(credentials, arn, config)) + (
        "/" if way.dialect.name in MCP_TARGETS else "/mcp")
    try:
        status, answer = await json_call(app, "POST", url, headers, data=json.dumps(body))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise SearchFailed("unavailable", describe(exc) or "timed out") from None
    if status == 429:
        raise SearchFailed("too_many_requests", "Kiro throttled the search")
    results = convert.mcp_search_results(answer, search) if status == 200 else None
    if results is None:
        raise SearchFailed("unavailable", f"HTTP {status}: {json.dumps(answer)[:200]}")
    return results


class WebSearchRun:
    """One request's web searches: what each round of the answer said and asked,
    the searches run (``max_uses``), and the next round."""

    def __init__(self, request: web.Request, body: Json, prepared: convert.Prepared,
                 conversation_id: str) -> None:
        self.request = request
        self.body = body  # the Anthropic body, with every round so far
        self.spec = prepared.web_search
        self.conversation_id = conversation_id
        self.used = 0  # searches run
        self.rounds = 0
        self.texts: list[str] = []  # this round's text
        self.spent = convert.Usage(0)  # the usage of the rounds before this one
        self.store: TokenStore | None = None  # the account that answered the last round

    async def observe(self, events: list[convert.Event]) -> None:
        """Note what the round said (an ``EventCheck``: the relay shows it each read)."""
        self.texts += [event.text for event in events if type(event) is convert.Text]

    async def end_round(self, renderer: convert.Renderer, upstream: UpstreamAnswer,
                        assembler: convert.Assembler,
                        ) -> tuple[bytes, tuple[UpstreamAnswer, convert.Assembler] | None]:
        """A streamed round is over: the bytes of its last events and of its searches'
        results, and the next round, if any."""
        ending = assembler.finish()
        await self.observe(ending)
        found, step = await self.next_round(upstream, assembler)
        return renderer.render(ending) + renderer.render(found), step

    def usage(self, last: convert.Usage) -> convert.Usage:
        """The answer's usage: every round's, and the searches run."""
        spent = self.spent
        return convert.Usage(
            spent.input_tokens + last.input_tokens, spent.output_tokens + last.output_tokens,
            _sum(spent.cache_read_input_tokens, last.cache_read_input_tokens),
            _sum(spent.cache_creation_input_tokens, last.cache_creation_input_tokens),
            web_search_requests=self.used)

    async def next_round(self, upstream: UpstreamAnswer, assembler: convert.Assembler,
                         ) -> tuple[list[convert.Event],
                                    tuple[UpstreamAnswer, convert.Assembler] | None]:
        """Run the searches this round asked for: their results, and the next round
        (None when the answer is over: no search asked, a client tool to run, cut)."""
        calls = assembler.searches
        if not calls:
            return [], None
        self.store = upstream.store
        last_round = self.rounds + 1 >= convert.SEARCH_ROUNDS
        found = [await self.run(call, refuse=last_round) for call in calls]
        if assembler.tool_calls or last_round or assembler.stop_reason != "end_turn":
            return found, None  # the client's tools to run, or a cut answer: it ends here
        count_credits(self.request, upstream, assembler)
        upstream.close()
        self.spent = self.usage(assembler.usage)
        self.rounds += 1
        self.body = convert.search_continuation(self.body, self.texts, calls, found)
        self.texts = []
        prepared = convert.anthropic_to_codewhisperer(self.body,
                                                      conversation_id=self.conversation_id)
        following = await open_upstream(self.request, prepared)
        return found, (following, convert.Assembler.for_request(
            prepared, input_tokens=convert.estimate_input_tokens(self.body),
            client_model=self.body["model"]))

    async def run(self, call: convert.SearchCall, *, refuse: bool) -> convert.SearchResult:
        """One search, or the error result that says why there was none."""
        if refuse or (self.spec.max_uses is not None and self.used >= self.spec.max_uses):
            return convert.SearchResult(call.id, error="max_uses_exceeded")
        self.used += 1
        store = self.store or account_order(self.request.app[ACCOUNTS])[0]
        started = time.monotonic()
        try:
            results = await search_web(self.request.app, store, call.query, self.spec)
        except (SearchFailed, TokenError) as exc:
            code = exc.code if isinstance(exc, SearchFailed) else "unavailable"
            log.warning("a web search failed (%s): %s", code, exc)
            return convert.SearchResult(call.id, error=code)
        log.info("web search: %d results in %.1f s", len(results), time.monotonic() - started)
        return convert.SearchResult(call.id, results)


def both(first: EventCheck | None, second: EventCheck | None) -> EventCheck | None:
    """One check that runs ``first`` and ``second`` (either may be None)."""
    if first is None or second is None:
        return first or second

    async def check(events: list[convert.Event]) -> None:
        await first(events)
        await second(events)

    return check


def usage_of(assembler: convert.Assembler, search: WebSearchRun | None) -> convert.Usage:
    """An answer's usage: its assembler's, or with searches every round's."""
    return assembler.usage if search is None else search.usage(assembler.usage)


def _sum(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else (a or 0) + (b or 0)


# Safeguards ###############################################################
#
# With --safeguards kiro, each tool call of an answer to a request that
# carries Claude Code's ``safeguards`` is judged by a short call to a small
# Kiro model, once the call is complete and written (PROTOCOL-2026.md
# 10.17.4): the text before it is not held back, and the verdicts go in the
# final message_delta. A check that fails or takes too long is "unavailable"
# for its call, never "not_flagged".

SAFEGUARD_MODEL = "claude-haiku-4.5"
SAFEGUARD_SECONDS = 8.0


def safeguard_check(request: web.Request, body: Any,
                    renderer: convert.Renderer) -> EventCheck | None:
    """The check of ``renderer``'s tool calls, or None when none is to be made."""
    verdicts = getattr(renderer, "verdicts", None)
    if request.app[CONFIG].safeguards != "kiro" or verdicts is None or \
            not convert.wants_safeguards(body):
        return None

    async def check(events: list[convert.Event]) -> None:
        for event in events:
            if type(event) is convert.ToolCall:
                verdicts[event.id] = await judge(request, body, event)

    return check


async def judge(request: web.Request, body: Json, call: convert.ToolCall) -> Json:
    """One tool call's verdict, from a small model under SAFEGUARD_SECONDS."""
    started = time.monotonic()
    question = convert.safeguard_request(body, call, SAFEGUARD_MODEL)
    try:
        verdict = await asyncio.wait_for(ask_judge(request, question), SAFEGUARD_SECONDS)
    except asyncio.TimeoutError:
        verdict = {"type": "unavailable", "reason": "timeout"}
    except (UpstreamError, TokenError, *STREAM_FAILURES) as exc:
        log.warning("the safeguard check of a %s call failed: %s", call.name,
                    failure_of(exc).message)
        verdict = {"type": "unavailable", "reason": "error"}
    request.app[METRICS].safeguard_checks[verdict.get("outcome") or verdict["reason"]] += 1
    log.info("safeguard check of %s call %s: %s in %.1f s (one %s call)", call.name, call.id,
             verdict.get("outcome") or verdict["reason"], time.monotonic() - started,
             SAFEGUARD_MODEL)
    return verdict


async def ask_judge(request: web.Request, question: Json) -> Json:
    prepared = convert.anthropic_to_codewhisperer(question, conversation_id=random_uuid())
    assembler = convert.Assembler.for_request(prepared, input_tokens=1,
                                              client_model=SAFEGUARD_MODEL)
    upstream = await open_upstream(request, prepared)
    async with upstream:
        events = await collect_events(upstream, assembler)
    count_credits(request, upstream, assembler)
    return convert.safeguard_verdict("".join(e.text for e in events
                                             if type(e) is convert.Text))


def conversation_of(request: web.Request, body: Any, normalised: Json) -> str:
    """The conversationId of a request: its session's, else a new one."""
    key = convert.session_key(body, normalised, request.headers)
    if key is None:
        return random_uuid()
    return convert.session_conversation_id(presented_key(request), key)


async def served_model(app: web.Application, name: str) -> str:
    """The model that serves a request for ``name``: ``--model-map``'s choice, else
    ``name``, or for a Claude id the account does not list, the newest model of its
    family the account lists (named in the answer; logged once per id)."""
    config = app[CONFIG]
    name = config.model_map.get(name, name)
    kiro_id = convert.resolve_model(name)
    if kiro_id in KNOWN_MODEL_IDS or convert.model_family(kiro_id) is None:
        return name  # ids Kiro has served for long, and others' ids, go as they are
    cache = app[MODEL_CACHE]
    await cached_models(app)
    stand_in = convert.stand_in_model(kiro_id, cache.listed) if cache.listed else None
    if stand_in is None:
        return name
    if name not in cache.stood_in:
        cache.stood_in.add(name)
        log.warning("the account does not list model %s: serving it with %s", name, stand_in)
    return stand_in


KNOWN_MODEL_IDS = frozenset(kiro_id for _, kiro_id, _ in convert.MODELS)


async def name_the_models(app: web.Application, failure: convert.Failure) -> convert.Failure:
    """A model Kiro does not have: the answer names those the account lists."""
    if failure.code != "model_not_found":
        return failure
    await cached_models(app)
    listed = app[MODEL_CACHE].listed
    if not listed:
        return failure
    return failure._replace(message=f"{failure.message}; this account has: "
                                    f"{', '.join(sorted(listed))}")


def count_credits(request: web.Request, upstream: UpstreamAnswer,
                  assembler: convert.Assembler) -> None:
    """Add what Kiro billed for an answer to its request's and its account's credits."""
    entry = request[REQUEST_LOG]
    if assembler.credits is None:
        return
    entry.credits = (entry.credits or 0.0) + assembler.credits
    if upstream.store is not None:
        upstream.store.credits += assembler.credits


def relay_handler(api: convert.ClientApi) -> Callable[[web.Request],
                                                      Awaitable[web.StreamResponse]]:
    """The route handler that serves ``api``."""
    async def handle(request: web.Request) -> web.StreamResponse:
        return await relay(request, api)

    handle.__name__ = handle.__qualname__ = f"relay_{api.name.replace('-', '_')}"
    return handle


# The client APIs served: (route, the path prefix whose errors take its
# envelope, the API). Serving another is one ``convert.ClientApi`` and one row.
API_ROUTES = (
    ("/v1/messages", "/v1/messages", convert.ANTHROPIC_MESSAGES),
    ("/v1/chat/completions", "/v1/chat/", convert.OPENAI_CHAT),
    ("/v1/responses", "/v1/responses", convert.OPENAI_RESPONSES),
    ("/responses", "/responses", convert.OPENAI_RESPONSES),
)


# Middlewares ##############################################################


def envelope_api(request: web.Request) -> convert.ClientApi:
    """The client API whose envelope errors take: that of the route's family, and on
    the shared model routes OpenAI's when the client does not look like Anthropic's
    (whose SDKs send ``anthropic-version``, and the key as ``x-api-key`` unless told
    otherwise); Anthropic's elsewhere."""
    path = request.path
    for _, family, api in API_ROUTES:
        if path.startswith(family):
            return api
    headers = request.headers
    if path.startswith("/v1/models") and not (
            "anthropic-version" in headers or "x-api-key" in headers):
        return convert.OPENAI_CHAT
    return convert.ANTHROPIC_MESSAGES


def error_response(request: web.Request, failure: convert.Failure, *,
                   headers: dict[str, str] | None = None) -> web.Response:
    """``failure`` in the envelope of the API the route belongs to."""
    if failure.retry_after:
        headers = {**(headers or {}), "Retry-After": failure.retry_after}
    request[REQUEST_LOG].failure = failure.message
    api = envelope_api(request)
    return web.json_response(api.error_body(failure), status=api.status(failure),
                             headers=headers)


def http_failure(request: web.Request, exc: web.HTTPException) -> convert.Failure:
    """An HTTP error of aiohttp's (no route, wrong method, too large) in our words."""
    message = {413: f"request body is larger than {request.app[CONFIG].max_body_bytes} bytes",
               404: f"no route {request.path}",
               405: f"method {request.method} is not allowed on {request.path}"}.get(exc.status)
    failure = failure_of(exc)
    return failure._replace(message=message) if message else failure


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn every failure before the response starts into the route's error envelope."""
    started = time.monotonic()
    request[REQUEST_LOG] = RequestLog(id=new_id("req_"))
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # 405 must say which methods the route takes (RFC 9110 15.5.6).
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        response = error_response(request, http_failure(request, exc), headers=allow)
    except Exception as exc:
        failure = failure_of(exc)
        if failure is INTERNAL_FAILURE:
            log.exception("unhandled error on %s %s", request.method, request.path)
        response = error_response(request, failure)
    finally:
        log_request(request, response, started)
    return response


QUIET_PATHS = frozenset({"/", "/api/hello", "/health", "/metrics", "/v1/status"})


def route_label(request: web.Request) -> str:
    """The route a request is logged and counted under: its resource, also when the
    method was wrong (a 405 has no resource of its own); "other" for paths of none, so
    that the labels stay few."""
    resource = request.match_info.route.resource
    if resource is None and isinstance(getattr(request.match_info, "http_exception", None),
                                       web.HTTPMethodNotAllowed):
        for candidate in request.app.router.resources():
            info = candidate.get_info()
            if info.get("path") == request.path or (
                    "pattern" in info and info["pattern"].fullmatch(request.path)):
                resource = candidate
                break
    return resource.canonical if resource is not None else "other"


def log_request(request: web.Request, response: web.StreamResponse | None,
                started: float) -> None:
    """Count the request and log its one line (none for probes and scrapes that
    succeed)."""
    seconds = time.monotonic() - started
    status = response.status if response is not None else 499
    if isinstance(response, web.StreamResponse) and response.prepared and \
            request[REQUEST_LOG].failure == "client disconnected":
        status = 499  # the nginx convention for a client that hung up
    route = route_label(request)
    request.app[METRICS].count_request(route, status, seconds)
    if request.path in QUIET_PATHS and status < 400:
        return  # a refused scrape (a scraper without the key) is logged
    entry = request[REQUEST_LOG]
    # A Response's body goes out after this (when the handler has returned).
    body = getattr(response, "body", None) if response is not None and not response.prepared \
        else None
    fields = {
        "request_id": entry.id, "method": request.method, "route": route,
        "model": entry.model, "status": status, "duration_ms": round(seconds * 1000, 1),
        "upstream_first_byte_ms": None if entry.upstream_first_byte is None
        else round(entry.upstream_first_byte * 1000, 1),
        "bytes_out": len(body) if isinstance(body, (bytes, bytearray)) else entry.bytes_out,
        "retries": entry.retries, "failovers": entry.failovers, "account": entry.account,
        "credits": None if entry.credits is None else round(entry.credits, 6),
        "usage": entry.usage,
        "failure": entry.failure,
    }
    text = " ".join(f"{k}={v}" for k, v in fields.items()
                    if v is not None and k != "failure")
    if entry.failure:
        text += f" ({entry.failure})"
    # What the client sent (a path, a model) must not start a line of its own.
    text = _CONTROL_CHARACTER.sub(lambda m: m[0].encode("unicode_escape").decode(), text)
    log.info("%s", text, extra={"fields": fields})


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    entry = request.get(REQUEST_LOG)
    if entry is not None:
        response.headers["request-id"] = entry.id


def same_secret(presented: str, expected: str) -> bool:
    """Compare in constant time, whatever the lengths: both sides are hashed first, so
    the time taken tells nothing about the key, not even its length.

    Header values that were not UTF-8 arrive with surrogate escapes; they are
    encoded back to their bytes rather than failing."""
    def digest(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()

    return hmac.compare_digest(digest(presented), digest(expected))


def presented_key(request: web.Request) -> str:
    key = request.headers.get("x-api-key", "")
    if not key:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            key = value.strip()
    return key


# The paths behind the client key: the API, Codex's short route, and the
# metrics (whose labels name token files). /health answers everyone, and
# shows its details only to a caller with the key (handle_health).
KEYED_PATHS = ("/v1/", "/responses", "/metrics")


async def client_allowed(request: web.Request) -> bool:
    """Whether the caller may use the API: ``--no-auth``, or the client key, or
    (with no key configured) an access token of one of the accounts."""
    config = request.app[CONFIG]
    if config.no_auth:
        return True
    key = presented_key(request)
    if not key:
        return False
    if config.api_key is not None:
        return same_secret(key, config.api_key)
    return await knows_access_token(request.app, key)


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Require the client key (or, with no key configured, a Kiro access token) on the API."""
    if not request.path.startswith(KEYED_PATHS) or await client_allowed(request):
        return await handler(request)
    config, stores = request.app[CONFIG], request.app[ACCOUNTS]
    if config.api_key is None and stores and all(s.holder.current is None for s in stores):
        # No login read yet: no token to check the client's against.
        problems = "; ".join(str(s.error or f"{s.path} has not been read yet") for s in stores)
        raise TokenFileError(
            f"kiro2api has no Kiro login yet: {problems}. kiro2api reads the file again "
            f"within {config.watch_interval:g} s of its appearing or changing; then send its "
            f"access token (kiro2api export prints it)")
    raise convert.ConversionError(
        "missing or wrong API key: send it as x-api-key or Authorization: Bearer"
        if config.api_key is not None else
        "missing or unknown token: send the Kiro access token (kiro2api export prints it)",
        status=401, code="invalid_api_key")


async def knows_access_token(app: web.Application, token: str) -> bool:
    """Whether ``token`` is an access token of one of the accounts: one held, or
    one the file holds now (refreshed by the Kiro IDE or ``kiro2api refresh``)."""
    for store in app[ACCOUNTS]:
        if store.knows(token):
            return True
    for store in app[ACCOUNTS]:
        await store.reread()
        if store.knows(token):
            return True
    return False


# Application factory ######################################################


async def http_session_ctx(app: web.Application) -> AsyncIterator[None]:
    """One outbound ClientSession, and the token stores that use it."""
    config = app[CONFIG]
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=config.connect_timeout, sock_read=config.idle_timeout)
    # No connection limit: every stream holds its upstream connection for its
    # whole length, and aiohttp's default of 100 would queue the 101st.
    session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
    app[HTTP] = session
    app[ACCOUNTS].extend(accounts(config, session))
    yield
    reads = [s.usage_task for s in app[ACCOUNTS] if s.usage_task and not s.usage_task.done()]
    for read in reads:
        read.cancel()
    await asyncio.gather(*reads, return_exceptions=True)
    await session.close()


async def watchdog_ctx(app: web.Application) -> AsyncIterator[None]:
    async with app[WATCHDOG].running():
        yield


async def finish_streams(app: web.Application) -> None:
    """On SIGTERM (listening has stopped): let streams finish, then cut them short.

    Streams still running after ``shutdown_timeout`` are cancelled, and
    the relay (``stream_sse``) ends each with an in-band error event.
    """
    app[SHUTTING_DOWN].set()
    streams = set(app[STREAMS])
    if not streams:
        log.info("shutting down: no streams open")
        return
    log.info("shutting down: waiting up to %g s for %d stream(s)",
             app[CONFIG].shutdown_timeout, len(streams))
    _, pending = await asyncio.wait(streams, timeout=app[CONFIG].shutdown_timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)


def make_app(config: Config) -> web.Application:
    """Build the aiohttp application for ``config``; the tests call this too."""
    # Order matters: errors wrap auth, so a refused key gets the right envelope.
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[error_middleware, auth_middleware])
    app[CONFIG] = config
    app[ACCOUNTS] = []
    app[STREAMS] = set()
    app[METRICS] = Metrics()
    app[WATCHDOG] = Watchdog(config)
    app[MODEL_CACHE] = ModelCache()
    app.on_response_prepare.append(add_request_id)
    app[SHUTTING_DOWN] = asyncio.Event()
    app.on_shutdown.append(finish_streams)
    app.cleanup_ctx.append(watchdog_ctx)
    app.cleanup_ctx.append(http_session_ctx)
    app.cleanup_ctx.append(load_accounts_ctx)
    app.cleanup_ctx.append(shared_state_ctx)
    app.cleanup_ctx.append(hub_ctx)
    app.cleanup_ctx.append(watch_token_files_ctx)
    app.router.add_get("/", handle_root)  # also answers HEAD
    app.router.add_get("/api/hello", handle_root)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/v1/usage", handle_usage)
    app.router.add_get("/v1/status", handle_status)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/v1/models/{model_id}", handle_model)
    app.router.add_post("/v1/messages/count_tokens", handle_count_tokens)
    app.router.add_post("/v1/responses/input_tokens", handle_responses_input_tokens)
    app.router.add_get("/v1/responses/{response_id}", handle_stored_response)
    app.router.add_delete("/v1/responses/{response_id}", handle_stored_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", handle_stored_response)
    for route, _, api in API_ROUTES:
        app.router.add_post(route, relay_handler(api))
    return app


# Garbage collection #######################################################
#
# A server of long-lived streams holds a great many objects that live for a
# stream's length (tens of seconds) and a few that live for good (modules,
# the app). Python's collector, left at its defaults, runs a full collection
# whenever the old generation has grown by a quarter, and each stops every
# stream for as long as it takes to visit every object: 84-132 ms at 1,000
# open streams. Start-up's objects are frozen out of the collector's sight
# once the app has started, and the young generation is collected only when
# 50,000 more objects are alive than at the last collection (Python: 700),
# so that the objects of one frame's work are gone (by reference count)
# before a collection could promote them, and the old generation hardly
# grows. Measured with bench_scale.py gc (1,000 streams, 12,500 frames/s):
# 3-4 collections of 15-30 ms a run, none full, where the defaults made some
# 900, 7-8 of them full ones of 130-220 ms; 20,000 and 100,000 did worse.
GC_THRESHOLDS = (50_000, 20, 10)


async def tune_gc(app: web.Application) -> None:
    """On start-up, the last step before listening: collect once, freeze what is
    left (the process's lasting objects), and set GC_THRESHOLDS."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.debug("garbage collection: %d objects frozen, thresholds %s", gc.get_freeze_count(),
              GC_THRESHOLDS)


# Event loop ###############################################################
#
# uvloop (the extra kiro2api[speed]) runs the same asyncio code on libuv;
# bench_scale.py loop measures it against asyncio's own loop.

LOOPS = ("auto", "asyncio", "uvloop")
UVLOOP_MISSING = ("--loop uvloop needs the uvloop package: pip install 'kiro2api[speed]' "
                  "(or: pip install uvloop), or use --loop auto")


def uvloop_installed() -> bool:
    """Whether uvloop can be imported (found without importing it)."""
    return importlib.util.find_spec("uvloop") is not None


def choose_loop(wanted: str, *, uvloop: bool) -> str:
    """The loop to run for ``--loop wanted``, given whether uvloop is installed;
    raises click.UsageError for uvloop asked for by name and missing."""
    if wanted == "uvloop" and not uvloop:
        raise click.UsageError(UVLOOP_MISSING)
    if wanted == "auto":
        return "uvloop" if uvloop else "asyncio"
    return wanted


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop  # only here: the CLI has checked that it is installed

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def serve(config: Config) -> None:
    """Run the server until SIGINT/SIGTERM (the seam the CLI tests replace); with
    --workers N, as the supervisor of N workers that each run this.

    SIGTERM stops listening, lets streams finish for ``shutdown_timeout``
    (``finish_streams``) and exits 0. A client that hangs up cancels its
    handler, which closes its upstream request at once.
    """
    if config.workers > 1 and not config.worker:
        status = asyncio.run(supervise(config))
        if status:
            sys.exit(status)
        return
    host = f"[{config.host}]" if ":" in config.host else config.host
    app = make_app(config)

    def listening(banner: str) -> None:
        # aiohttp calls this once the socket is bound; its banner names the
        # address, with the port the system chose for --port 0 (aiohttp 3.10+).
        where = banner.partition("Running on ")[2].partition(" ====")[0]
        log.info("kiro2api %s listening on %s", __version__,
                 where or f"http://{host}:{config.port}")
        if HUB in app:
            app[HUB].send({"op": "ready"})

    # Here, not in make_app: the tests build apps by the hundred in one process.
    app.on_startup.append(tune_gc)
    log.debug("event loop: %s", config.loop)
    with listen_errors(config):
        web.run_app(
            app,
            loop=new_event_loop(config.loop),
            host=config.host,
            port=config.port,
            shutdown_timeout=config.shutdown_timeout,
            backlog=config.backlog,
            reuse_port=bool(config.worker),
            handler_cancellation=True,
            access_log=None,
            print=listening,
        )
        log.info("kiro2api stopped")


# Supervisor (--workers) ###################################################
#
# ``kiro2api server --workers N`` runs this process as the supervisor: it
# holds the port (bound with SO_REUSEPORT, not listening, so a port in use is
# found before any worker starts and the port stays the server's while a
# worker restarts), runs the hub the workers share counts and health through,
# and starts N workers: ``sys.executable`` running ``run_worker``, the Config
# pickled on its stdin (the keys never reach a command line), in a session of
# its own (a terminal's ^C reaches the supervisor alone). Each worker binds the
# port with SO_REUSEPORT, and the kernel spreads connections over them. A
# worker that dies is logged and started again (after a wait that doubles
# while it keeps dying young); one that dies before it ever listened, at the
# first start, stops the server with its exit status. SIGTERM or SIGINT is
# passed to every worker as SIGTERM: each drains its streams as one server
# does (``finish_streams``), and the supervisor exits once all have.

WORKER_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); import kiro2api; kiro2api.run_worker()"
WORKER_RESTART_SECONDS = (0.5, 30.0)  # before a dead worker starts again: the first, the longest
WORKER_STEADY_SECONDS = 30.0  # a worker that ran this long starts again after the first wait
WORKER_KILL_SECONDS = 15.0  # after --shutdown-timeout, before a worker gets SIGKILL


def run_worker() -> None:
    """A worker's life (``WORKER_BOOT``): its Config from stdin, then ``serve``."""
    config = pickle.load(sys.stdin.buffer)
    configure_logging(config.log_level, config.log_format, timestamps=config.log_timestamps,
                      worker=config.worker)
    try:
        serve(config)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


class HubPeer:
    """One worker's connection to the hub, and the last tally it sent."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.worker = 0
        self.tally: Json | None = None
        self.tallies = 0  # how many it has sent

    def send(self, message: Json) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


class Hub:
    """The supervisor's end of the workers' links (the protocol is above ``HubLink``):
    the accounts' health records, the usage claims, and the tallies, those of workers
    gone added up in ``retired`` so that the server's counters never go back."""

    def __init__(self) -> None:
        self.peers: list[HubPeer] = []
        self.records: dict[str, Json] = {}
        self.claims: dict[str, float] = {}  # key -> loop time it is held until
        self.retired = Tally()
        self.restarts = 0  # workers started again after they died
        self.listening: set[int] = set()  # the workers that ever said they listen
        self.heard = asyncio.Condition()  # notified on each tally and each hang-up
        self._gathers: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = HubPeer(writer)
        self.peers.append(peer)
        try:
            while line := await reader.readline():
                await self.take(peer, json.loads(line))
        except (OSError, ValueError) as exc:
            log.warning("worker %d: hub link broken: %s", peer.worker, describe(exc))
        finally:
            self.peers.remove(peer)
            if peer.tally is not None:
                self.retired.add({**peer.tally, "streams_open": 0})
            writer.close()
            async with self.heard:
                self.heard.notify_all()

    async def take(self, peer: HubPeer, message: Json) -> None:
        op = message["op"]
        if op == "hello":
            peer.worker = message["worker"]
            for account, record in self.records.items():  # what the others learnt
                peer.send({"op": "health", "account": account, "record": record})
        elif op == "ready":
            self.listening.add(peer.worker)
        elif op == "health":
            self.records[message["account"]] = message["record"]
            for other in self.peers:
                if other is not peer:
                    other.send(message)
        elif op == "tally":
            peer.tally, peer.tallies = message["tally"], peer.tallies + 1
            async with self.heard:
                self.heard.notify_all()
        elif op == "claim":
            now = asyncio.get_running_loop().time()
            won = self.claims.get(message["key"], 0.0) <= now
            if won:
                self.claims[message["key"]] = now + message["seconds"]
            peer.send({"answer": message["ask"], "value": won})
        elif op == "record":
            peer.send({"answer": message["ask"], "value": self.records.get(message["account"])})
        elif op == "gather":  # in a task: this peer's next lines must not wait for it
            peer.tally = message["tally"]
            task = asyncio.create_task(self.gather(peer, message["ask"]))
            self._gathers.add(task)
            task.add_done_callback(self._gathers.discard)

    async def gather(self, asker: HubPeer, ask: int) -> None:
        """Answer ``asker`` with every other worker's fresh tally (or its last one, if
        it does not answer within HUB_GATHER_SECONDS) and the retired ones."""
        wanted = [(peer, peer.tallies + 1) for peer in self.peers if peer is not asker]
        for peer, _ in wanted:
            peer.send({"op": "tally"})

        def heard_all() -> bool:
            return all(peer.tallies >= n or peer not in self.peers for peer, n in wanted)
        async with self.heard:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.heard.wait_for(heard_all), HUB_GATHER_SECONDS)
        tallies = [peer.tally for peer in self.peers
                   if peer is not asker and peer.tally is not None]
        asker.send({"answer": ask, "value": {
            "tallies": [*tallies, self.retired.state()], "workers": len(self.peers),
            "restarts": self.restarts}})


@contextlib.contextmanager
def listen_errors(config: Config) -> Iterator[None]:
    """Binding --host and --port: a failure as the one line a user needs."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    try:
        yield
    except socket.gaierror as exc:  # a host name that does not resolve
        raise click.ClickException(f"cannot listen on {host}:{config.port}: no address for "
                                   f"{config.host} ({exc.strerror})") from None
    except OSError as exc:  # the bind: a port in use, an address not of this machine
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise click.ClickException(f"cannot listen on {host}:{config.port}: {reason}") from None


def hold_port(config: Config) -> socket.socket:
    """The supervisor's socket on --host and --port: bound with SO_REUSEPORT, never
    listening (the kernel gives connections only to the workers' listening ones)."""
    with listen_errors(config):
        family, kind, proto, _, address = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        held = socket.socket(family, kind, proto)
        try:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as asyncio binds the workers' sockets
                held.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            held.bind(address)
        except OSError:
            held.close()
            raise
    return held


async def start_worker(config: Config) -> asyncio.subprocess.Process:
    here = os.path.dirname(os.path.abspath(__file__))  # a directory, or the .pyz
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER_BOOT, here, stdin=asyncio.subprocess.PIPE,
        start_new_session=True)
    assert process.stdin is not None
    process.stdin.write(pickle.dumps(config))
    process.stdin.close()
    log.info("worker %d started (pid %d)", config.worker, process.pid)
    return process


def exit_text(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


async def stop_worker(process: asyncio.subprocess.Process, config: Config) -> None:
    """SIGTERM, then the time to drain its streams; SIGKILL after that."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), config.shutdown_timeout + WORKER_KILL_SECONDS)
    except asyncio.TimeoutError:
        log.warning("worker %d (pid %d) did not stop; killing it", config.worker, process.pid)
        process.kill()
        await process.wait()


async def keep_worker(config: Config, hub: Hub, stop: asyncio.Event) -> int:
    """Run worker ``config.worker`` until ``stop``, starting it again whenever it dies;
    the exit status of one that died before it ever listened (it stops the others)."""
    loop = asyncio.get_running_loop()
    wait = WORKER_RESTART_SECONDS[0]
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            process, started = await start_worker(config), loop.time()
            await asyncio.wait([stopped, asyncio.ensure_future(process.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                await stop_worker(process, config)
                return 0
            returncode = process.returncode
            assert returncode is not None
            if config.worker not in hub.listening:
                log.error("worker %d (pid %d) %s before it listened; stopping the server",
                          config.worker, process.pid, exit_text(returncode))
                stop.set()
                return returncode or 1
            ran = loop.time() - started
            wait = WORKER_RESTART_SECONDS[0] if ran >= WORKER_STEADY_SECONDS else wait
            log.warning("worker %d (pid %d) %s after %s; starting it again in %s",
                        config.worker, process.pid, exit_text(returncode),
                        human_duration(ran), human_duration(wait))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopped), wait)
            if stop.is_set():
                return 0
            hub.restarts += 1
            wait = min(wait * 2, WORKER_RESTART_SECONDS[1])
    finally:
        stopped.cancel()


async def supervise(config: Config) -> int:
    """``--workers N``: run N workers on one port until SIGTERM or SIGINT; the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    hub = Hub()
    try:
        with hold_port(config) as held, \
                tempfile.TemporaryDirectory(prefix="kiro2api-") as place:
            port = held.getsockname()[1]  # --port 0: the one the system chose, for all
            path = os.path.join(place, "hub")
            hub_server = await asyncio.start_unix_server(hub.serve, path, limit=2 ** 24)
            log.info("kiro2api %s: %d workers on port %d", __version__, config.workers, port)
            keepers = [keep_worker(dataclasses.replace(config, port=port, worker=k, hub=path),
                                   hub, stop) for k in range(1, config.workers + 1)]
            statuses = await asyncio.gather(*keepers)
            hub_server.close()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("kiro2api stopped")
    return max(statuses)


# Doctor ###################################################################
#
# ``kiro2api doctor`` walks every account through what the server does with
# it, one step a line: the token source, the kind of account, expiry and
# refresh, the profile ARN, the models, the usage limits, and a tiny
# generation on each way (host and shape) the account may be served on. Each
# step says what the service answered, word for word when it refused.

DOCTOR_PROMPT = "Say OK."


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    ok: bool
    detail: str


@dataclass
class Diagnosis:
    """One account's steps, and the way the server would serve it on (None: none)."""

    account: str
    steps: list[Step] = field(default_factory=list)
    uses: Way | None = None

    def step(self, name: str, ok: bool, detail: str) -> None:
        self.steps.append(Step(name, ok, detail))

    def as_json(self) -> Json:
        return {"account": self.account,
                "steps": [{"step": s.name, "ok": s.ok, "detail": s.detail} for s in self.steps],
                "uses": {"host": self.uses.url, "shape": self.uses.dialect.name}
                if self.uses else None}


@contextlib.asynccontextmanager
async def command_app(config: Config) -> AsyncIterator[web.Application]:
    """What a command calls Kiro with as the server would, without serving: the
    application state (config, session, metrics, accounts that save every refresh)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout,
                                    sock_read=config.idle_timeout)
    watchdog = Watchdog(config)
    async with aiohttp.ClientSession(timeout=timeout) as session, watchdog.running():
        app = web.Application()
        app[CONFIG], app[HTTP], app[METRICS] = config, session, Metrics()
        app[WATCHDOG] = watchdog
        app[ACCOUNTS] = accounts(config, session, must_save=True)
        yield app


async def diagnose(config: Config, model: str) -> list[Diagnosis]:
    """Every configured account diagnosed, in the server's order."""
    async with command_app(config) as app:
        prepared = convert.anthropic_to_codewhisperer(
            {"model": model, "max_tokens": 1,
             "messages": [{"role": "user", "content": DOCTOR_PROMPT}]},
            conversation_id=random_uuid())
        return [await diagnose_account(app, store, prepared) for store in app[ACCOUNTS]]


async def diagnose_account(app: web.Application, store: TokenStore,
                           prepared: convert.Prepared) -> Diagnosis:
    found = Diagnosis(str(store.path))
    credentials = await check_credentials(found, store)
    if credentials is None:
        return found
    ways = ways_for(credentials.kind, app[CONFIG].upstream)
    await check_profile(found, app, store, credentials, ways)
    try:
        models = await list_models(app, store, credentials)
        names = [str(m.get("modelId")) for m in models if isinstance(m, dict)]
        found.step("models", True, f"{len(names)}: {', '.join(names[:8])}"
                   + (", ..." if len(names) > 8 else ""))
    except (UpstreamError, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        found.step("models", False, describe(exc) or "timed out")
    try:
        found.step("usage", True, describe_usage(await read_usage_limits(app, store,
                                                                          credentials)))
    except UpstreamError as exc:
        found.step("usage", False, str(exc))
    for way in ways:
        ok, detail = await try_generate(app, store, prepared, way)
        found.step("generate", ok, f"{way}: {detail}")
        found.uses = found.uses or (way if ok else None)
    if not ways:
        found.step("generate", False, f"no --upstream host serves a {credentials.kind} account")
    return found


async def check_credentials(found: Diagnosis, store: TokenStore) -> Credentials | None:
    """The token source, kind, expiry and refresh steps; the credentials to go on with."""
    try:
        credentials = await store.load()
    except TokenError as exc:
        found.step("token", False, str(exc))
        return None
    found.step("token", True, f"{type(store.file).__name__}, access token "
                              f"{mask(credentials.access_token)}")
    via = f" ({credentials.provider})" if credentials.provider else ""
    found.step("kind", True, f"{credentials.kind}{via}, region {credentials.region}")
    if credentials.kind == "api_key":
        found.step("refresh", True, "never: a Kiro API key does not expire")
        return credentials
    expired = credentials.expired(store.clock.now())
    found.step("expiry", not expired, describe_expiry(credentials))
    if not credentials.expiring(store.clock.now()):
        found.step("refresh", True, f"not due; the server refreshes "
                                    f"{human_duration(REFRESH_MARGIN.total_seconds())} before "
                                    f"expiry")
        return credentials
    try:
        credentials = await store.refresh()
    except TokenError as exc:
        found.step("refresh", False, str(exc))
        return None
    found.step("refresh", True, f"refreshed and saved; expires {describe_expiry(credentials)}")
    return credentials


async def check_profile(found: Diagnosis, app: web.Application, store: TokenStore,
                        credentials: Credentials, ways: tuple[Way, ...]) -> None:
    arns = {way.arn for way in ways}
    if convert.OWN_ARN in arns and credentials.profile_arn:
        found.step("profile", True, f"{credentials.profile_arn} (from the token file)")
    elif convert.OWN_ARN in arns:
        arn = await look_up_profile(app, store, credentials)
        found.step("profile", arn is not None, f"{arn} (ListAvailableProfiles)" if arn else
                   f"ListAvailableProfiles gave none: {store.kiro.profile_problem}")
    elif convert.SERVICE_ARN in arns:
        found.step("profile", True, "the service's own (a Builder ID account has none)")
    else:
        found.step("profile", True, f"none: a {credentials.kind} account goes without one")


def describe_usage(usage: convert.UsageLimits) -> str:
    """``KIRO PRO: 120.5 of 1000 credits used, resets 2027-01-01 (in 12 days)``."""
    used = "?" if usage.used is None else f"{usage.used:g}"
    limit = "?" if usage.limit is None else f"{usage.limit:g}"
    text = f"{usage.plan or 'plan unknown'}: {used} of {limit} credits used"
    if usage.reset_at is not None:
        text += f", resets {datetime.fromtimestamp(usage.reset_at, timezone.utc):%Y-%m-%d}"
    if usage.days_until_reset is not None:
        text += f" (in {usage.days_until_reset} days)"
    if usage.overage:
        text += ", overage billing on"
    return text + (" -- EXHAUSTED" if usage.exhausted else "")


async def try_generate(app: web.Application, store: TokenStore, prepared: convert.Prepared,
                       way: Way) -> tuple[bool, str]:
    """One tiny call on ``way``: whether it answered, and what (or what Kiro said)."""
    try:
        answer = await post_generate(app, RequestLog(), prepared, store, way)
    except KiroRefusal as refusal:
        return False, refusal.answer
    assembler = convert.Assembler.for_request(prepared, input_tokens=0,
                                              client_model=prepared.model_id)
    try:
        async with answer:
            events = await collect_events(answer, assembler)  # as a non-streamed request
    except STREAM_FAILURES as exc:
        return False, f"the answer broke off: {failure_of(exc).message}"
    text = "".join(e.text for e in events if isinstance(e, convert.Text))
    return True, f"answered {text[:60]!r}"


def print_diagnoses(found: list[Diagnosis]) -> None:
    for diagnosis in found:
        click.echo(f"account {diagnosis.account}")
        for step in diagnosis.steps:
            click.echo(f"  {'✓' if step.ok else '✗'} {step.name:<9} {step.detail}")
        if diagnosis.uses:
            click.echo(f"  → the server will use {diagnosis.uses}")
        else:
            click.echo("  → the server cannot use this account")
    serving = sum(d.uses is not None for d in found)
    click.echo(f"{serving} of {len(found)} account{'s' if len(found) != 1 else ''} can "
               f"generate.")


# Command line #############################################################


def log_time(created: float) -> str:
    """A log record's time, RFC 3339 in UTC with milliseconds: 2026-04-06T19:29:16.090Z."""
    moment = datetime.fromtimestamp(created, timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message``, after the time unless told otherwise (journald);
    a worker of --workers says which it is: ``LEVEL logger (worker 2): message``."""

    def __init__(self, *, timestamps: bool = True, worker: int = 0) -> None:
        super().__init__(("%(asctime)s " if timestamps else "") + "%(levelname)s %(name)s"
                         + (f" (worker {worker})" if worker else "") + ": %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return log_time(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the worker (--workers),
    and a request's fields."""

    def __init__(self, *, worker: int = 0) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        data: Json = {"time": log_time(record.created), "level": record.levelname,
                      "logger": record.name, "message": record.getMessage()}
        if self.worker:
            data["worker"] = self.worker
        data.update(getattr(record, "fields", {}))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def stderr_is_journal(journal_stream: str | None) -> bool:
    """Whether stderr is the journald stream systemd names in ``JOURNAL_STREAM``
    (``device:inode``); a child of a service whose stderr was redirected inherits
    the variable, so the stream itself is compared."""
    device, _, inode = (journal_stream or "").partition(":")
    try:
        found = os.fstat(sys.stderr.fileno())
        return (found.st_dev, found.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):  # no such variable, no real stderr
        return False


def configure_logging(level: str, fmt: str, *, timestamps: bool = True,
                      worker: int = 0) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker=worker) if fmt == "json"
                         else TextFormatter(timestamps=timestamps, worker=worker))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # aiohttp's own access log would repeat our one line per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kiro2api")
def cli() -> None:
    """Use a Kiro subscription from Anthropic and OpenAI API clients.

    \b
    Quick start:
      kiro2api read                 # check the Kiro token file
      kiro2api server               # serve on http://127.0.0.1:8080
      eval "$(kiro2api export)"     # point Claude Code at it
      kiro2api codex --write        # once: point Codex at it too
      kiro2api usage                # credits left on each account, until when
    """


# One label of a host name; "_" too, as Docker's and some intranets' names have it.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def host_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--host``: an IP address (IPv6 with or without brackets), a host name, or empty
    (every address); refused before anything looks it up."""
    name = value.strip()
    bracketed = name.startswith("[") and name.endswith("]")
    if bracketed:
        name = name[1:-1]
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if address is not None and (address.version == 6 or not bracketed):
        return name
    if bracketed:
        raise click.BadParameter(f"{value!r}: brackets hold an IPv6 address")
    if re.fullmatch(r"[0-9.]+", name):
        raise click.BadParameter(f"{value!r} is not an IPv4 address (four numbers from 0 to "
                                 f"255, such as 127.0.0.1)")
    try:
        labels = name.encode("idna").decode("ascii").rstrip(".").split(".") if name else []
    except UnicodeError:
        labels = [""]
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise click.BadParameter(f"{value!r} is neither an IP address nor a host name")
    return name


def host_option(help: str = "Address to listen on; 0.0.0.0 exposes the server.") -> Callable:
    return click.option("--host", envvar="KIRO2API_HOST", show_envvar=True, default="127.0.0.1",
                        show_default=True, callback=host_name, help=help)


def port_option(help: str = f"Port to listen on [default: {DEFAULT_PORT}].") -> Callable:
    return click.option("--port", envvar="KIRO2API_PORT", show_envvar=True,
                        type=click.IntRange(0, 65535), default=None, help=help)


def api_key_option(help: str = "Key clients must send as x-api-key or Bearer.") -> Callable:
    return click.option("--api-key", envvar="KIRO2API_API_KEY", show_envvar=True, default=None,
                        help=help)


token_file_option = click.option(
    "--token-file", "token_files", envvar="KIRO2API_TOKEN_FILE", show_envvar=True,
    multiple=True, type=click.Path(dir_okay=False, path_type=Path),
    help=f"Kiro token file; repeat for an account pool [default: {DEFAULT_TOKEN_FILE}].")
social_auth_url_option = click.option(
    "--social-auth-url", envvar="KIRO2API_SOCIAL_AUTH_URL", show_envvar=True,
    default=DEFAULT_SOCIAL_AUTH_URL, show_default=True,
    help="Kiro auth service for social logins.")
oidc_url_option = click.option(
    "--oidc-url", envvar="KIRO2API_OIDC_URL", show_envvar=True, default=DEFAULT_OIDC_URL,
    show_default=True, help="AWS SSO-OIDC base URL for IdC.")
proxy_option = click.option(
    "--proxy", envvar="KIRO2API_PROXY", show_envvar=True, default=None,
    help="Outbound HTTP(S) proxy URL (HTTPS_PROXY is honoured when unset).")


def token_paths(token_files: tuple[Path, ...]) -> tuple[Path, ...]:
    """The ``--token-file`` values, ``~`` expanded, or the default file (at run time)."""
    return tuple(p.expanduser() for p in token_files) or (Path(DEFAULT_TOKEN_FILE).expanduser(),)


def command_config(token_files: tuple[Path, ...], **options: Any) -> Config:
    """The ``Config`` of a command: its options, and its token files, or the default one
    unless Kiro API keys are the accounts."""
    if not token_files and options.get("kiro_api_keys"):
        return Config(token_files=(), **options)
    return Config(token_files=token_paths(token_files), **options)


def kiro_version(ctx: click.Context, param: click.Parameter,
                 value: str | None) -> convert.ClientVersions:
    try:
        return convert.ClientVersions.parse(value) if value else convert.ClientVersions()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def region_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _KIRO_REGION.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not an AWS region name such as us-east-1")
    return value


# Region names as host names may be built from (PROTOCOL-2026.md 10.1.1).
_KIRO_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d")


def service_options(command: Callable) -> Callable:
    """The options that say how to reach Kiro and with which accounts besides the
    token files, handed to the command as one ``service`` dict of Config fields."""
    @functools.wraps(command)
    def with_service(*args: Any, upstream: tuple[str, ...], management_url: str,
                     region: str | None, kiro_version: convert.ClientVersions,
                     kiro_api_keys: tuple[str, ...], allow_idp_hosts: tuple[str, ...],
                     **kwargs: Any) -> Any:
        for key in kiro_api_keys:
            if not key.startswith("ksk_"):
                raise click.BadParameter("a Kiro API key starts with ksk_ (the key itself "
                                         "is not shown)", param_hint="'--kiro-api-key'")
        service = {"upstream": upstream or DEFAULT_UPSTREAMS, "management_url": management_url,
                   "region": region, "kiro_version": kiro_version,
                   "kiro_api_keys": kiro_api_keys, "allow_idp_hosts": allow_idp_hosts}
        return command(*args, service=service, **kwargs)

    options = (
        click.option("--upstream", envvar="KIRO2API_UPSTREAM", show_envvar=True, multiple=True,
                     help="Kiro host to try, in order; repeatable [default: "
                          + ", then ".join(DEFAULT_UPSTREAMS) + "]. A #runtime or #legacy "
                          "suffix names the host's kind."),
        click.option("--management-url", envvar="KIRO2API_MANAGEMENT_URL", show_envvar=True,
                     default=DEFAULT_MANAGEMENT_URL, show_default=True,
                     help="Kiro's control plane: profiles, models, usage limits."),
        click.option("--region", envvar="KIRO2API_REGION", show_envvar=True,
                     callback=region_name, help="Region of accounts whose file names none."),
        click.option("--kiro-version", envvar="KIRO2API_KIRO_VERSION", show_envvar=True,
                     callback=kiro_version,
                     help="Client versions shown to Kiro: 1.1.14 (the IDE's) or "
                          "ide=1.1.14,cli=2.23.1."),
        click.option("--kiro-api-key", "kiro_api_keys", envvar="KIRO2API_KIRO_API_KEY",
                     show_envvar=True, multiple=True,
                     help="A Kiro API key (ksk_...) as an account; repeatable."),
        click.option("--allow-idp-host", "allow_idp_hosts", envvar="KIRO2API_ALLOW_IDP_HOST",
                     show_envvar=True, multiple=True,
                     help="A host (and its subdomains) an external identity provider's "
                          "token endpoint may be on; repeatable."),
    )
    for option in reversed(options):
        with_service = option(with_service)
    return with_service


def refresh_options(command: Callable) -> Callable:
    """The options a command needs to refresh tokens (which files, where to, through
    which proxy), handed to it as one ``config``."""
    @functools.wraps(command)
    def with_config(*args: Any, token_files: tuple[Path, ...], social_auth_url: str,
                    oidc_url: str, proxy: str | None, **kwargs: Any) -> Any:
        config = command_config(token_files, social_auth_url=social_auth_url,
                                oidc_url=oidc_url, proxy=proxy)
        return command(*args, config=config, **kwargs)

    for option in (proxy_option, oidc_url_option, social_auth_url_option, token_file_option):
        with_config = option(with_config)
    return with_config


# Server tuning: (option, Config field, type, help). Each option's default is
# the Config field's, and each has a KIRO2API_ variable named after it.
TUNING = (
    ("--max-body-bytes", "max_body_bytes", click.IntRange(1), "Largest client request body."),
    ("--max-input-bytes", "max_input_bytes", click.IntRange(1),
     "Largest request sent to Kiro; larger ones get 'prompt is too long'."),
    ("--connect-timeout", "connect_timeout", click.FloatRange(0, min_open=True),
     "Seconds to connect to Kiro."),
    ("--first-byte-timeout", "first_byte_timeout", click.FloatRange(0, min_open=True),
     "Seconds to wait for Kiro to start answering."),
    ("--idle-timeout", "idle_timeout", click.FloatRange(0, min_open=True),
     "Seconds of silence from Kiro before a stream is given up."),
    ("--retries", "retries", click.IntRange(0), "Retries of a failed call before it streams."),
    ("--retry-seconds", "retry_seconds", click.FloatRange(0),
     "Time budget for those retries, in seconds."),
    ("--ping-interval", "ping_interval", click.FloatRange(0, min_open=True),
     "Seconds of quiet before a keep-alive is sent to the client."),
    ("--shutdown-timeout", "shutdown_timeout", click.FloatRange(0),
     "Seconds streams in flight may take to finish on SIGTERM."),
    ("--workers", "workers", click.IntRange(1, 256),
     "Server processes on one port (SO_REUSEPORT): as many as cores to use."),
    ("--backlog", "backlog", click.IntRange(1),
     "Connections the system queues for the server to accept (a burst of clients)."),
    ("--state-lock-seconds", "state_lock_seconds", click.FloatRange(1),
     "With --state: seconds a refresh lock outlives a replica that died holding it."),
)


def tuning_options(command: Callable) -> Callable:
    for flag, name, kind, help_text in reversed(TUNING):
        command = click.option(
            flag, name, type=kind, envvar="KIRO2API_" + name.upper(), show_envvar=True,
            default=Config.__dataclass_fields__[name].default, show_default=True,
            help=help_text)(command)
    return command


def state_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--state``: a Redis URL, and the redis package to use it with."""
    if not value:
        return None
    scheme = urllib.parse.urlsplit(value).scheme
    if scheme not in STATE_SCHEMES:
        raise click.BadParameter(
            f"{state_location(value)!r} is not a Redis URL: give redis://HOST:PORT/DB, "
            f"rediss://... (TLS) or unix:///PATH")
    try:
        import redis.asyncio  # noqa: F401 -- only to say now what is missing
    except ImportError:
        raise click.UsageError(STATE_PACKAGE_MISSING) from None
    return value


def model_pairs(ctx: click.Context, param: click.Parameter,
                value: tuple[str, ...]) -> dict[str, str]:
    """``--model-map FROM=TO``, repeated (the variable: pairs separated by spaces)."""
    pairs = {}
    for item in value:
        source, equals, target = item.partition("=")
        if not equals or not source.strip() or not target.strip():
            raise click.BadParameter(f"{item!r} is not FROM=TO (a model name on each side)")
        pairs[source.strip()] = target.strip()
    return pairs


def account_options(command: Callable) -> Callable:
    """The options that say which accounts to serve and how to reach Kiro for them
    (``server``, ``doctor``, ``usage``)."""
    for option in (proxy_option, oidc_url_option, social_auth_url_option, service_options,
                   token_file_option):
        command = option(command)
    return command


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def positional_or_option(ctx: click.Context, name: str, argument: Any, option: Any, *,
                         twice: str) -> Any:
    """The value of option ``name`` or of the argument that stands for it. The command
    line wins over the environment; given there both ways, they must agree (else
    UsageError ``twice``)."""
    if argument is None:
        return option
    if option is not None and option != argument \
            and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
        raise click.UsageError(twice)
    return argument


@cli.command()
@click.argument("port_arg", metavar="[PORT]", required=False, type=click.IntRange(0, 65535))
@click.argument("key_arg", metavar="[API_KEY]", required=False)
@host_option()
@port_option()
@api_key_option()
@click.option("--no-auth", is_flag=True, help="Accept any client (loopback hosts only).")
@account_options
@click.option("--log-level", envvar="KIRO2API_LOG_LEVEL", show_envvar=True, default="INFO",
              show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", envvar="KIRO2API_LOG_FORMAT", show_envvar=True, default="text",
              show_default=True, type=click.Choice(["text", "json"]))
@click.option("--state", metavar="URL", envvar="KIRO2API_STATE", show_envvar=True,
              callback=state_url,
              help="Redis that replicas share accounts through: redis://, rediss:// or "
                   "unix:// (needs kiro2api[redis]).")
@click.option("--model-map", "model_map", metavar="FROM=TO", multiple=True,
              envvar="KIRO2API_MODEL_MAP", show_envvar=True, callback=model_pairs,
              help="Serve requests for model FROM with model TO (repeatable).")
@click.option("--safeguards", envvar="KIRO2API_SAFEGUARDS", show_envvar=True, default="off",
              show_default=True, type=click.Choice(["off", "kiro"]),
              help="Claude Code's auto-mode check of tool calls: off (not judged) or kiro "
                   "(one small Kiro call per call).")
@click.option("--loop", "loop", envvar="KIRO2API_LOOP", show_envvar=True, default="auto",
              show_default=True, type=click.Choice(LOOPS),
              help="Event loop: uvloop (kiro2api[speed]), asyncio's own, or auto (uvloop "
                   "when installed).")
@tuning_options
def server(port_arg, key_arg, host, port, api_key, no_auth, token_files, service,
           social_auth_url, oidc_url, proxy, log_level, log_format, state, model_map,
           safeguards, loop, **tuning) -> None:
    """Run the proxy.

    \b
    Examples:
      kiro2api server                       # 127.0.0.1:8080
      kiro2api server 9000 my-secret-key    # port and client key
    """
    ctx = click.get_current_context()
    port = positional_or_option(ctx, "port", port_arg, port,
                                twice=f"port given twice: {port_arg} and --port {port}")
    api_key = positional_or_option(ctx, "api_key", key_arg, api_key,
                                   twice="API key given both as an argument and as --api-key")
    if no_auth and not is_loopback(host):
        raise click.UsageError(
            f"--no-auth would let anyone who can reach {host} use your Kiro account; "
            "it is allowed only on a loopback host such as 127.0.0.1 (use --api-key)")
    if no_auth and api_key:
        given = "KIRO2API_API_KEY" if key_arg is None and ctx.get_parameter_source(
            "api_key") is ParameterSource.ENVIRONMENT else "an API key"
        raise click.UsageError(f"--no-auth and {given} contradict each other; choose one")
    if api_key is not None and not api_key.strip():
        # "kiro2api server 8080 "$KEY"" with KEY unset must not mean "no key".
        raise click.UsageError("the API key is empty; give a key, or leave it out")
    if tuning["workers"] > 1 and not sys.platform.startswith("linux"):
        # Elsewhere SO_REUSEPORT gives every connection to one socket, or is missing.
        raise click.UsageError("--workers needs Linux, whose SO_REUSEPORT spreads "
                               "connections over the workers; run one process here")
    config = command_config(
        token_files,
        host=host,
        port=port if port is not None else DEFAULT_PORT,
        api_key=api_key,
        no_auth=no_auth,
        **service,
        social_auth_url=social_auth_url,
        oidc_url=oidc_url,
        proxy=proxy,
        log_level=log_level.upper(),
        log_format=log_format,
        log_timestamps=not stderr_is_journal(os.environ.get("JOURNAL_STREAM")),
        state=state,
        model_map=model_map,
        safeguards=safeguards,
        loop=choose_loop(loop, uvloop=uvloop_installed()),
        **tuning,
    )
    configure_logging(config.log_level, config.log_format, timestamps=config.log_timestamps)
    serve(config)


def fail(errors: list[TokenError]) -> None:
    """End the command with exit 1 and one ``Error:`` line per failure, if there were any."""
    for error in errors[:-1]:
        click.echo(f"Error: {error}", err=True)
    if errors:
        raise click.ClickException(str(errors[-1]))


def run_stores(config: Config, each: Callable[[TokenStore], Awaitable[None]], *,
               first_only: bool = False) -> None:
    """Run ``each`` on the store of every token file (or the first) in one event loop."""
    if not log.handlers:
        # The commands report failures themselves; keep the logging module's
        # last-resort handler from printing them a second time.
        log.addHandler(logging.NullHandler())
    errors: list[TokenError] = []

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            for path in config.token_files[:1] if first_only else config.token_files:
                try:
                    await each(TokenStore(path, config=config, session=session,
                                          must_save=True))
                except TokenError as exc:
                    errors.append(exc)

    asyncio.run(main())
    fail(errors)


def describe_expiry(credentials: Credentials) -> str:
    """``2026-04-06 21:29:16 CEST, in 52 min``, in local time."""
    if credentials.expires_at is None:
        return "unknown (refreshed when Kiro rejects the token)"
    left = credentials.seconds_left() or 0.0
    when = credentials.expires_at.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    if left > 0:
        return f"{when}, in {human_duration(left)}"
    return f"{when}, expired {human_duration(left)} ago"


async def printable_credentials(store: TokenStore) -> Credentials:
    """``store.credentials()`` for a command that prints the token. When the refresh
    failed but the token still works for a while, it is printed all the same (stdout
    stays usable), and a warning on stderr says what failed and when it expires."""
    credentials = await store.credentials()
    if store.error is not None:
        click.echo(f"Warning: the token could not be refreshed: {store.error}\n"
                   f"The token printed is the current one; it expires "
                   f"{describe_expiry(credentials)}.", err=True)
    return credentials


def mask(secret: str) -> str:
    """The first and last few characters of a token, never enough to use it."""
    if len(secret) < 24:
        return f"*** ({len(secret)} chars)"
    return f"{secret[:6]}...{secret[-4:]} ({len(secret)} chars)"


@cli.command()
@token_file_option
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: an object, or a list of them for several token files.")
def read(token_files: tuple[Path, ...], as_json: bool) -> None:
    """Show the Kiro token file: login, region, expiry; tokens masked.

    \b
    Examples:
      kiro2api read
      kiro2api read --json | jq .seconds_left
    """
    shown: list[Json] = []
    errors: list[TokenError] = []
    for path in token_paths(token_files):
        try:
            _, credentials = read_token_file(path)
        except TokenError as exc:
            errors.append(exc)
            continue
        left = credentials.seconds_left()
        shown.append({
            "path": str(path),
            "auth_method": credentials.auth_method,
            "provider": credentials.provider,
            "region": credentials.region,
            "profile_arn": credentials.profile_arn,
            "expires_at": format_expires_at(credentials.expires_at)
            if credentials.expires_at else None,
            "seconds_left": None if left is None else int(left),
            "expired": None if left is None else left <= 0,
            "access_token": mask(credentials.access_token),
            "refresh_token": mask(credentials.refresh_token),
        })
        if not as_json:
            if len(shown) > 1:
                click.echo()
            click.echo(f"Token file:    {path}")
            click.echo(f"Auth method:   {credentials.auth_method}"
                       + (f" ({credentials.provider})" if credentials.provider else ""))
            click.echo(f"Region:        {credentials.region}")
            click.echo(f"Profile ARN:   {credentials.profile_arn or '-'}")
            click.echo(f"Expires:       {describe_expiry(credentials)}")
            click.echo(f"Access token:  {shown[-1]['access_token']}")
            click.echo(f"Refresh token: {shown[-1]['refresh_token']}")
    if as_json and shown:
        click.echo(json.dumps(shown[0] if len(shown) == 1 and not errors else shown, indent=2))
    fail(errors)


@cli.command()
@refresh_options
def refresh(config: Config) -> None:
    """Refresh the Kiro access token now and save it.

    If another program (the Kiro IDE, a running kiro2api server) has just
    refreshed it, its new token is kept instead.
    """

    async def each(store: TokenStore) -> None:
        credentials = await store.refresh()
        if store.error is not None:  # refreshed, but the file could not be written
            raise store.error
        done = "Refreshed" if store.refreshes else "Already refreshed by another program:"
        click.echo(f"{done} {store.path}; expires {describe_expiry(credentials)}.")

    run_stores(config, each)


@cli.command()
@account_options
@click.option("--model", default="claude-haiku-4-5", show_default=True,
              help="Model of the one-token test generations.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def doctor(token_files, service, social_auth_url, oidc_url, proxy, model, as_json) -> None:
    """Check every account step by step, as the server would use it.

    One line per step (token, kind, expiry, refresh, profile, models, usage,
    and a one-token generation on each host and request shape), with Kiro's
    own answer where it refused; exit 0 when an account can generate. Each
    generation costs a little of the account's credits.

    \b
    Examples:
      kiro2api doctor
      kiro2api doctor --token-file ~/.local/share/kiro-cli/data.sqlite3
      kiro2api doctor --json | jq '.accounts[].uses'
    """
    if not log.handlers:
        log.addHandler(logging.NullHandler())  # the steps report failures themselves
    config = command_config(token_files, **service, social_auth_url=social_auth_url,
                            oidc_url=oidc_url, proxy=proxy)
    found = asyncio.run(diagnose(config, model))
    serving = any(d.uses is not None for d in found)
    if as_json:
        click.echo(json.dumps({"ok": serving, "accounts": [d.as_json() for d in found]},
                              indent=2, ensure_ascii=False))
    else:
        print_diagnoses(found)
    if not serving:
        sys.exit(1)


async def read_usages(config: Config) -> list[Json]:
    """Every configured account's usage report (``usage_report``), read at once."""
    async with command_app(config) as app:
        stores = app[ACCOUNTS]
        await asyncio.gather(*(fresh_usage(app, store) for store in stores))
        return [usage_report(store) for store in stores]


def credits_text(value: float | None) -> str:
    """Credits as a person reads them: 120.5, 1000, 0.01 (two decimals at most)."""
    return "?" if value is None else f"{value:.2f}".rstrip("0").rstrip(".")


def reset_text(report: Json) -> str:
    if report["reset_at"] is None:
        return "unknown" if report["days_until_reset"] is None \
            else f"in {report['days_until_reset']} days"
    moment = parse_expires_at(report["reset_at"])
    return f"{moment:%Y-%m-%d %H:%M} UTC, in {human_duration(report['seconds_until_reset'])}"


def extra_text(extra: Json) -> str:
    """``Welcome bonus (ACTIVE): 0 of 100 used, until 2026-03-01``."""
    status = f" ({extra['status']})" if extra["status"] else ""
    until = f", until {extra['expires_at'][:10]}" if extra["expires_at"] else ""
    return (f"{extra['name']}{status}: {credits_text(extra['used'])} of "
            f"{credits_text(extra['limit'])} used{until}")


def usage_warning(report: Json) -> str | None:
    """The warning for an account near its limit (NEAR_LIMIT_PERCENT), or past it."""
    credits = report["credits"]
    if report["exhausted"]:
        return f"the credits are used up until the reset ({reset_text(report)})"
    if report["near_limit"]:
        overage = ", then overage billing" if report["overage"]["enabled"] else ""
        return (f"{credits['percent']:g} % of the credits used, {credits_text(credits['left'])} "
                f"left{overage}")
    return None


def usage_lines(report: Json) -> list[str]:
    """One account of ``kiro2api usage``, a line a fact."""
    lines = [f"account {report['account']} ({report['kind'] or 'kind unknown'})"]
    credits = report["credits"]
    if credits is not None:
        share = "" if credits["percent"] is None else f" ({credits['percent']:g} %)"
        lines += [f"  plan     {report['plan'] or 'unknown'}",
                  f"  credits  {credits_text(credits['used'])} of "
                  f"{credits_text(credits['limit'])} used{share}, "
                  f"{credits_text(credits['left'])} left"]
        overage = report["overage"]
        if overage["enabled"] or overage["used"]:
            lines.append(f"  overage  {'on' if overage['enabled'] else 'off'}, "
                         f"{credits_text(overage['used'] or 0.0)} credits past the limit")
        lines.append(f"  resets   {reset_text(report)}")
        lines += [f"  {'bonus' if e['kind'] == 'bonus' else 'trial':<8} {extra_text(e)}"
                  for e in report["extra_credits"]]
        warning = usage_warning(report)
        if warning:
            lines.append(f"  warning  {warning}")
    if report["error"]:
        lines.append(f"  error    {report['error']}")
    return lines


@cli.command()
@account_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def usage(token_files, service, social_auth_url, oidc_url, proxy, as_json) -> None:
    """Show every account's credits: plan, used of the limit, reset, trial and bonuses.

    The accounts are the server's (the same --token-file, --kiro-api-key and
    service options); a token that is due is refreshed and saved first. A
    warning line marks an account that has used 90 % of its credits or more.
    Exit status 1 when no account's usage could be read.

    \b
    Examples:
      kiro2api usage
      kiro2api usage --json | jq '.accounts[] | {account, credits}'
    """
    if not log.handlers:
        log.addHandler(logging.NullHandler())  # the reports say what failed
    config = command_config(token_files, **service, social_auth_url=social_auth_url,
                            oidc_url=oidc_url, proxy=proxy)
    reports = asyncio.run(read_usages(config))
    if as_json:
        click.echo(json.dumps({"accounts": reports}, indent=2, ensure_ascii=False))
    else:
        for report in reports:
            click.echo("\n".join(usage_lines(report)))
    if all(report["error"] for report in reports):
        sys.exit(1)


SHELLS = ("posix", "fish", "cmd", "powershell")
# Names users type for those shells (the examples call eval "$(...)" the bash, zsh way).
SHELL_ALIASES = {"sh": "posix", "bash": "posix", "zsh": "posix", "pwsh": "powershell"}
# The variable that holds the client key for Codex (its provider's env_key).
CODEX_KEY_VARIABLE = "KIRO2API_KEY"


def default_shell(platform: str | None = None) -> str:
    return "powershell" if (platform or sys.platform).startswith("win") else "posix"


def shell_assignment(shell: str, name: str, value: str) -> str:
    """One line that sets the environment variable ``name`` to ``value`` in ``shell``.

    Raises ValueError for a value the shell cannot hold or quote safely.
    """
    if "\0" in value:
        raise ValueError(f"the value of {name} contains a NUL character")
    if shell == "posix":
        return f"export {name}={shlex.quote(value)}"
    if shell == "fish":  # in fish's single quotes only \\ and \' are escapes
        return "set -gx {} '{}'".format(name, value.replace("\\", "\\\\").replace("'", "\\'"))
    if shell == "powershell":  # PowerShell also takes the curly quotes as single quotes
        return "$env:{} = '{}'".format(name, re.sub("['\u2018\u2019\u201a\u201b]",
                                                    lambda m: m.group() * 2, value))
    # cmd: quoting the whole assignment makes & | < > ^ literal, but nothing
    # can escape a double quote, and % and ! would still be expanded.
    unsafe = sorted(set(value) & set('"%!\r\n'))
    if unsafe:
        raise ValueError(f"the value of {name} contains {''.join(unsafe)!r}, which cmd cannot "
                         f"quote safely; use --shell powershell")
    return f'set "{name}={value}"'


def client_address(host: str) -> str:
    """The address a client on this machine reaches a server listening on ``host`` at,
    as a URL spells it.

    Not ``localhost``: Node's fetch and Python may resolve it to the other
    family than the one the server listens on. ``0.0.0.0`` and the empty host
    (every address) answer on 127.0.0.1, ``localhost`` does wherever it names
    127.0.0.1 too. ``::`` answers on ::1 only, even on a dual-stack Linux:
    asyncio sets IPV6_V6ONLY on the sockets it listens on. Any other address
    answers on itself alone (127.0.0.2 not on 127.0.0.1), and a host name is
    resolved by the client as it was by the server.
    """
    name = host.strip().strip("[]")
    if name.lower() in ("", "localhost", "localhost."):
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name
    if address.is_unspecified:
        return "127.0.0.1" if address.version == 4 else "[::1]"
    if address.version == 6:  # a zone (fe80::1%eth0) is %25 in a URL (RFC 6874)
        return "[{}]".format(name.replace("%", "%25"))
    return name


def client_base_url(host: str, port: int) -> str:
    """The URL a client on this machine uses for a server listening on ``host:port``."""
    return f"http://{client_address(host)}:{port}"


@cli.command()
@host_option("The server's --host.")
@port_option(f"The server's --port [default: {DEFAULT_PORT}].")
@api_key_option("The server's client key; printed instead of the Kiro access token.")
@refresh_options
@click.option("--shell", type=click.Choice((*SHELLS, *SHELL_ALIASES)), default=None,
              help="Syntax of the lines (sh, bash and zsh are posix; pwsh is powershell) "
                   "[default: powershell on Windows, else posix].")
def export(host: str, port: int | None, api_key: str | None, config: Config,
           shell: str | None) -> None:
    """Print shell lines that point Claude Code and Codex at the server.

    ANTHROPIC_AUTH_TOKEN (Claude Code's key) and KIRO2API_KEY (the key of
    the provider kiro2api codex adds to Codex) are the server's client key
    if one is set, else the current Kiro access token (refreshed first if it
    is about to expire), which a server started without --api-key accepts.

    \b
    Examples:
      eval "$(kiro2api export)"                              # bash, zsh
      kiro2api export --shell fish | source                  # fish
      kiro2api export --shell powershell | Invoke-Expression
    """
    shell = SHELL_ALIASES.get(shell, shell) if shell else default_shell()
    values = {"ANTHROPIC_BASE_URL": client_base_url(host, DEFAULT_PORT if port is None else port)}
    if api_key:
        values["ANTHROPIC_AUTH_TOKEN"] = api_key
    else:
        async def each(store: TokenStore) -> None:
            values["ANTHROPIC_AUTH_TOKEN"] = (await printable_credentials(store)).access_token

        run_stores(config, each, first_only=True)
    values[CODEX_KEY_VARIABLE] = values["ANTHROPIC_AUTH_TOKEN"]
    try:
        lines = [shell_assignment(shell, name, value) for name, value in values.items()]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("\n".join(lines))


@cli.command(name="authToken")
@refresh_options
def auth_token(config: Config) -> None:
    """Print the current Kiro access token and how to use it.

    The token alone goes to stdout (TOKEN=$(kiro2api authToken) works); the
    hints go to stderr. It is refreshed first if it is about to expire.
    """

    async def each(store: TokenStore) -> None:
        credentials = await printable_credentials(store)
        click.echo(credentials.access_token)
        click.echo(
            f"\nThe Kiro access token of {store.path}; expires "
            f"{describe_expiry(credentials)}.\n"
            "A kiro2api server started without --api-key accepts it as the client key.\n"
            "Point Claude Code at the server with:\n"
            '  eval "$(kiro2api export)"    # sets ANTHROPIC_BASE_URL and ANTHROPIC_AUTH_TOKEN',
            err=True)

    run_stores(config, each, first_only=True)


@cli.command()
def claude() -> None:
    """Mark ~/.claude.json so that Claude Code skips its own login.

    The original tool called this the "region bypass".

    Sets "hasCompletedOnboarding": true and "kiro2api": true at the top of
    ~/.claude.json, keeping every other key and their order, and creates the
    file if it is missing. Run it while Claude Code is not running.
    """
    path = Path.home() / ".claude.json"
    redo = "fix or move it, then run kiro2api claude again"
    try:
        data = _read_json_object(path, missing=None, fix=redo, unreadable=redo)
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        data, mode = {}, 0o600
    except TokenFileError as exc:
        raise click.ClickException(str(exc)) from None
    if data.get("hasCompletedOnboarding") is True and data.get("kiro2api") is True:
        click.echo(f"{path} already has hasCompletedOnboarding and kiro2api set; nothing to do.")
        return
    data["hasCompletedOnboarding"] = True
    data["kiro2api"] = True
    try:
        write_json_atomic(path, data, mode=mode)
    except OSError as exc:
        raise click.ClickException(
            f"cannot write {path} ({exc.strerror or exc}); check its directory's permissions"
        ) from None
    click.echo(f"Updated {path}: hasCompletedOnboarding and kiro2api are true.")


# Codex ####################################################################
#
# Codex finds the server through a model provider in its config.toml
# (PROTOCOL-2026.md 10.15.1). Only wire_api = "responses" works, and
# openai_base_url is no substitute: Codex then tries a WebSocket first.

CODEX_DEFAULT_MODEL = "claude-sonnet-4.5"
# Codex keeps these provider ids for its built-in providers.
CODEX_RESERVED_IDS = frozenset({"openai", "ollama", "lmstudio"})
# What must be equal for a provider already in config.toml to be this one.
CODEX_PROVIDER_KEYS = ("base_url", "env_key", "wire_api")
# Ids a TOML table header may name without quotes.
_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# What a TOML basic string may not hold as it is.
_TOML_ESCAPED = re.compile(r'["\\\x00-\x1f\x7f]')


class CodexConfigError(Exception):
    """config.toml cannot be changed as asked; the message says why and what to do."""


def codex_provider_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not _TOML_BARE_KEY.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not an id of letters, digits, - and _")
    if value in CODEX_RESERVED_IDS:
        raise click.BadParameter(f"Codex keeps {value!r} for its built-in provider; "
                                 f"choose another id")
    return value


def codex_config_path() -> Path:
    """Codex's config.toml: in $CODEX_HOME when it is set (as Codex reads it), else ~/.codex."""
    home = os.environ.get("CODEX_HOME")
    return (Path(home) if home else Path.home() / ".codex") / "config.toml"


def codex_provider(name: str, base_url: str) -> dict[str, str]:
    """The ``[model_providers.<name>]`` table that sends Codex to the server at ``base_url``."""
    return {"name": name, "base_url": base_url, "env_key": CODEX_KEY_VARIABLE,
            "wire_api": "responses"}


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string."""
    def escape(match: re.Match[str]) -> str:
        char = match.group()
        return "\\" + char if char in '"\\' else f"\\u{ord(char):04x}"

    return '"' + _TOML_ESCAPED.sub(escape, value) + '"'


def toml_table(header: str, table: dict[str, str]) -> list[str]:
    return [f"[{header}]"] + [f"{key} = {toml_string(value)}" for key, value in table.items()]


def codex_snippet(name: str, provider: dict[str, str], model: str) -> str:
    """The lines of config.toml that make Codex use ``provider``."""
    return "\n".join([f"model = {toml_string(model)}", f"model_provider = {toml_string(name)}",
                      "", *toml_table(f"model_providers.{name}", provider)])


def load_toml(text: str) -> Json:
    """Parse TOML with tomllib; floats stay text, so that two parses compare exactly.

    Raises ValueError (tomllib's TOMLDecodeError) for text that is not TOML.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10: tomllib is new in 3.11
        raise CodexConfigError(
            f"kiro2api codex --write needs Python 3.11 or newer (for tomllib); this is "
            f"{sys.version_info[0]}.{sys.version_info[1]}: add the lines kiro2api codex prints "
            f"to {codex_config_path()} by hand") from None
    return tomllib.loads(text, parse_float=str)


def is_toml(text: str) -> bool:
    try:
        load_toml(text)
    except ValueError:
        return False
    return True


def first_table_header(lines: list[str]) -> int:
    """The index of the first table header in ``lines``, or ``len(lines)`` if there is none.

    A line that starts with "[" is a header only if the lines before it are a
    whole TOML document; otherwise it is inside a multi-line array or string.
    """
    for index, line in enumerate(lines):
        if line.lstrip().startswith("[") and is_toml("".join(f"{x}\n" for x in lines[:index])):
            return index
    return len(lines)


def set_top_level(lines: list[str], values: dict[str, str], eol: str) -> list[str]:
    """``lines`` with the top-level keys ``values`` set: the line that sets one now
    replaced, or else a new line after the other top-level keys (before the first
    table header and the comment lines right above it)."""
    lines, new = list(lines), []
    header = first_table_header(lines)
    for key, value in values.items():
        line = f"{key} = {toml_string(value)}{eol}"
        assignment = re.compile(rf"""\s*(?:{key}|"{key}"|'{key}')\s*=""")
        at = next((index for index in range(header) if assignment.match(lines[index])), None)
        if at is None:
            new.append(line)
        else:
            lines[at] = line
    if not new:
        return lines
    if header < len(lines):
        while header > 0 and lines[header - 1].lstrip().startswith("#"):
            header -= 1
        new.append(eol)  # a blank line between them and the table
    return lines[:header] + new + lines[header:]


def shown(value: Any) -> str:
    return toml_string(value) if isinstance(value, str) else repr(value)


def existing_codex_provider(doc: Json, name: str, provider: dict[str, str],
                            path: Path) -> bool:
    """True if ``doc`` has ``provider`` as ``name`` already; False if it has no provider
    of that name. Raises CodexConfigError if it has another one."""
    providers = doc.get("model_providers", {})
    if not isinstance(providers, dict):
        raise CodexConfigError(f"{path}: model_providers is not a table; fix it, then run "
                               f"kiro2api codex --write again")
    if name not in providers:
        return False
    found = providers[name]
    differ = [key for key in CODEX_PROVIDER_KEYS
              if not isinstance(found, dict) or found.get(key) != provider[key]]
    if differ:
        theirs = ", ".join(
            f"{key} {shown(found.get(key)) if isinstance(found, dict) else '?'}, not "
            f"{toml_string(provider[key])}" for key in differ)
        raise CodexConfigError(
            f"{path} already has a different [model_providers.{name}] ({theirs}); edit or "
            f"remove that table, or choose another id with --name")
    return True


def codex_top_level(doc: Json, name: str, model: str) -> tuple[dict[str, str], list[str]]:
    """The top-level keys config.toml needs for Codex to use ``name``, and what they change."""
    values, changes = {}, []
    if "model" not in doc:
        values["model"] = model
        changes.append(f"model = {toml_string(model)} (added)")
    current = doc.get("model_provider")
    if current != name:
        values["model_provider"] = name
        changes.append(f"model_provider = {toml_string(name)} (added)" if current is None
                       else f"model_provider: {shown(current)} -> {toml_string(name)}")
    return values, changes


def edit_codex_config(text: str, *, path: Path, name: str, provider: dict[str, str],
                      model: str) -> tuple[str | None, list[str]]:
    """config.toml's ``text`` with the provider added and chosen, and what that changed;
    None (and a note if Codex uses another provider) when it is there already.

    Only lines are added, and a model_provider line replaced: the rest of the
    file stays byte for byte. The result is parsed again and must hold exactly
    the old settings and the new ones.
    """
    try:
        doc = load_toml(text)
    except ValueError as exc:
        raise CodexConfigError(f"{path} is not valid TOML ({exc}); fix it, then run "
                               f"kiro2api codex --write again") from None
    if existing_codex_provider(doc, name, provider, path):
        current = doc.get("model_provider")
        return None, [] if current == name else [
            f"model_provider is {shown(current) if current is not None else 'not set'}, so "
            f"Codex uses {name} only if you set model_provider = {toml_string(name)}"]
    eol = "\r" if "\r\n" in text else ""  # keep the file's line ends
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the text ended with a line end, or was empty
    values, changes = codex_top_level(doc, name, model)
    lines = set_top_level(lines, values, eol)
    if lines and lines[-1].strip():
        lines.append(eol)
    lines += [line + eol for line in toml_table(f"model_providers.{name}", provider)]
    result = "".join(f"{line}\n" for line in lines)
    check_codex_edit(result, {**doc, **values, "model_providers": {
        **doc.get("model_providers", {}), name: provider}}, path)
    return result, [f"[model_providers.{name}] added: base_url = "
                    f"{toml_string(provider['base_url'])}, wire_api = \"responses\"", *changes]


def check_codex_edit(result: str, expected: Json, path: Path) -> None:
    """Raise CodexConfigError unless ``result`` parses to ``expected``."""
    try:
        same = load_toml(result) == expected
        why = "it would change other settings"
    except ValueError as exc:
        same, why = False, f"the result would not be valid TOML: {exc}"
    if not same:
        raise CodexConfigError(f"cannot add the provider to {path} safely ({why}); add the "
                               f"lines kiro2api codex prints by hand")


def write_codex_config(path: Path, *, name: str, provider: dict[str, str],
                       model: str) -> list[str]:
    """Add the provider to the config.toml at ``path`` (created if missing, with its
    directory) and say what changed, one line each."""
    try:
        raw: bytes | None = path.read_bytes()
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raw, mode = None, 0o600
    except OSError as exc:
        raise CodexConfigError(f"cannot read {path} ({exc.strerror or exc}); check that it "
                               f"is a readable file") from None
    try:
        text = "" if raw is None else raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CodexConfigError(f"{path} is not valid TOML (not UTF-8 text); fix it, then run "
                               f"kiro2api codex --write again") from None
    result, changes = edit_codex_config(text, path=path, name=name, provider=provider,
                                        model=model)
    if result is None:
        return [f"{path} already has this [model_providers.{name}]; nothing to do.",
                *(f"Note: {change}." for change in changes)]
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_bytes_atomic(path, result.encode("utf-8"), mode=mode)
    except OSError as exc:
        raise CodexConfigError(f"cannot write {path} ({exc.strerror or exc}); check its "
                               f"directory's permissions") from None
    return [f"{'Created' if raw is None else 'Updated'} {path}:",
            *(f"  {change}" for change in changes)]


@cli.command()
@host_option("The server's --host.")
@port_option(f"The server's --port [default: {DEFAULT_PORT}].")
@click.option("--name", default="kiro2api", show_default=True, callback=codex_provider_id,
              help="Codex's id of the provider (model_provider).")
@click.option("--model", default=CODEX_DEFAULT_MODEL, show_default=True,
              help="The model Codex asks for; --write sets it only if config.toml has none.")
@click.option("--write", is_flag=True,
              help="Add the provider to $CODEX_HOME/config.toml (~/.codex/config.toml).")
def codex(host: str, port: int | None, name: str, model: str, write: bool) -> None:
    """Point Codex at the server: print its model provider, or add it to config.toml.

    The provider sends Codex's requests to the server's /v1/responses, with
    the key from KIRO2API_KEY, which kiro2api export sets. With --write it is
    added to Codex's config.toml and made its model_provider; the rest of the
    file stays as it is, and a different provider of the same id is refused.

    \b
    Examples:
      kiro2api codex                        # print the lines
      kiro2api codex --write                # add them to ~/.codex/config.toml
      eval "$(kiro2api export)" && codex    # with kiro2api server running
    """
    provider = codex_provider(
        name, client_base_url(host, DEFAULT_PORT if port is None else port) + "/v1")
    path = codex_config_path()
    if write:
        try:
            report = write_codex_config(path, name=name, provider=provider, model=model)
        except CodexConfigError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo("\n".join(report))
    else:
        click.echo(codex_snippet(name, provider, model))
        click.echo(f"\nPut these lines in {path} (model and model_provider above any table), "
                   f"or run kiro2api codex --write.", err=True)
    click.echo(f"Then set {CODEX_KEY_VARIABLE} (eval \"$(kiro2api export)\" does) and run "
               f"codex, with kiro2api server running.", err=True)


if __name__ == "__main__":
    # As the module kiro2api, not __main__: a worker of --workers is handed its
    # Config pickled, and unpickles it by the classes' module name.
    import kiro2api

    kiro2api.cli()
