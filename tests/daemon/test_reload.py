"""Reload (Daemon.reload, over the control socket): validate first, then change only what changed.

SIGHUP runs the same code; the real daemon's SIGHUP is in test_notify.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from controlkit import running_daemon, wirekeep

RELOAD = {"id": "r", "reload": {}}


async def test_invalid_config_keeps_the_old_one(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a", "b"]) as r:
        await r.streaming()
        runners = dict(r.daemon.sessions)
        old_hash = r.daemon.config.config_hash
        events_before = len(r.db.events())
        text = r.config_path.read_text()
        r.config_path.write_text(
            text.replace("stale_after = 1.0", "stale_after = 99.0").replace(
                'name = "b"', 'name = "b"\nnosuch = 1'
            )
        )
        response = await r.call(RELOAD)
        assert (response["ok"], response["code"]) == (False, 78)
        assert "stays in force" in response["error"]
        errors = response["reload"]["errors"]
        assert any("sessions[b].nosuch: unknown key" in e for e in errors), errors
        assert any("stale_after" in e for e in errors), errors  # every problem at once
        assert r.daemon.config.config_hash == old_hash
        assert r.daemon.sessions == runners  # the very same runners
        done = await wirekeep("reload", "--socket", str(r.socket))
        assert done.returncode == 1
        assert b"unknown key" in done.stderr
        assert len(r.db.events()) == events_before  # nothing happened to any session
        r.config_path.write_text("this is [not toml")
        assert (await r.call(RELOAD))["code"] == 78
        assert r.daemon.config.config_hash == old_hash


async def test_add_remove_change_and_leave_alone(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["same", "gone", "changed", "off"]) as r:
        await r.streaming()
        same, changed = r.daemon.sessions["same"], r.daemon.sessions["changed"]
        same_version = same.model.version
        r.rewrite(
            [
                r.session("same"),
                r.session("changed", stale_after=2.0),
                r.session("off", enabled=False),
                r.session("new"),
            ]
        )
        response = await r.call(RELOAD)
        assert response["ok"], response
        result = response["reload"]
        new_hash = result["config_hash"]
        assert result["previous_hash"] != new_hash == r.daemon.config.config_hash
        assert (result["added"], result["changed"], result["unchanged"]) == (
            ["new"],
            ["changed"],
            1,
        )
        assert sorted(result["removed"]) == ["gone", "off"]
        await r.streaming("same", "changed", "new")
        sessions = r.daemon.sessions
        assert set(sessions) == {"same", "changed", "new"}
        assert sessions["same"] is same  # not touched ...
        assert same.model.version == same_version  # ... not even one transition
        assert sessions["changed"] is not changed
        assert sessions["changed"].config.stale_after == 2.0
        assert sessions["changed"].model.version > changed.model.version  # one chain
    events = r.db.by_session()
    gone = events["gone"][-1]
    assert (gone["trigger"], gone["dest"]) == ("remove", "DISCONNECTED")
    assert gone["reason"] == f"removed from the configuration (hash {new_hash}) by uid 0 (root)"
    assert gone["detail"] == {"config_hash": new_hash, "uid": 0, "user": "root"}
    assert events["off"][-1]["reason"].startswith("disabled in the configuration")
    handover = [e for e in events["changed"] if "configuration changed" in e["reason"]]
    assert len(handover) == 1
    assert handover[0]["reason"] == (
        f"configuration changed (hash {new_hash}) by uid 0 (root): "
        "reconnecting with the new settings"
    )
    assert (handover[0]["source"], handover[0]["dest"]) == ("STREAMING", "DISCONNECTED")
    after = events["changed"][handover[0]["version"] :]
    assert [e["trigger"] for e in after][:2] == ["start", "connected"]
    assert events["new"][0]["trigger"] == "start"
    assert [e["trigger"] for e in events["same"]][:5] == [
        "start", "connected", "authenticated", "data", "shutdown",
    ]  # fmt: skip
    r.db.verify()
    (row,) = r.db.rows(
        "SELECT run_id, config_hash, previous_hash, reason, detail FROM config_reloads"
    )
    assert row["config_hash"] == new_hash
    assert row["run_id"] == r.daemon.run_id
    assert row["reason"] == "configuration reloaded by uid 0 (root)"
    detail = json.loads(row["detail"]) if isinstance(row["detail"], str) else row["detail"]
    assert (detail["added"], detail["changed"], detail["unchanged"]) == (["new"], ["changed"], 1)


async def test_paused_session_stays_paused_across_a_change(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["p"]) as r:
        await r.streaming()
        await r.call({"id": "1", "pause": {"sessions": ["p"], "reason": "hold"}})
        version = r.daemon.sessions["p"].model.version
        r.rewrite([r.session("p", stale_after=2.0)])
        assert (await r.call(RELOAD))["reload"]["changed"] == ["p"]
        runner = r.daemon.sessions["p"]
        assert runner.model.state.name == "PAUSED"
        assert runner.model.version == version  # nothing to reconnect: no transition
        assert runner.config.stale_after == 2.0
        await r.call({"id": "2", "resume": {"sessions": ["p"]}})
        await r.streaming("p")


async def test_a_removed_session_added_again_continues_its_history(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a", "b"]) as r:
        await r.streaming()
        r.rewrite([r.session("a")])
        assert (await r.call(RELOAD))["reload"]["removed"] == ["b"]
        r.rewrite([r.session("a"), r.session("b")])
        assert (await r.call(RELOAD))["reload"]["added"] == ["b"]
        await r.streaming("b")
    triggers = [e["trigger"] for e in r.db.events("b")]
    assert triggers[4:7] == ["remove", "start", "connected"]
    r.db.verify()  # versions continue: no gap, no duplicate
    assert len(r.db.rows("SELECT id FROM config_reloads")) == 2


async def test_daemon_settings_wait_for_a_restart(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a"]) as r:
        await r.streaming()
        r.rewrite(
            [r.session("a")],
            daemon_keys={"admin_group": "staff", "log_format": "json", "max_handshakes": 7},
        )
        result = (await r.call(RELOAD))["reload"]
        assert result["unchanged"] == 1
        assert result["notes"] == [
            "daemon.log_format changed: takes effect when the daemon restarts"
        ]
        assert r.daemon.config.daemon.admin_group == "staff"  # read on every request
        assert r.daemon.handshakes.total_tokens == 7  # applied at once
        status = (await r.call({"id": "s", "status": {}}))["status"]
        assert status["daemon"]["max_handshakes"] == 7
        assert len(r.db.rows("SELECT id FROM config_reloads")) == 1


async def test_secrets_are_resolved_before_anything_changes(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a"]) as r:
        await r.streaming()
        auth = {
            "client_id": "wirekeep-tests",
            "client_secret": "${env:WK_TEST_SECRET}",
            "account_id": 1001,
            "access_token": "plain-access-token-for-tests",
        }
        r.rewrite([r.session("a"), r.session("b", auth=auth)])
        response = await r.call(RELOAD)  # the daemon's environment has no WK_TEST_SECRET
        assert (response["ok"], response["code"]) == (False, 78)
        assert "environment variable WK_TEST_SECRET is not set" in response["reload"]["errors"][0]
        assert set(r.daemon.sessions) == {"a"}
        r.daemon.environ = {"WK_TEST_SECRET": "resolved-late-secret"}
        assert (await r.call(RELOAD))["reload"]["added"] == ["b"]
        await r.streaming("b")


def test_a_reload_teaches_the_log_redactor_new_secrets() -> None:
    import io

    import structlog

    from daemon import logs
    from daemon.app import _extend_redaction

    out = io.StringIO()
    logs.configure("json", secrets=["first-secret-value"], stream=out)
    try:
        _extend_redaction(("added-by-reload",))
        structlog.get_logger("t").info("x", text="added-by-reload and first-secret-value")
    finally:
        structlog.reset_defaults()
    assert json.loads(out.getvalue())["text"] == "*** and ***"
