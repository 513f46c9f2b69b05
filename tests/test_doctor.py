"""``kiro2api doctor``: a server process's view of each account, step by step,
checked line for line against the fake Kiro (tests/fakes.py, "Today's service")."""

from __future__ import annotations

import asyncio
import json
import re
import sys

import pytest

import fakes
import helpers
import kiro2api
from fakes import IDC_PROFILE_ARN, Status

pytestmark = pytest.mark.slow  # each test runs the command as a process


async def doctor(fake, *args):
    """Run ``kiro2api doctor`` against ``fake``: its exit status and its output, with
    the fake's address as URL and the moving parts of times as <...>."""
    url = fake.url
    process = await asyncio.create_subprocess_exec(
        sys.executable, kiro2api.__file__, "doctor", "--upstream", f"{url}/runtime#runtime",
        "--upstream", f"{url}/q", "--management-url", f"{url}/management",
        "--social-auth-url", url, "--oidc-url", url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=helpers.child_env())
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    text = out.decode().replace(url, "URL")
    text = re.sub(r"(expiry +|expires )\d{4}-\d\d-\d\d [^,]*, in [^\n]*", r"\1<when>", text)
    return process.returncode, text


def token(tmp_path, method="social", **overrides):
    path = tmp_path / "token.json"
    helpers.write_token(path, method=method, mode=0o600, **overrides)
    return str(path)


MODELS = "3: claude-sonnet-4.5, claude-opus-4.7, qwen3-coder-next"
USAGE = "KIRO PRO: 120.5 of 1000 credits used, resets 2027-01-01 (in 12 days)"


async def test_a_social_account(fake_upstream, tmp_path):
    status, out = await doctor(fake_upstream, "--token-file", token(tmp_path))
    assert status == 0, out
    path = tmp_path / "token.json"
    assert out == f"""account {path}
  ✓ token     TokenFile, access token aoaAAA...CIAL (67 chars)
  ✓ kind      social (Google), region us-east-1
  ✓ expiry    <when>
  ✓ refresh   not due; the server refreshes 5 min before expiry
  ✓ profile   {helpers.PROFILE_ARN} (from the token file)
  ✓ models    {MODELS}
  ✓ usage     {USAGE}
  ✓ generate  URL/runtime (cli): answered 'Hello'
  ✓ generate  URL/runtime (ide): answered 'Hello'
  ✓ generate  URL/q (ide): answered 'Hello'
  ✓ generate  URL/q (cli): answered 'Hello'
  → the server will use URL/runtime (cli)
1 of 1 account can generate.
"""


async def test_identity_center_with_its_profile_looked_up_and_json(fake_upstream, tmp_path):
    fake_upstream.kinds[helpers.IDC_ACCESS] = "idc"
    path = token(tmp_path, "idc", provider="Enterprise",
                 startUrl="https://d-9067c98495.awsapps.com/start")
    status, out = await doctor(fake_upstream, "--token-file", path, "--json")
    assert status == 0, out
    report = json.loads(out)
    assert report["ok"] is True
    (account,) = report["accounts"]
    steps = {s["step"]: s for s in account["steps"] if s["step"] != "generate"}
    assert steps["kind"]["detail"] == "idc (Enterprise), region us-east-1"
    assert steps["profile"] == {"step": "profile", "ok": True,
                                "detail": f"{IDC_PROFILE_ARN} (ListAvailableProfiles)"}
    generated = [(s["ok"], s["detail"]) for s in account["steps"] if s["step"] == "generate"]
    assert generated == [
        (True, "URL/runtime (cli): answered 'Hello'"),
        (True, "URL/runtime (kas): answered 'Hello'"),
        (True, "URL/q (ide): answered 'Hello'"),
        (True, "URL/q (cli): answered 'Hello'")]
    assert account["uses"] == {"host": "URL/runtime", "shape": "cli"}


async def test_a_builder_id_account_refused_on_runtime_uses_the_legacy_host(
        fake_upstream, tmp_path):
    fake_upstream.kinds[helpers.IDC_ACCESS] = "builder_id"
    fake_upstream.down["runtime"] = (403, fakes.NOT_AUTHORIZED)
    status, out = await doctor(fake_upstream, "--token-file", token(tmp_path, "idc"))
    assert status == 0, out
    lines = out.splitlines()
    assert "  ✓ profile   the service's own (a Builder ID account has none)" in lines
    assert lines[-4:] == [
        '  ✗ generate  URL/runtime (cli): HTTP 403 {"message": "User is not authorized to '
        'make this call.", "reason": null}',
        "  ✓ generate  URL/q (ide): answered 'Hello'",
        "  → the server will use URL/q (ide)",
        "1 of 1 account can generate."]


async def test_a_kiro_api_key(fake_upstream):
    key = "ksk_" + "a" * 40
    status, out = await doctor(fake_upstream, "--kiro-api-key", key)
    assert status == 0, out
    assert key not in out
    assert out.splitlines()[:4] == [
        "account kiro-api-key-1",
        "  ✓ token     KiroApiKey, access token ksk_aa...aaaa (44 chars)",
        "  ✓ kind      api_key, region us-east-1",
        "  ✓ refresh   never: a Kiro API key does not expire"]


async def test_a_missing_token_file(fake_upstream, tmp_path):
    status, out = await doctor(fake_upstream, "--token-file", str(tmp_path / "nowhere.json"))
    assert status == 1
    lines = out.splitlines()
    assert lines[0] == f"account {tmp_path / 'nowhere.json'}"
    assert lines[1].startswith("  ✗ token     ") and "nowhere.json" in lines[1]
    assert lines[2:] == ["  → the server cannot use this account",
                         "0 of 1 account can generate."]


async def test_a_refresh_the_auth_service_refuses(fake_upstream, tmp_path):
    fake_upstream.auth_script.append(Status(400, {"error": "invalid_grant",
                                                  "error_description": "Invalid refresh token"}))
    status, out = await doctor(fake_upstream, "--token-file", token(tmp_path, expires_in=-60))
    assert status == 1
    lines = out.splitlines()
    assert lines[3] == "  ✗ expiry    " + lines[3][14:] and "expired" in lines[3]
    assert lines[4].startswith("  ✗ refresh   ") and "invalid_grant" in lines[4]
    assert lines[5:] == ["  → the server cannot use this account",
                         "0 of 1 account can generate."]


async def test_a_suspended_account_and_a_good_one(fake_upstream, tmp_path):
    fake_upstream.suspended.add(helpers.SOCIAL_ACCESS)
    good = tmp_path / "good"
    good.mkdir()
    fake_upstream.kinds[helpers.IDC_ACCESS] = "builder_id"
    status, out = await doctor(fake_upstream, "--token-file", token(tmp_path),
                               "--token-file", token(good, "idc"))
    assert status == 0, out
    lines = out.splitlines()
    refused = [line for line in lines if "temporarily is suspended" in line]
    assert len(refused) == 4 and all(line.startswith("  ✗ generate  URL/") for line in refused)
    assert "  → the server cannot use this account" in lines
    assert lines[-2:] == ["  → the server will use URL/runtime (cli)",
                          "1 of 2 accounts can generate."]
