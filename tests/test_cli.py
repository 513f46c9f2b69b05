"""The command line: help, version, how ``server`` builds its Config, and the
token commands (read, refresh, export, authToken, claude, codex)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

import kiro2api
from fakes import Status
from helpers import (
    CLIENT_SECRET, IDC_ACCESS, PROFILE_ARN, SOCIAL_ACCESS, SOCIAL_REFRESH, write_token,
)


@pytest.fixture
def served(monkeypatch):
    """Capture the Config ``server`` would run with, without binding a port."""
    seen: list[kiro2api.Config] = []
    monkeypatch.setattr(kiro2api, "serve", seen.append)
    return seen


def test_help_lists_every_command():
    result = CliRunner().invoke(kiro2api.cli, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("read", "refresh", "export", "authToken", "claude", "codex", "doctor",
                    "usage", "server"):
        assert f"\n  {command} " in result.output


def test_version():
    result = CliRunner().invoke(kiro2api.cli, ["--version"])
    assert result.exit_code == 0, result.output
    assert kiro2api.__version__ in result.output


def test_server_defaults(served, isolated_env):
    result = CliRunner().invoke(kiro2api.cli, ["server"])
    assert result.exit_code == 0, result.output
    (config,) = served
    assert (config.host, config.port, config.api_key) == ("127.0.0.1", 8080, None)
    assert config.token_files == (isolated_env / ".aws/sso/cache/kiro-auth-token.json",)


def test_server_positional_port_and_key(served):
    result = CliRunner().invoke(kiro2api.cli, ["server", "9000", "sekrit"])
    assert result.exit_code == 0, result.output
    assert (served[0].port, served[0].api_key) == (9000, "sekrit")


def test_server_option_beats_environment(served, monkeypatch):
    monkeypatch.setenv("KIRO2API_PORT", "7000")
    monkeypatch.setenv("KIRO2API_HOST", "0.0.0.0")
    result = CliRunner().invoke(kiro2api.cli, ["server", "--port", "7001"])
    assert result.exit_code == 0, result.output
    assert (served[0].host, served[0].port) == ("0.0.0.0", 7001)


def test_backlog_is_1024_or_more_by_default_and_set_by_option_or_variable(served, monkeypatch):
    result = CliRunner().invoke(kiro2api.cli, ["server"])
    assert result.exit_code == 0, result.output
    assert served[0].backlog >= 1024
    monkeypatch.setenv("KIRO2API_BACKLOG", "3000")
    result = CliRunner().invoke(kiro2api.cli, ["server"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(kiro2api.cli, ["server", "--backlog", "4000"])
    assert result.exit_code == 0, result.output
    assert [config.backlog for config in served[1:]] == [3000, 4000]


def test_backlog_must_be_positive(served):
    result = CliRunner().invoke(kiro2api.cli, ["server", "--backlog", "0"])
    assert result.exit_code == 2, result.output
    assert "--backlog" in result.output and served == []


def test_serve_tunes_the_collector_once_the_app_has_started(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(kiro2api.web, "run_app",
                        lambda app, **options: started.append(app) or options["loop"].close())
    kiro2api.serve(kiro2api.Config(token_files=(tmp_path / "token.json",)))
    (app,) = started
    assert list(app.on_startup)[-1] is kiro2api.tune_gc  # after the cleanup contexts


async def test_tune_gc_freezes_what_is_alive_and_sets_the_thresholds():
    before = gc.get_threshold()
    try:
        await kiro2api.tune_gc(kiro2api.web.Application())
        assert gc.get_threshold() == kiro2api.GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_make_app_leaves_the_collector_alone(tmp_path):
    kiro2api.make_app(kiro2api.Config(token_files=(tmp_path / "token.json",)))
    assert gc.get_freeze_count() == 0 and gc.get_threshold() != kiro2api.GC_THRESHOLDS


@pytest.mark.parametrize(("wanted", "installed", "runs"), [
    ("auto", True, "uvloop"), ("auto", False, "asyncio"), ("asyncio", True, "asyncio"),
    ("asyncio", False, "asyncio"), ("uvloop", True, "uvloop")])
def test_loop_choice(wanted, installed, runs):
    assert kiro2api.choose_loop(wanted, uvloop=installed) == runs


@pytest.mark.parametrize("installed", [True, False], ids=["uvloop installed", "no uvloop"])
def test_loop_is_auto_by_default_and_set_by_option_or_variable(served, monkeypatch, installed):
    monkeypatch.setattr(kiro2api, "uvloop_installed", lambda: installed)
    result = CliRunner().invoke(kiro2api.cli, ["server"])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("KIRO2API_LOOP", "asyncio")
    result = CliRunner().invoke(kiro2api.cli, ["server"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(kiro2api.cli, ["server", "--loop", "auto"])
    assert result.exit_code == 0, result.output
    best = "uvloop" if installed else "asyncio"
    assert [config.loop for config in served] == [best, "asyncio", best]


def test_uvloop_asked_for_and_missing_is_a_usage_error(served, monkeypatch):
    monkeypatch.setattr(kiro2api, "uvloop_installed", lambda: False)
    for args, env in ((["--loop", "uvloop"], {}), ([], {"KIRO2API_LOOP": "uvloop"})):
        result = CliRunner().invoke(kiro2api.cli, ["server", *args], env=env)
        assert result.exit_code == 2, result.output
        assert "needs the uvloop package" in result.output and "kiro2api[speed]" in result.output
    assert served == []


def test_loop_refuses_an_unknown_name(served):
    result = CliRunner().invoke(kiro2api.cli, ["server", "--loop", "trio"])
    assert result.exit_code == 2, result.output
    assert "--loop" in result.output and served == []


def test_serve_runs_asyncio_own_loop_when_told(monkeypatch, tmp_path):
    loops = []
    monkeypatch.setattr(kiro2api.web, "run_app", lambda app, **options: loops.append(
        options["loop"]))
    kiro2api.serve(kiro2api.Config(token_files=(tmp_path / "token.json",), loop="asyncio"))
    (loop,) = loops
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_server_rejects_bad_port(served, port):
    result = CliRunner().invoke(kiro2api.cli, ["server", "--port", port])
    assert result.exit_code == 2, result.output
    assert served == []


@pytest.mark.parametrize("args", [["--host", "0.0.0.0", "8080", ""], ["--api-key", " "]],
                         ids=["positional", "option"])
def test_server_refuses_an_empty_api_key(served, args):
    # `kiro2api server 8080 "$KEY"` with KEY unset must not leave the door open.
    result = CliRunner().invoke(kiro2api.cli, ["server", *args])
    assert result.exit_code == 2, result.output
    assert "the API key is empty" in result.output
    assert served == []


@pytest.mark.parametrize("host, why", [
    ("999.1.1.1", "'999.1.1.1' is not an IPv4 address"),
    ("1.2.3", "'1.2.3' is not an IPv4 address"),
    ("a..b", "'a..b' is neither an IP address nor a host name"),
    ("kiro lan", "'kiro lan' is neither an IP address nor a host name"),
    ("[10.0.0.1]", "brackets hold an IPv6 address"),
])
@pytest.mark.parametrize("command", ["server", "export", "codex"])
def test_a_host_that_is_no_address_nor_name_is_refused_before_any_lookup(served, command, host,
                                                                          why):
    result = CliRunner().invoke(kiro2api.cli, [command, "--host", host])
    assert result.exit_code == 2, result.output
    assert why in result.output
    assert "Unknown error" not in result.output and served == []


@pytest.mark.parametrize("host, kept", [("[::1]", "::1"), ("fe80::1%eth0", "fe80::1%eth0"),
                                        ("kiro.lan", "kiro.lan"), ("my_proxy", "my_proxy"),
                                        ("", "")])
def test_server_takes_addresses_and_host_names(served, host, kept):
    result = CliRunner().invoke(kiro2api.cli, ["server", "--host", host])
    assert result.exit_code == 0, result.output
    assert served[0].host == kept


def test_server_rejects_two_different_ports(served):
    result = CliRunner().invoke(kiro2api.cli, ["server", "9000", "--port", "9001"])
    assert result.exit_code == 2, result.output
    assert "port given twice" in result.output


def test_server_rejects_two_different_keys(served):
    result = CliRunner().invoke(kiro2api.cli, ["server", "9000", "one", "--api-key", "two"])
    assert result.exit_code == 2, result.output
    assert "API key given both as an argument and as --api-key" in result.output
    assert served == []


@pytest.mark.parametrize("args", [["9000", "sekrit", "--port", "9000"],
                                  ["9000", "sekrit", "--api-key", "sekrit"]],
                         ids=["port", "key"])
def test_server_takes_the_same_value_given_both_ways(served, args):
    result = CliRunner().invoke(kiro2api.cli, ["server", *args])
    assert result.exit_code == 0, result.output
    assert (served[0].port, served[0].api_key) == (9000, "sekrit")


def test_server_positional_port_and_key_beat_the_environment(served, monkeypatch):
    # The command line wins, as for the options; the variables were never typed.
    monkeypatch.setenv("KIRO2API_PORT", "18502")
    monkeypatch.setenv("KIRO2API_API_KEY", "from-env")
    result = CliRunner().invoke(kiro2api.cli, ["server", "18503", "from-argument"])
    assert result.exit_code == 0, result.output
    assert (served[0].port, served[0].api_key) == (18503, "from-argument")
    result = CliRunner().invoke(kiro2api.cli, ["server", "18504"])
    assert result.exit_code == 0, result.output
    assert (served[1].port, served[1].api_key) == (18504, "from-env")


def test_server_no_auth_names_the_variable_that_set_a_key(served, monkeypatch):
    monkeypatch.setenv("KIRO2API_API_KEY", "from-env")
    result = CliRunner().invoke(kiro2api.cli, ["server", "--no-auth"])
    assert result.exit_code == 2, result.output
    assert "--no-auth and KIRO2API_API_KEY contradict each other" in result.output
    result = CliRunner().invoke(kiro2api.cli, ["server", "--no-auth", "8080", "k"])
    assert result.exit_code == 2, result.output
    assert "--no-auth and an API key contradict each other" in result.output
    assert served == []


def test_server_token_files_repeat(served, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    result = CliRunner().invoke(
        kiro2api.cli, ["server", "--token-file", str(a), "--token-file", str(b)]
    )
    assert result.exit_code == 0, result.output
    assert served[0].token_files == (Path(a), Path(b))



# Token commands ###########################################################
#
# Commands that may refresh run in a thread (``invoke_async``) so that the
# test's event loop keeps serving the fake auth service meanwhile.

MAIN = Path(kiro2api.__file__).resolve().parent


def invoke(*args, env=None):
    return CliRunner().invoke(kiro2api.cli, list(args), env=env)


async def invoke_async(*args, env=None):
    return await asyncio.to_thread(invoke, *args, env=env)


def assert_fails_cleanly(result, *expected):
    """Exit 1 with one ``Error:`` line holding ``expected``, and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in result.output


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def token_file(isolated_env):
    """The default token file, under the isolated HOME."""
    path = isolated_env / ".aws/sso/cache/kiro-auth-token.json"
    path.parent.mkdir(parents=True)
    return path


