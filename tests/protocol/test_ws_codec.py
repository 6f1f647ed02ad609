"""Templates, auth verdicts and message classification for WebSocket venues."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.ws_codec import (
    AuthVerdict,
    MessageKind,
    TemplateError,
    check_auth_reply,
    classify,
    find_placeholders,
    render_template,
)

AUTH = '{"op":"auth","key":"${env:VENUE_A_KEY}","sig":"${cred:venue-a.secret}"}'
SECRETS = {"env:VENUE_A_KEY": "k3y", "cred:venue-a.secret": "s1g"}

# --- templates ------------------------------------------------------------------


def test_find_placeholders_in_order_without_duplicates() -> None:
    assert find_placeholders(AUTH) == ["env:VENUE_A_KEY", "cred:venue-a.secret"]
    assert find_placeholders("${env:A}${env:B}${env:A}") == ["env:A", "env:B"]
    assert find_placeholders('{"op":"subscribe"}') == []
    assert find_placeholders("price in $ and {braces}") == []


def test_render_template() -> None:
    assert render_template(AUTH, SECRETS) == '{"op":"auth","key":"k3y","sig":"s1g"}'
    assert render_template("no placeholders", {}) == "no placeholders"
    assert render_template("${env:A}${env:A}", {"env:A": "x"}) == "xx"


def test_escaped_dollar_brace_is_literal() -> None:
    assert find_placeholders("$${env:NOT_ONE} ${env:ONE}") == ["env:ONE"]
    assert render_template("$${env:NOT_ONE} ${env:ONE}", {"env:ONE": "1"}) == "${env:NOT_ONE} 1"


def test_missing_value_names_the_placeholder_and_no_secret() -> None:
    with pytest.raises(
        TemplateError, match=r"no value for the placeholder \$\{cred:venue-a.secret\}"
    ) as caught:
        render_template(AUTH, {"env:VENUE_A_KEY": "k3y"})
    assert "k3y" not in str(caught.value)


@pytest.mark.parametrize(
    "template",
    [
        "${ENV:KEY}",
        "${env:}",
        "${env:1ABC}",
        "${vault:KEY}",
        "${env:KEY",
        "${env:KEY WITH SPACE}",
        "${}",
        "trailing ${",
    ],
)
def test_malformed_placeholders_are_errors(template: str) -> None:
    with pytest.raises(TemplateError, match="malformed placeholder"):
        find_placeholders(template)
    with pytest.raises(TemplateError, match="malformed placeholder"):
        render_template(template, {"env:KEY": "v"})


def test_json_escape() -> None:
    secrets = {"env:K": 'a"b\\c\n'}
    rendered = render_template('{"key":"${env:K}"}', secrets, json_escape=True)
    assert json.loads(rendered) == {"key": 'a"b\\c\n'}
    assert render_template('{"key":"${env:K}"}', secrets) == '{"key":"a"b\\c\n"}'


@settings(database=None, deadline=None)
@given(value=st.text(alphabet=st.characters(codec="utf-8"), max_size=50))
def test_json_escape_keeps_any_value_intact(value: str) -> None:
    rendered = render_template('{"k":"${cred:x}"}', {"cred:x": value}, json_escape=True)
    assert json.loads(rendered) == {"k": value}


# --- auth verdicts --------------------------------------------------------------

ACCEPTED = AuthVerdict(True, "")


@pytest.mark.parametrize(
    ("reply", "expect"),
    [
        ('{"ok":true}', {"ok": True}),
        ('{"ok":true,"extra":[1,2]}', {"ok": True}),
        (
            '{"event":"login","code":"0","data":{"status":"ok","n":1}}',
            {"event": "login", "data": {"status": "ok"}},
        ),
        ('{"success":true,"ret_msg":"","op":"auth"}', {"success": True, "op": "auth"}),
        ('{"n":1.0}', {"n": 1}),
        ('{"list":[1,"a"]}', {"list": [1, "a"]}),
        ('{"anything":1}', {}),
    ],
)
def test_accepted_replies(reply: str, expect: dict[str, object]) -> None:
    assert check_auth_reply(reply, expect) == ACCEPTED


@pytest.mark.parametrize(
    ("reply", "expect", "reason"),
    [
        # the venue's own words, from the fields venues use
        ('{"ok":false,"error":"invalid key"}', {"ok": True}, "invalid key"),
        (
            '{"code":-2014,"msg":"API-key format invalid."}',
            {"ok": True},
            "API-key format invalid. (code -2014)",
        ),
        (
            '{"event":"error","code":"60009","msg":"Login failed."}',
            {"event": "login"},
            "Login failed. (code 60009)",
        ),
        (
            '{"jsonrpc":"2.0","id":1,"error":{"code":13004,"message":"invalid_credentials"}}',
            {"result": {}},
            "invalid_credentials (code 13004)",
        ),
        (
            '{"type":"error","message":"Failed to subscribe","reason":"Authentication Failed"}',
            {"type": "subscriptions"},
            "Failed to subscribe: Authentication Failed",
        ),
        (
            '{"success":false,"ret_msg":"error:sign invalid","op":"auth"}',
            {"success": True},
            "error:sign invalid",
        ),
        ('{"errors":["bad key","expired"]}', {"ok": True}, "bad key, expired"),
        # no error text: name the key that did not match
        ('{"ok":false}', {"ok": True}, "auth reply has ok=false, expected true"),
        ('{"status":"pending"}', {"ok": True}, "auth reply has no 'ok' (expected true)"),
        ('{"ok":1}', {"ok": True}, "auth reply has ok=1, expected true"),
        (
            '{"data":{"status":"no"}}',
            {"data": {"status": "ok"}},
            'auth reply has data={"status":"no"}, expected {"status":"ok"}',
        ),
        # not an object
        ("[1,2]", {"ok": True}, "auth reply is a JSON list, not an object: '[1,2]'"),
        ("", {"ok": True}, "auth reply is not JSON: ''"),
        (
            "<html>502 Bad Gateway</html>",
            {"ok": True},
            "auth reply is not JSON: '<html>502 Bad Gateway</html>'",
        ),
    ],
)
def test_rejected_replies(reply: str, expect: dict[str, object], reason: str) -> None:
    assert check_auth_reply(reply, expect) == AuthVerdict(False, reason)


def test_long_garbage_reason_is_short() -> None:
    verdict = check_auth_reply("x" * 10_000, {"ok": True})
    assert not verdict.accepted
    assert verdict.reason.startswith("auth reply is not JSON: 'xxx")
    assert len(verdict.reason) < 120


def test_long_venue_error_is_shortened() -> None:
    verdict = check_auth_reply(json.dumps({"error": "e" * 5000}), {"ok": True})
    assert len(verdict.reason) <= 200
    assert verdict.reason.endswith("...")


# --- classification --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ('{"e":"trade","s":"BTCUSDT","p":"97000.1","q":"0.01"}', MessageKind.DATA),
        ('{"channel":"ticks","data":{"symbol":"EURUSD","bid":1.08}}', MessageKind.DATA),
        ('{"op":"pong"}', MessageKind.HEARTBEAT),
        ('{"op":"ping","ts":1}', MessageKind.HEARTBEAT),
        ('{"type":"heartbeat","sequence":90}', MessageKind.HEARTBEAT),
        ('{"event":"heartbeat"}', MessageKind.HEARTBEAT),
        ('{"channel":"heartbeats","events":[]}', MessageKind.HEARTBEAT),
        ('{"ping":1700000000}', MessageKind.HEARTBEAT),
        ('{"pong":1700000000}', MessageKind.HEARTBEAT),
        ('{"method":"hb"}', MessageKind.HEARTBEAT),
        ("pong", MessageKind.HEARTBEAT),
        ("  PING\n", MessageKind.HEARTBEAT),
        ('{"event":"error","msg":"bad request"}', MessageKind.ERROR),
        ('{"type":"error","message":"Failed to subscribe"}', MessageKind.ERROR),
        ('{"error":{"code":1,"message":"x"}}', MessageKind.ERROR),
        ('{"errorMessage":"EGeneral:Invalid arguments"}', MessageKind.ERROR),
        ('{"success":false,"ret_msg":"invalid op"}', MessageKind.ERROR),
        # look-alikes that are data
        ('{"jsonrpc":"2.0","result":{"p":1},"error":null}', MessageKind.DATA),
        ('{"success":true,"op":"subscribe"}', MessageKind.DATA),
        ('{"errors":[],"data":[1]}', MessageKind.DATA),
        ('{"symbol":"PING","px":1}', MessageKind.DATA),
        ('["pong"]', MessageKind.DATA),
        ('{"method":"HB"}', MessageKind.DATA),  # lower case only
        ("not json at all", MessageKind.DATA),
        ('{"error": broken json', MessageKind.DATA),
        ("", MessageKind.DATA),
        ('{"type":"error","pad":"' + "x" * 5000 + '"}', MessageKind.DATA),  # too long to be one
    ],
)
def test_classify(text: str, kind: MessageKind) -> None:
    assert classify(text) is kind


@settings(database=None, deadline=None)
@given(text=st.text(alphabet=st.sampled_from('{}[]":,pingoerrhbatsucf 01'), max_size=60))
def test_classify_never_raises(text: str) -> None:
    assert classify(text) in MessageKind
