"""The command line: help, version, and how ``server`` builds its Config."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import kiro2api


@pytest.fixture
def served(monkeypatch):
    """Capture the Config ``server`` would run with, without binding a port."""
    seen: list[kiro2api.Config] = []
    monkeypatch.setattr(kiro2api, "serve", seen.append)
    return seen


def test_help_lists_every_command():
    result = CliRunner().invoke(kiro2api.cli, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("server",):
        assert command in result.output


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


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_server_rejects_bad_port(served, port):
    result = CliRunner().invoke(kiro2api.cli, ["server", "--port", port])
    assert result.exit_code == 2, result.output
    assert served == []


def test_server_rejects_two_different_ports(served):
    result = CliRunner().invoke(kiro2api.cli, ["server", "9000", "--port", "9001"])
    assert result.exit_code == 2, result.output
    assert "port given twice" in result.output


def test_server_token_files_repeat(served, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    result = CliRunner().invoke(
        kiro2api.cli, ["server", "--token-file", str(a), "--token-file", str(b)]
    )
    assert result.exit_code == 0, result.output
    assert served[0].token_files == (Path(a), Path(b))