# read


def test_read_shows_the_login_with_tokens_masked(token_file):
    write_token(token_file, expires_in=3000)
    result = invoke("read")
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"Token file:    {token_file}\n" in out
    assert "Auth method:   social (Google)\n" in out
    assert "Region:        us-east-1\n" in out
    assert f"Profile ARN:   {PROFILE_ARN}\n" in out
    assert ", in 49 min\n" in out
    assert f"Access token:  {SOCIAL_ACCESS[:6]}...{SOCIAL_ACCESS[-4:]} (" in out
    assert SOCIAL_ACCESS not in out and SOCIAL_REFRESH not in out


def test_read_shows_an_expired_and_an_unknown_expiry(tmp_path):
    expired, unknown = tmp_path / "expired.json", tmp_path / "unknown.json"
    write_token(expired, expires_in=-7230)
    write_token(unknown, expiresAt=None)
    result = invoke("read", "--token-file", str(expired), "--token-file", str(unknown))
    assert result.exit_code == 0, result.output
    assert ", expired 2 h 0 min ago\n" in result.output
    assert "Expires:       unknown" in result.output


def test_read_json(token_file):
    write_token(token_file, method="idc", expires_in=600)
    result = invoke("read", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["path"] == str(token_file)
    assert (shown["auth_method"], shown["provider"], shown["region"], shown["profile_arn"]) == (
        "idc", "BuilderId", "us-east-1", None)
    assert 590 < shown["seconds_left"] <= 600 and shown["expired"] is False
    assert shown["access_token"].startswith(IDC_ACCESS[:6] + "...")
    assert IDC_ACCESS not in result.output and CLIENT_SECRET not in result.output


def test_read_json_lists_several_files_from_the_environment(tmp_path, monkeypatch):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_token(a)
    write_token(b, method="idc")
    monkeypatch.setenv("KIRO2API_TOKEN_FILE", f"{a}{os.pathsep}{b}")
    result = invoke("read", "--json")
    assert result.exit_code == 0, result.output
    assert [s["auth_method"] for s in json.loads(result.output)] == ["social", "idc"]


def test_read_token_file_option_beats_environment(tmp_path, monkeypatch):
    good = tmp_path / "good.json"
    write_token(good)
    monkeypatch.setenv("KIRO2API_TOKEN_FILE", str(tmp_path / "missing.json"))
    result = invoke("read", "--token-file", str(good))
    assert result.exit_code == 0, result.output
    assert str(good) in result.output


@pytest.mark.parametrize("command", [["read"], ["export", "--shell", "posix"], ["authToken"]])
def test_token_file_from_environment_and_option_beats_it(tmp_path, monkeypatch, command):
    from_env, from_option = tmp_path / "env.json", tmp_path / "option.json"
    write_token(from_env, accessToken="aoa-from-env-" + "e" * 30)
    write_token(from_option, accessToken="aoa-from-option-" + "o" * 30)
    monkeypatch.setenv("KIRO2API_TOKEN_FILE", str(from_env))
    result = invoke(*command)
    assert result.exit_code == 0, result.output
    # Even masked (read), the token's end tells the files apart.
    assert "eeee" in result.stdout and "oooo" not in result.stdout
    result = invoke(*command, "--token-file", str(from_option))
    assert result.exit_code == 0, result.output
    assert "oooo" in result.stdout and "eeee" not in result.stdout


BAD_TOKEN_FILES = {
    "missing": (lambda p: None, "does not exist; log in to Kiro first"),
    "unreadable": (lambda p: p.mkdir(), "cannot read"),
    "invalid-json": (lambda p: p.write_text("{nope"), "is not valid JSON"),
    "missing-fields": (lambda p: p.write_text('{"accessToken": "x"}'), "has no refreshToken"),
}


@pytest.mark.parametrize("case", BAD_TOKEN_FILES, ids=list(BAD_TOKEN_FILES))
@pytest.mark.parametrize("command", ["read", "refresh", "export", "authToken"])
def test_bad_token_file_fails_every_command_cleanly(token_file, command, case):
    make, expected = BAD_TOKEN_FILES[case]
    make(token_file)
    result = invoke(command)
    assert_fails_cleanly(result, str(token_file), expected)
    assert result.stdout == ""


@pytest.mark.parametrize("case", BAD_TOKEN_FILES, ids=list(BAD_TOKEN_FILES))
def test_read_json_with_a_bad_token_file_prints_no_json(token_file, case):
    make, expected = BAD_TOKEN_FILES[case]
    make(token_file)
    result = invoke("read", "--json")
    assert_fails_cleanly(result, str(token_file), expected)
    assert result.stdout == ""


def test_read_shows_the_good_files_and_fails_for_the_bad_one(tmp_path):
    good = tmp_path / "good.json"
    write_token(good)
    result = invoke("read", "--token-file", str(good), "--token-file", str(tmp_path / "x.json"))
    assert_fails_cleanly(result, "x.json does not exist")
    assert str(good) in result.stdout


# refresh


async def test_refresh_writes_the_new_token_and_prints_its_expiry(token_file, fake_upstream):
    write_token(token_file, expires_in=1200, ideOnly=1)
    result = await invoke_async("refresh", "--social-auth-url", fake_upstream.url)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Refreshed {token_file}; expires ")
    assert result.output.endswith(", in 59 min.\n")
    saved = json.loads(token_file.read_text())
    assert (saved["accessToken"], saved["ideOnly"]) == ("aoa-social-access-1", 1)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert [r.body for r in fake_upstream.requests] == [{"refreshToken": SOCIAL_REFRESH}]


async def test_refresh_an_idc_login(token_file, fake_upstream):
    write_token(token_file, method="idc")
    result = await invoke_async("refresh", "--oidc-url", fake_upstream.url)
    assert result.exit_code == 0, result.output
    assert fake_upstream.requests[0].path == "/token"
    assert json.loads(token_file.read_text())["accessToken"] == "aoa-idc-access-1"


async def test_refresh_takes_every_account_and_fails_only_for_the_bad_one(tmp_path,
                                                                        fake_upstream):
    social, idc, missing = tmp_path / "social.json", tmp_path / "idc.json", tmp_path / "x.json"
    write_token(social)
    write_token(idc, method="idc")
    result = await invoke_async("refresh", "--token-file", str(social), "--token-file", str(idc),
                                "--token-file", str(missing), "--social-auth-url",
                                fake_upstream.url, "--oidc-url", fake_upstream.url)
    assert_fails_cleanly(result, "x.json does not exist")
    assert [line.split(";")[0] for line in result.stdout.splitlines()] == [
        f"Refreshed {social}", f"Refreshed {idc}"]
    assert json.loads(social.read_text())["accessToken"] == "aoa-social-access-1"
    assert json.loads(idc.read_text())["accessToken"] == "aoa-idc-access-2"
    assert [r.path for r in fake_upstream.requests] == ["/refreshToken", "/token"]


REFRESH_FAILURES = {
    "refused": (Status(400, {"error": "invalid_grant"}), "invalid_grant); log in to Kiro again"),
    "garbage": (Status(200, "<html>"), "with no JSON; check --social-auth-url"),
    "server-error": (Status(502, {"message": "bad gateway"}), "HTTP 502: bad gateway"),
}


@pytest.mark.parametrize("case", REFRESH_FAILURES, ids=list(REFRESH_FAILURES))
async def test_refresh_failure_is_one_line_and_leaves_the_file(token_file, fake_upstream, case):
    reply, expected = REFRESH_FAILURES[case]
    write_token(token_file)
    before = token_file.read_bytes()
    fake_upstream.auth_script.append(reply)
    result = await invoke_async("refresh", "--social-auth-url", fake_upstream.url)
    assert_fails_cleanly(result, f"{fake_upstream.url}/refreshToken", expected)
    assert token_file.read_bytes() == before


@pytest.fixture
def read_only(tmp_path):
    """Make a directory unwritable for this process: a read-only bind mount for
    root (whom permissions do not stop), mode 0500 for anyone else."""
    made: list[Path] = []

    def make(directory: Path) -> None:
        if os.geteuid() != 0:
            directory.chmod(0o500)
        else:
            mounts = (["mount", "--bind", str(directory), str(directory)],
                      ["mount", "-o", "remount,bind,ro", str(directory)])
            for command in mounts:
                done = subprocess.run(command, capture_output=True)
                if done.returncode != 0:
                    if made:
                        subprocess.run(["umount", str(directory)], check=True)
                    pytest.skip(f"cannot make a read-only mount here: {done.stderr!r}")
                made.append(directory)
        assert not os.access(directory, os.W_OK)

    yield make
    for directory in made[:1]:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.parametrize("command", ["refresh", "export", "authToken"])
@pytest.mark.slow  # mount(8), when root
async def test_a_file_that_cannot_be_written_is_not_refreshed(
        tmp_path, fake_upstream, read_only, command):
    # The auth service may retire the old refresh token: refreshing what cannot
    # be saved would leave a file whose refresh token no longer works.
    token_file = tmp_path / "cache" / "kiro-auth-token.json"
    token_file.parent.mkdir()
    write_token(token_file, expires_in=-60)
    before = token_file.read_bytes()
    read_only(token_file.parent)
    result = await invoke_async(command, "--token-file", str(token_file),
                                "--social-auth-url", fake_upstream.url)
    assert_fails_cleanly(result, f"cannot write {token_file}",
                         "make the file and its directory writable")
    assert fake_upstream.requests == []
    assert token_file.read_bytes() == before


def test_refresh_with_the_auth_service_down(token_file):
    write_token(token_file)
    before = token_file.read_bytes()
    url = closed_port_url()
    result = invoke("refresh", "--social-auth-url", url)
    assert_fails_cleanly(result, f"cannot reach {url}/refreshToken", "check the network")
    assert token_file.read_bytes() == before


@pytest.mark.parametrize("url", ["notaurl", "ftp://example.com"])
def test_refresh_with_a_url_that_is_not_http(token_file, url):
    write_token(token_file)
    result = invoke("refresh", "--social-auth-url", url)
    assert_fails_cleanly(result, f"cannot reach {url}/refreshToken (not a valid http(s) URL)")


async def test_refresh_url_from_environment_and_option_beats_it(
        token_file, fake_upstream, monkeypatch):
    write_token(token_file)
    monkeypatch.setenv("KIRO2API_SOCIAL_AUTH_URL", fake_upstream.url)
    result = await invoke_async("refresh")
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("KIRO2API_SOCIAL_AUTH_URL", closed_port_url())
    result = await invoke_async("refresh", "--social-auth-url", fake_upstream.url)
    assert result.exit_code == 0, result.output
    assert fake_upstream.refreshes == 2


# Commands that refresh an expired token first, when the auth service fails

AUTH_FAILURES = {
    "down": (None, "cannot reach {url}/refreshToken"),
    "garbage": (Status(200, "<html>"), "{url}/refreshToken answered HTTP 200 with no JSON"),
    "no-token": (Status(200, {"expiresIn": 60}), "an answer without an accessToken"),
    "refused": (Status(401, {"message": "Invalid refresh token provided"}),
                "log in to Kiro again"),
}


@pytest.mark.parametrize("case", AUTH_FAILURES, ids=list(AUTH_FAILURES))
@pytest.mark.parametrize("command", [["refresh"], ["export", "--shell", "posix"], ["authToken"]])
async def test_auth_service_failure_fails_every_refreshing_command_cleanly(
        token_file, fake_upstream, command, case):
    reply, expected = AUTH_FAILURES[case]
    write_token(token_file, expires_in=-60)
    before = token_file.read_bytes()
    if reply is None:
        url = closed_port_url()
    else:
        url = fake_upstream.url
        fake_upstream.auth_script.append(reply)
    result = await invoke_async(*command, "--social-auth-url", url)
    assert_fails_cleanly(result, expected.format(url=url))
    assert result.stdout == ""
    assert token_file.read_bytes() == before
    assert sorted(p.name for p in token_file.parent.iterdir()) == [
        token_file.name, token_file.name + ".lock"]


@pytest.mark.parametrize("case", ["down", "refused"])
@pytest.mark.parametrize("command", [["export", "--shell", "posix"], ["authToken"]],
                         ids=["export", "authToken"])
async def test_a_token_that_still_works_is_printed_with_a_warning_when_the_refresh_fails(
        token_file, fake_upstream, command, case):
    write_token(token_file, expires_in=240)
    before = token_file.read_bytes()
    reply, expected = AUTH_FAILURES[case]
    if reply is None:
        url = closed_port_url()
    else:
        url = fake_upstream.url
        fake_upstream.auth_script.append(reply)
    result = await invoke_async(*command, "--social-auth-url", url)
    assert result.exit_code == 0, result.output
    if command[0] == "authToken":
        assert result.stdout == SOCIAL_ACCESS + "\n"
    else:
        assert result.stdout.splitlines()[1:] == [f"export ANTHROPIC_AUTH_TOKEN={SOCIAL_ACCESS}",
                                                  f"export KIRO2API_KEY={SOCIAL_ACCESS}"]
    warning = result.stderr.splitlines()[:2]
    assert warning[0].startswith("Warning: the token could not be refreshed: ")
    assert expected.format(url=url) in warning[0]
    assert warning[1].startswith("The token printed is the current one; it expires ")
    assert warning[1].endswith((", in 3 min.", ", in 4 min."))
    assert token_file.read_bytes() == before


async def test_idc_refresh_answered_with_garbage_fails_cleanly(token_file, fake_upstream):
    write_token(token_file, method="idc", expires_in=-60)
    before = token_file.read_bytes()
    fake_upstream.auth_script.append(Status(200, "not json"))
    result = await invoke_async("authToken", "--oidc-url", fake_upstream.url)
    assert_fails_cleanly(result, f"{fake_upstream.url}/token answered HTTP 200 with no JSON",
                         "check --oidc-url")
    assert token_file.read_bytes() == before


# export


def test_export_posix_lines_with_the_client_key(token_file):
    result = invoke("export", "--api-key", "client-key")
    assert result.exit_code == 0, result.output
    assert result.output == ("export ANTHROPIC_BASE_URL=http://127.0.0.1:8080\n"
                             "export ANTHROPIC_AUTH_TOKEN=client-key\n"
                             "export KIRO2API_KEY=client-key\n")


def test_export_without_a_key_prints_the_access_token(token_file):
    write_token(token_file)
    result = invoke("export", "--shell", "posix")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1:] == [f"export ANTHROPIC_AUTH_TOKEN={SOCIAL_ACCESS}",
                                              f"export KIRO2API_KEY={SOCIAL_ACCESS}"]


