"""Kiro's request dialects, account kinds and refusals, as pure functions
(PROTOCOL-2026.md 10.1-10.9)."""

from __future__ import annotations

import pytest

import convert

PAYLOAD = {"conversationState": {
    "chatTriggerType": "MANUAL", "agentTaskType": "vibe", "conversationId": "c",
    "currentMessage": {"userInputMessage": {"content": "hi", "modelId": "m",
                                            "origin": "AI_EDITOR"}},
    "history": [{"userInputMessage": {"content": "a", "modelId": "m", "origin": "AI_EDITOR"}},
                {"assistantResponseMessage": {"content": "b"}}],
}}


def test_ide_body_is_the_prepared_payload_with_the_arn():
    body = convert.kiro_body(PAYLOAD, convert.IDE, profile_arn="arn:x", continuation_id="u")
    assert body == {**PAYLOAD, "profileArn": "arn:x"}


def test_cli_body_says_kiro_cli_everywhere_and_carries_a_continuation_id():
    body = convert.kiro_body(PAYLOAD, convert.CLI, profile_arn=None, continuation_id="u-1")
    state = body["conversationState"]
    assert "profileArn" not in body and "agentMode" not in body
    assert state["agentContinuationId"] == "u-1"
    assert state["currentMessage"]["userInputMessage"]["origin"] == "KIRO_CLI"
    assert state["history"][0]["userInputMessage"]["origin"] == "KIRO_CLI"
    assert state["history"][1] == {"assistantResponseMessage": {"content": "b"}}
    # The prepared payload is untouched: the next attempt starts from it.
    assert PAYLOAD["conversationState"]["currentMessage"]["userInputMessage"]["origin"] \
        == "AI_EDITOR"
    assert "agentContinuationId" not in PAYLOAD["conversationState"]


def test_kas_body_puts_the_agent_mode_at_the_top():
    body = convert.kiro_body(PAYLOAD, convert.KAS, profile_arn="arn:y", continuation_id="u")
    assert body["agentMode"] == "vibe" and body["profileArn"] == "arn:y"
    assert body["conversationState"]["currentMessage"]["userInputMessage"]["origin"] \
        == "AI_EDITOR"


def headers(dialect, kind="social", **kw):
    return convert.kiro_headers(dialect, access_token="tok", kind=kind, machine_id="f" * 64,
                                versions=convert.ClientVersions(), os_name="linux",
                                invocation_id="inv", **kw)


def test_ide_headers_present_a_current_ide():
    h = headers(convert.IDE)
    assert h["Content-Type"] == "application/json" and "x-amz-target" not in h
    assert h["x-amzn-kiro-agent-mode"] == "vibe"
    assert h["x-amz-user-agent"] == f"aws-sdk-js/1.0.34 KiroIDE-1.1.14-{'f' * 64}"
    assert h["Authorization"] == "Bearer tok"


def test_rpc_headers_name_their_target_and_kind_headers_are_added():
    cli = headers(convert.CLI, kind="api_key")
    assert cli["x-amz-target"] == \
        "AmazonCodeWhispererStreamingService.GenerateAssistantResponse"
    assert cli["Content-Type"] == "application/x-amz-json-1.0"
    assert cli["TokenType"] == "API_KEY" and "x-amzn-kiro-agent-mode" not in cli
    assert "md/appVersion-2.23.1 app/AmazonQ-For-CLI" in cli["User-Agent"]
    kas = headers(convert.KAS, kind="external_idp", profile_arn="arn:z")
    assert kas["x-amz-target"] == "KiroRuntimeService.GenerateAssistantResponse"
    assert kas["TokenType"] == "EXTERNAL_IDP" and kas["x-amzn-kiro-profile-arn"] == "arn:z"
    assert "KiroCLI/2.23.1 KAS/0.66.8" in kas["x-amz-user-agent"]
    assert "TokenType" not in headers(convert.CLI, kind="idc")


@pytest.mark.parametrize("text, expected", [
    ("1.2.3", convert.ClientVersions(ide="1.2.3")),
    ("ide=1.2.3, cli=2.30.0", convert.ClientVersions(ide="1.2.3", cli="2.30.0")),
    ("KAS=0.70.1,sdk=1.0.40", convert.ClientVersions(kas="0.70.1", sdk="1.0.40")),
])
def test_client_versions_parse(text, expected):
    assert convert.ClientVersions.parse(text) == expected