async def test_export_refreshes_an_expired_token_first(token_file, fake_upstream, monkeypatch):
    write_token(token_file, expires_in=-60)
    monkeypatch.setenv("KIRO2API_SOCIAL_AUTH_URL", fake_upstream.url)
    result = await invoke_async("export", "--shell", "posix")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1:] == ["export ANTHROPIC_AUTH_TOKEN=aoa-social-access-1",
                                              "export KIRO2API_KEY=aoa-social-access-1"]
    assert json.loads(token_file.read_text())["accessToken"] == "aoa-social-access-1"


@pytest.mark.parametrize("host, port, url", [
    ("127.0.0.1", None, "http://127.0.0.1:8080"),
    ("0.0.0.0", "9000", "http://127.0.0.1:9000"),
    ("", "9000", "http://127.0.0.1:9000"),  # every address, both families
    ("localhost", "9000", "http://127.0.0.1:9000"),
    ("127.0.0.2", "9000", "http://127.0.0.2:9000"),
    ("::", "9000", "http://[::1]:9000"),
    ("::1", "9000", "http://[::1]:9000"),
    ("[::1]", "9000", "http://[::1]:9000"),
    ("192.168.1.5", None, "http://192.168.1.5:8080"),
    ("2001:db8::5", "80", "http://[2001:db8::5]:80"),
    ("fe80::1%eth0", "80", "http://[fe80::1%25eth0]:80"),
    ("kiro.lan", "8443", "http://kiro.lan:8443"),
])
def test_export_base_url(host, port, url):
    args = ["export", "--api-key", "k", "--host", host] + (["--port", port] if port else [])
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"export ANTHROPIC_BASE_URL={shlex.quote(url)}"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def answer_here(request: web.Request) -> web.Response:
    return web.Response(text="here")


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "localhost", "::1", "::"])
async def test_export_names_an_address_the_server_answers_on(host):
    # Listen as `kiro2api server --host HOST` does (aiohttp's TCPSite, through
    # asyncio), then connect to what export prints: no resolver, no happy eyeballs.
    if ":" in host and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    app = web.Application()
    app.router.add_get("/", answer_here)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, 0).start()
        port = runner.addresses[0][1]
        url = kiro2api.client_base_url(host, port)
        async with aiohttp.ClientSession() as session, session.get(url + "/") as response:
            assert await response.text() == "here", url
    finally:
        await runner.cleanup()


def test_export_options_beat_environment(monkeypatch):
    monkeypatch.setenv("KIRO2API_HOST", "10.0.0.2")
    monkeypatch.setenv("KIRO2API_PORT", "7000")
    monkeypatch.setenv("KIRO2API_API_KEY", "from-env")
    result = invoke("export")
    assert result.exit_code == 0, result.output
    assert result.output == ("export ANTHROPIC_BASE_URL=http://10.0.0.2:7000\n"
                             "export ANTHROPIC_AUTH_TOKEN=from-env\n"
                             "export KIRO2API_KEY=from-env\n")
    result = invoke("export", "--port", "7001", "--api-key", "from-option")
    assert result.exit_code == 0, result.output
    assert result.output == ("export ANTHROPIC_BASE_URL=http://10.0.0.2:7001\n"
                             "export ANTHROPIC_AUTH_TOKEN=from-option\n"
                             "export KIRO2API_KEY=from-option\n")


@pytest.mark.parametrize("shell, lines", [
    ("posix", ["export ANTHROPIC_BASE_URL=http://127.0.0.1:8080",
               "export ANTHROPIC_AUTH_TOKEN='k'\"'\"'y \\ $x&^'",
               "export KIRO2API_KEY='k'\"'\"'y \\ $x&^'"]),
    ("fish", ["set -gx ANTHROPIC_BASE_URL 'http://127.0.0.1:8080'",
              "set -gx ANTHROPIC_AUTH_TOKEN 'k\\'y \\\\ $x&^'",
              "set -gx KIRO2API_KEY 'k\\'y \\\\ $x&^'"]),
    ("powershell", ["$env:ANTHROPIC_BASE_URL = 'http://127.0.0.1:8080'",
                    "$env:ANTHROPIC_AUTH_TOKEN = 'k''y \\ $x&^'",
                    "$env:KIRO2API_KEY = 'k''y \\ $x&^'"]),
    ("cmd", ['set "ANTHROPIC_BASE_URL=http://127.0.0.1:8080"',
             'set "ANTHROPIC_AUTH_TOKEN=k\'y \\ $x&^"',
             'set "KIRO2API_KEY=k\'y \\ $x&^"']),
])
def test_export_quotes_for_each_shell(shell, lines):
    result = invoke("export", "--shell", shell, "--api-key", "k'y \\ $x&^")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == lines