@pytest.mark.parametrize("text", ["", "latest", "ide=", "vim=1.0", "1.2.3; rm"])
def test_client_versions_refuse_what_is_not_a_version(text):
    with pytest.raises(ValueError, match="not a client version"):
        convert.ClientVersions.parse(text)


@pytest.mark.parametrize("method, provider, arn, start_url, kind", [
    ("social", "Github", "arn:a", None, "social"),
    ("idc", "BuilderId", None, None, "builder_id"),
    ("idc", None, None, None, "builder_id"),
    ("idc", "Enterprise", None, None, "idc"),
    ("idc", "BuilderId", None, "https://d-123.awsapps.com/start", "idc"),
    ("idc", "BuilderId", "arn:b", None, "idc"),
    ("external_idp", "ExternalIdp", None, None, "external_idp"),
    ("api_key", None, None, None, "api_key"),
])
def test_credential_kinds(method, provider, arn, start_url, kind):
    assert convert.credential_kind(method, provider, arn, start_url) == kind


@pytest.mark.parametrize("url, family", [
    ("https://runtime.us-east-1.kiro.dev", "runtime"),
    ("https://q.us-east-1.amazonaws.com", "legacy"),
    ("https://codewhisperer.us-east-1.amazonaws.com", "legacy"),
    ("http://127.0.0.1:9/runtime#runtime", "runtime"),
    ("http://127.0.0.1:9", "legacy"),
])
def test_host_family(url, family):
    assert convert.host_family(url) == family


def test_every_kind_has_attempts_on_every_host_family():
    for family in convert.HOST_FAMILIES:
        for kind in convert.KINDS:
            assert convert.ATTEMPTS[family, kind], (family, kind)
    # Builder ID: the service's ARN on runtime, none on the legacy host (10.3).
    assert convert.ATTEMPTS["runtime", "builder_id"] == ((convert.CLI, convert.SERVICE_ARN),)
    assert convert.ATTEMPTS["legacy", "builder_id"] == ((convert.IDE, convert.NO_ARN),)
    assert all(d is not convert.IDE for family in convert.HOST_FAMILIES
               for d, _ in convert.ATTEMPTS[family, "api_key"])


@pytest.mark.parametrize("status, body, meaning", [
    (400, '{"message":"profileArn is required for this request."}', convert.NEXT_WAY),
    (400, '{"message":"Invalid profileArn."}', convert.FIND_PROFILE),
    (403, '{"message":"The bearer token included in the request is invalid."}', convert.REFRESH),
    (401, "", convert.REFRESH),
    (403, '{"message":"User is not authorized to make this call.","reason":null}',
     convert.NEXT_WAY),
    (403, '{"message":"Your subscription does not support this application"}',
     convert.NEXT_WAY),
    (404, '{"message":"UnknownOperationException"}', convert.NEXT_WAY),
    (403, '{"message":"Your User ID (x) temporarily is suspended. We\'ve locked your account",'
          '"reason":"TEMPORARILY_SUSPENDED"}', convert.SUSPENDED),
    (403, '{"message":"We detected unusual user activity and locked it; your account is '
          'suspended"}', convert.SUSPENDED),
    (402, '{"message":"You have reached the limit.","reason":"MONTHLY_REQUEST_COUNT"}',
     convert.EXHAUSTED),
    (429, '{"message":"I am experiencing high traffic","reason":"INSUFFICIENT_MODEL_CAPACITY"}',
     convert.CAPACITY),
    (500, '{"message":"Encountered unexpectedly high load",'
          '"reason":"MODEL_TEMPORARILY_UNAVAILABLE"}', convert.CAPACITY),
    (400, '{"message":"Improperly formed request.","reason":"REQUEST_BODY_INVALID"}',
     convert.FINAL),
    (403, '{"message":"Forbidden"}', convert.FINAL),
    (429, '{"message":"Too many requests"}', convert.EXHAUSTED_MAYBE),
])
def test_what_refusals_mean(status, body, meaning):
    assert convert.rejection(status, body) == meaning