@pytest.mark.parametrize("alias, shell", [("bash", "posix"), ("zsh", "posix"), ("sh", "posix"),
                                          ("pwsh", "powershell")])
def test_export_takes_the_names_of_the_shells_too(alias, shell):
    result = invoke("export", "--shell", alias, "--api-key", "k'y")
    assert result.exit_code == 0, result.output
    assert result.output == invoke("export", "--shell", shell, "--api-key", "k'y").output


def test_powershell_quoting_doubles_curly_single_quotes_too():
    line = kiro2api.shell_assignment("powershell", "K", "a\u2019b")
    assert line == "$env:K = 'a\u2019\u2019b'"


@pytest.mark.parametrize("key", ['say "hi"', "100%", "bang!", "two\nlines"])
def test_export_refuses_what_cmd_cannot_quote(key):
    result = invoke("export", "--shell", "cmd", "--api-key", key)
    assert_fails_cleanly(result, "cmd cannot quote safely; use --shell powershell")
    assert result.stdout == ""


@pytest.mark.parametrize("platform, shell", [("linux", "posix"), ("darwin", "posix"),
                                             ("win32", "powershell"), ("cygwin", "posix")])
def test_default_shell_follows_the_os(platform, shell):
    assert kiro2api.default_shell(platform) == shell


NASTY_KEY = "it's \"quoted\" $(touch PWNED) `touch PWNED` ; | & \\ * ~ ! # {a,b} \n2nd line"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shells")
@pytest.mark.parametrize("sh", ["bash", "sh"])
@pytest.mark.slow  # a real shell
def test_eval_export_in_a_real_shell(tmp_path, sh):
    script = ('eval "$("$PYTHON" "$KIRO2API" export)"; '
              'printf "%s\\n%s\\n%s" "$ANTHROPIC_BASE_URL" "$ANTHROPIC_AUTH_TOKEN" "$KIRO2API_KEY"')
    env = {**os.environ, "PYTHON": sys.executable, "KIRO2API": str(MAIN / "kiro2api.py"),
           "KIRO2API_API_KEY": NASTY_KEY, "KIRO2API_PORT": "9123"}
    done = subprocess.run([sh, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"http://127.0.0.1:9123\n{NASTY_KEY}\n{NASTY_KEY}"
    assert not (tmp_path / "PWNED").exists()


# authToken


def test_auth_token_prints_the_token_alone_on_stdout(token_file):
    write_token(token_file)
    result = invoke("authToken")
    assert result.exit_code == 0, result.output
    assert result.stdout == SOCIAL_ACCESS + "\n"
    assert str(token_file) in result.stderr
    assert 'eval "$(kiro2api export)"' in result.stderr


async def test_auth_token_refreshes_an_expired_token(token_file, fake_upstream):
    write_token(token_file, expires_in=-60)
    result = await invoke_async("authToken", "--social-auth-url", fake_upstream.url)
    assert result.exit_code == 0, result.output
    assert result.stdout == "aoa-social-access-1\n"


# claude


@pytest.fixture
def claude_json(isolated_env):
    return isolated_env / ".claude.json"


def test_claude_creates_the_file(claude_json):
    result = invoke("claude")
    assert result.exit_code == 0, result.output
    assert json.loads(claude_json.read_text()) == {"hasCompletedOnboarding": True,
                                                   "kiro2api": True}
    assert stat.S_IMODE(claude_json.stat().st_mode) == 0o600


def test_claude_keeps_every_key_their_order_and_the_mode(claude_json):
    original = {"numStartups": 3, "hasCompletedOnboarding": False, "projects": {"/ü": {"a": 1}},
                "userID": "abc"}
    claude_json.write_text(json.dumps(original))
    claude_json.chmod(0o640)
    result = invoke("claude")
    assert result.exit_code == 0, result.output
    assert f"Updated {claude_json}" in result.output
    after = json.loads(claude_json.read_text())
    assert list(after.items()) == [("numStartups", 3), ("hasCompletedOnboarding", True),
                                   ("projects", {"/ü": {"a": 1}}), ("userID", "abc"),
                                   ("kiro2api", True)]
    assert stat.S_IMODE(claude_json.stat().st_mode) == 0o640
    assert [p.name for p in claude_json.parent.iterdir()] == [".claude.json"]


def test_claude_twice_changes_nothing_the_second_time(claude_json):
    assert invoke("claude").exit_code == 0
    before = claude_json.read_bytes()
    result = invoke("claude")
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output
    assert claude_json.read_bytes() == before


@pytest.mark.parametrize("content, expected", [
    ("[1, 2]", "holds JSON but not an object"),
    ('"text"', "holds JSON but not an object"),
    ("null", "holds JSON but not an object"),
    ("", "is not valid JSON"),
    ("{broken", "is not valid JSON"),
])
def test_claude_refuses_a_file_that_is_not_a_json_object(claude_json, content, expected):
    claude_json.write_text(content)
    result = invoke("claude")
    assert_fails_cleanly(result, str(claude_json), expected)
    assert claude_json.read_text() == content


def test_claude_refuses_a_file_it_cannot_read(claude_json):
    claude_json.mkdir()
    result = invoke("claude")
    assert_fails_cleanly(result, f"cannot read {claude_json}", "run kiro2api claude again")
    assert claude_json.is_dir() and list(claude_json.iterdir()) == []


def test_claude_refuses_a_file_that_is_not_utf8(claude_json):
    claude_json.write_bytes(b'{"a": "\xff"}')
    result = invoke("claude")
    assert_fails_cleanly(result, str(claude_json), "is not valid JSON")
    assert claude_json.read_bytes() == b'{"a": "\xff"}'


def test_claude_follows_a_symlinked_file(claude_json, tmp_path):
    real = tmp_path / "dotfiles-claude.json"
    real.write_text('{"a": 1}')
    claude_json.symlink_to(real)
    result = invoke("claude")
    assert result.exit_code == 0, result.output
    assert claude_json.is_symlink()
    assert json.loads(real.read_text()) == {"a": 1, "hasCompletedOnboarding": True,
                                            "kiro2api": True}


# codex

SNIPPET = '''model = "claude-sonnet-4.5"
model_provider = "kiro2api"

[model_providers.kiro2api]
name = "kiro2api"
base_url = "http://127.0.0.1:8080/v1"
env_key = "KIRO2API_KEY"
wire_api = "responses"
'''
KIRO2API_PROVIDER = {"name": "kiro2api", "base_url": "http://127.0.0.1:8080/v1",
                     "env_key": "KIRO2API_KEY", "wire_api": "responses"}


@pytest.fixture
def codex_toml(isolated_env):
    return isolated_env / ".codex/config.toml"


def parse_toml(text):
    """Floats stay text so that two parses compare equal (the file has a nan)."""
    return pytest.importorskip("tomllib").loads(text, parse_float=str)


def assert_codex_uses_kiro2api(text, model="claude-sonnet-4.5"):
    config = parse_toml(text)
    assert (config["model"], config["model_provider"]) == (model, "kiro2api")
    assert config["model_providers"]["kiro2api"] == KIRO2API_PROVIDER
    return config


def test_codex_prints_the_provider_and_how_to_use_it(codex_toml):
    result = invoke("codex")
    assert result.exit_code == 0, result.output
    assert result.stdout == SNIPPET
    assert_codex_uses_kiro2api(result.stdout)
    assert str(codex_toml) in result.stderr and "--write" in result.stderr
    assert 'KIRO2API_KEY (eval "$(kiro2api export)" does)' in result.stderr
    assert "openai_base_url" not in result.output
    assert not codex_toml.parent.exists()


def test_codex_options_shape_the_provider(monkeypatch):
    monkeypatch.setenv("KIRO2API_PORT", "7000")
    result = invoke("codex", "--host", "10.0.0.2", "--name", "kiro-b", "--model",
                    "claude-opus-4.7")
    assert result.exit_code == 0, result.output
    config = parse_toml(result.stdout)
    assert (config["model"], config["model_provider"]) == ("claude-opus-4.7", "kiro-b")
    assert config["model_providers"] == {"kiro-b": {
        "name": "kiro-b", "base_url": "http://10.0.0.2:7000/v1", "env_key": "KIRO2API_KEY",
        "wire_api": "responses"}}


@pytest.mark.parametrize("name", ["openai", "ollama", "lmstudio"])
@pytest.mark.parametrize("write", [[], ["--write"]], ids=["print", "write"])
def test_codex_refuses_an_id_codex_keeps(codex_toml, name, write):
    result = invoke("codex", "--name", name, *write)
    assert result.exit_code == 2, result.output
    assert f"Codex keeps '{name}' for its built-in provider" in result.stderr
    assert result.stdout == "" and not codex_toml.parent.exists()


@pytest.mark.parametrize("name", ["a.b", "my provider", "", "[x]"])
def test_codex_refuses_an_id_a_table_header_cannot_name(name):
    result = invoke("codex", "--name", name)
    assert result.exit_code == 2, result.output
    assert "is not an id of letters, digits, - and _" in result.stderr


def test_codex_write_creates_the_directory_and_the_file(codex_toml):
    result = invoke("codex", "--write")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"Created {codex_toml}:",
        '  [model_providers.kiro2api] added: base_url = "http://127.0.0.1:8080/v1", '
        'wire_api = "responses"',
        '  model = "claude-sonnet-4.5" (added)',
        '  model_provider = "kiro2api" (added)']
    assert codex_toml.read_text() == SNIPPET
    assert_codex_uses_kiro2api(codex_toml.read_text())
    assert stat.S_IMODE(codex_toml.stat().st_mode) == 0o600
    assert 'eval "$(kiro2api export)"' in result.stderr
    assert [p.name for p in codex_toml.parent.iterdir()] == ["config.toml"]


# Everything a config.toml may hold that a line-based edit could trip on:
# comments, a top-level model, lines starting with "[" inside a multi-line
# array and a multi-line string, array tables, other providers.
BUSY_TOP = '''# Codex settings  (ü)
model = "gpt-5.6-sol"   # the usual
model_provider = "openai"
approval_policy = "on-request"
notes = """
[model_providers.kiro2api]
"""
paths = [
  ["a", "b"],
  [1.5, nan],
]
'''
BUSY_TABLES = '''# Profiles
[profiles.fast]
model = "gpt-5"

[[mcp_servers.list]]
name = "one"

[model_providers.other]
name = "Other"
base_url = "https://other.example/v1"
env_key = "OTHER_KEY"
'''
KIRO2API_TABLE = '''
[model_providers.kiro2api]
name = "kiro2api"
base_url = "http://127.0.0.1:8080/v1"
env_key = "KIRO2API_KEY"
wire_api = "responses"
'''


def test_codex_write_keeps_the_rest_of_the_file_byte_for_byte(codex_toml):
    codex_toml.parent.mkdir()
    before = BUSY_TOP + "\n" + BUSY_TABLES
    codex_toml.write_text(before)
    codex_toml.chmod(0o640)
    result = invoke("codex", "--write")
    assert result.exit_code == 0, result.output
    assert f"Updated {codex_toml}:" in result.stdout
    assert '  model_provider: "openai" -> "kiro2api"\n' in result.stdout
    assert "model = " not in result.stdout  # the file's model stays
    after = codex_toml.read_text()
    assert after == (before.replace('model_provider = "openai"\n', 'model_provider = "kiro2api"\n')
                     + KIRO2API_TABLE)
    config = assert_codex_uses_kiro2api(after, model="gpt-5.6-sol")
    old = parse_toml(before)
    assert {k: v for k, v in config.items() if k != "model_provider"} == {
        **{k: v for k, v in old.items() if k != "model_provider"},
        "model_providers": {**old["model_providers"], "kiro2api": KIRO2API_PROVIDER}}
    assert stat.S_IMODE(codex_toml.stat().st_mode) == 0o640


def test_codex_write_puts_new_top_level_keys_before_the_first_table(codex_toml):
    codex_toml.parent.mkdir()
    top = BUSY_TOP.replace('model = "gpt-5.6-sol"   # the usual\n', "").replace(
        'model_provider = "openai"\n', "")
    codex_toml.write_text(top + BUSY_TABLES)
    result = invoke("codex", "--write")
    assert result.exit_code == 0, result.output
    assert '  model = "claude-sonnet-4.5" (added)' in result.stdout
    assert '  model_provider = "kiro2api" (added)' in result.stdout
    # After the other top-level keys, before the comment that heads the first table.
    assert codex_toml.read_text() == (
        top + 'model = "claude-sonnet-4.5"\nmodel_provider = "kiro2api"\n\n' + BUSY_TABLES
        + KIRO2API_TABLE)
    assert_codex_uses_kiro2api(codex_toml.read_text())


@pytest.mark.parametrize("before, after", [
    ("", SNIPPET),
    ('approval_policy = "never"', 'approval_policy = "never"\n' + SNIPPET),
    ("[tui]\nnotifications = true", "model = \"claude-sonnet-4.5\"\nmodel_provider = "
     "\"kiro2api\"\n\n[tui]\nnotifications = true\n" + KIRO2API_TABLE),
    ('model = "x"\r\n[tui]\r\n', 'model = "x"\r\nmodel_provider = "kiro2api"\r\n\r\n[tui]\r\n'
     + KIRO2API_TABLE.replace("\n", "\r\n")),
], ids=["empty", "no-table-no-final-newline", "table-first", "crlf"])
def test_codex_write_fits_the_file_it_finds(codex_toml, before, after):
    codex_toml.parent.mkdir()
    codex_toml.write_bytes(before.encode())
    result = invoke("codex", "--write")
    assert result.exit_code == 0, result.output
    assert codex_toml.read_bytes() == after.encode()


def test_codex_write_twice_changes_nothing_the_second_time(codex_toml):
    assert invoke("codex", "--write").exit_code == 0
    before = codex_toml.read_bytes()
    result = invoke("codex", "--write")
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"{codex_toml} already has this [model_providers.kiro2api]; "
                             f"nothing to do.\n")
    assert codex_toml.read_bytes() == before


def test_codex_write_says_when_codex_uses_another_provider_still(codex_toml):
    codex_toml.parent.mkdir()
    before = 'model_provider = "openai"\n' + KIRO2API_TABLE
    codex_toml.write_text(before)
    result = invoke("codex", "--write")
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.stdout
    assert 'model_provider is "openai", so Codex uses kiro2api only if' in result.stdout
    assert codex_toml.read_text() == before


@pytest.mark.parametrize("args, table, differs", [
    (["--port", "9000"], KIRO2API_TABLE,
     'base_url "http://127.0.0.1:8080/v1", not "http://127.0.0.1:9000/v1"'),
    ([], KIRO2API_TABLE.replace('"KIRO2API_KEY"', '"MY_KEY"'),
     'env_key "MY_KEY", not "KIRO2API_KEY"'),
    ([], KIRO2API_TABLE.replace('"responses"', '"chat"'), 'wire_api "chat", not "responses"'),
    ([], "[model_providers]\nkiro2api = 1\n", "base_url ?"),
], ids=["base_url", "env_key", "wire_api", "not-a-table"])
def test_codex_write_refuses_a_different_provider_of_the_same_id(codex_toml, args, table,
                                                                   differs):
    codex_toml.parent.mkdir()
    codex_toml.write_text(BUSY_TOP + table)
    result = invoke("codex", "--write", *args)
    assert_fails_cleanly(result, str(codex_toml),
                         "already has a different [model_providers.kiro2api]", differs)
    assert codex_toml.read_text() == BUSY_TOP + table


@pytest.mark.parametrize("content, expected", [
    (b"model = \n", "(Invalid value (at line 1, column 9))"),
    (b"[a]\nx = 1\n[a]\n", "Cannot declare ('a',) twice"),
    (b'a = [\n', "at end of document"),
    (b'model = "\xff"\n', "(not UTF-8 text)"),
])
def test_codex_write_refuses_a_file_that_is_not_toml(codex_toml, content, expected):
    codex_toml.parent.mkdir()
    codex_toml.write_bytes(content)
    result = invoke("codex", "--write")
    assert_fails_cleanly(result, f"{codex_toml} is not valid TOML", expected,
                         "run kiro2api codex --write again")
    assert codex_toml.read_bytes() == content


@pytest.mark.parametrize("content", ['model_providers = { other = { name = "x" } }\n',
                                     'model_providers = "none"\n'])
def test_codex_write_refuses_what_it_cannot_add_to(codex_toml, content):
    codex_toml.parent.mkdir()
    codex_toml.write_text(content)
    result = invoke("codex", "--write")
    assert result.exit_code == 1, result.output
    assert str(codex_toml) in result.stderr and "Traceback" not in result.output
    assert codex_toml.read_text() == content


def test_codex_write_honours_codex_home(isolated_env, tmp_path, monkeypatch):
    codex_home = tmp_path / "elsewhere"
    monkeypatch.setenv("CODEX_HOME", str(codex_home))
    result = invoke("codex", "--write")
    assert result.exit_code == 0, result.output
    assert f"Created {codex_home / 'config.toml'}:" in result.stdout
    assert (codex_home / "config.toml").read_text() == SNIPPET
    assert not (isolated_env / ".codex").exists()
    printed = invoke("codex")
    assert str(codex_home / "config.toml") in printed.stderr


def test_codex_write_follows_a_symlinked_file(codex_toml, tmp_path):
    real = tmp_path / "dotfiles-config.toml"
    real.write_text('approval_policy = "never"\n')
    codex_toml.parent.mkdir()
    codex_toml.symlink_to(real)
    result = invoke("codex", "--write")
    assert result.exit_code == 0, result.output
    assert codex_toml.is_symlink()
    assert real.read_text() == 'approval_policy = "never"\n' + SNIPPET


def test_codex_write_without_tomllib_says_what_to_do(codex_toml, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    result = invoke("codex", "--write")
    assert_fails_cleanly(result, "needs Python 3.11 or newer", str(codex_toml))
    assert not codex_toml.exists()
    assert invoke("codex").stdout == SNIPPET


@pytest.mark.parametrize("value", ['say "hi"', "back\\slash", "tab\tnew\nline", "del\x7f",
                                   "\x00", "ü €"])
def test_toml_string_reads_back_as_the_value(value):
    assert parse_toml(f"v = {kiro2api.toml_string(value)}")["v"] == value


def test_server_model_map_from_options_and_the_variable(served, monkeypatch):
    result = CliRunner().invoke(kiro2api.cli, [
        "server", "--model-map", "claude-opus-5-5=claude-opus-5", "--model-map", " big = glm-5 "])
    assert result.exit_code == 0, result.output
    assert served[-1].model_map == {"claude-opus-5-5": "claude-opus-5", "big": "glm-5"}
    monkeypatch.setenv("KIRO2API_MODEL_MAP", "a=b c=d")
    assert CliRunner().invoke(kiro2api.cli, ["server"]).exit_code == 0
    assert served[-1].model_map == {"a": "b", "c": "d"}
    result = CliRunner().invoke(kiro2api.cli, ["server", "--model-map", "nothing"])
    assert result.exit_code == 2 and "is not FROM=TO" in result.output


def test_server_safeguards_option(served, monkeypatch):
    assert CliRunner().invoke(kiro2api.cli, ["server"]).exit_code == 0
    assert served[-1].safeguards == "off"
    monkeypatch.setenv("KIRO2API_SAFEGUARDS", "kiro")
    assert CliRunner().invoke(kiro2api.cli, ["server"]).exit_code == 0
    assert served[-1].safeguards == "kiro"
    assert CliRunner().invoke(kiro2api.cli, ["server", "--safeguards", "anthropic"]).exit_code == 2
