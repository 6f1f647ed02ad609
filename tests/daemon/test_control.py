"""The control socket and the operator's commands (daemon/control.py, daemon/cli_ops.py).

The daemon runs in this process on real sockets and the real clock (controlkit); the
command line runs as a child process, as an operator would run it, and as another user
(``setpriv``) for the permission model.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import random
import shutil
import socket
import stat
import sys
from pathlib import Path

import pytest
import structlog
import trio
from controlkit import REPO, cli_env, read_lines, running_daemon, wait_until, wirekeep
from google.protobuf import json_format

from daemon.cli_ops import render_status, split_status
from daemon.control import Peer, Permissions
from protocol import control_pb2 as pb
from protocol.control_codec import MAX_LINE, decode_request, decode_response

STATUS = {"id": "s", "status": {"include_sessions": True}}


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- the socket


async def test_socket_is_0660_in_the_control_group(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a"], daemon_keys={"control_group": "nogroup"}) as r:
        info = os.lstat(r.socket)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == grp.getgrnam("nogroup").gr_gid
    assert not r.socket.exists()  # removed on a clean stop


async def test_a_second_daemon_refuses_a_live_socket_and_replaces_a_stale_one(
    tmp_path: Path,
) -> None:
    from daemon.control import ControlSocketError, bind_control_socket

    async with running_daemon(tmp_path, ["a"]) as r:
        with pytest.raises(ControlSocketError, match="another daemon is listening"):
            bind_control_socket(str(r.socket), group=None)
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()  # the file stays, nobody listens: what a crash leaves
    bind_control_socket(str(stale), group=None).close()
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    with pytest.raises(ControlSocketError, match="not a socket"):
        bind_control_socket(str(plain), group=None)
    assert plain.read_text() == "not a socket"


# --------------------------------------------------------------------------- status


async def test_status_names_every_session_and_the_daemon(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a", "b"]) as r:
        await r.streaming()
        await trio.sleep(1.1)  # msgs/s needs a second of samples
        response = await r.call(STATUS)
    assert response["ok"] is True
    status = response["status"]
    d = status["daemon"]
    assert d["pid"] == os.getpid()
    assert d["version"]
    assert d["started_at"]
    assert d["uptime_s"] > 0
    assert d["database"] == r.database
    assert d["events_written"] >= 8
    assert d["config_hash"] == r.daemon.config.config_hash
    by_name = {s["name"]: s for s in status["sessions"]}
    assert set(by_name) == {"a", "b"}
    a = by_name["a"]
    assert a["state"] == "STREAMING"
    assert a["since"].endswith("+00:00")
    assert a["attempt"] == 0
    assert a["endpoint"] == r.pb_url
    assert a["last_error"] == ""
    assert a["msgs_per_s"] > 0
    assert 0 <= a["seconds_since_last_message"] < 2
    assert a["kind"] == "protobuf"
    assert a["breaker"] == "closed"


async def test_the_fast_status_line_is_what_the_schema_says(tmp_path: Path) -> None:
    """Status is built as dicts for speed: the codec must parse it, every field present."""
    async with running_daemon(tmp_path, ["a", "b"]) as r:
        await r.streaming()
        stream = await trio.open_unix_socket(str(r.socket))
        async with stream:
            await stream.send_all(json.dumps(STATUS).encode() + b"\n")
            (line,) = await read_lines(stream, 1)
    response = decode_response(line)  # unknown fields or wrong types would raise
    assert response.ok
    assert len(response.status.sessions) == 2
    entry = json.loads(line)["status"]["sessions"][0]
    fields = {f.name for f in pb.SessionStatus.DESCRIPTOR.fields}
    assert set(entry) == fields  # seconds_since_last_message is there: it has received
    daemon_fields = {f.name for f in pb.DaemonInfo.DESCRIPTOR.fields}
    assert set(json.loads(line)["status"]["daemon"]) == daemon_fields
    # ... and it says what json_format would have said.
    assert (
        json.loads(json_format.MessageToJson(response, preserving_proto_field_name=True))["status"][
            "sessions"
        ][0]["name"]
        == entry["name"]
    )


def test_human_status_is_a_table() -> None:
    status = {
        "daemon": {"version": "0.1.0", "pid": 42, "uptime_s": 3725, "config_hash": "abcd",
                   "config_path": "/etc/wirekeep/wirekeep.toml", "database": "sqlite:///x.db",
                   "events_written": 12345, "writer_lag_s": 0.002},
        "sessions": [
            {"name": "venue-a", "state": "STREAMING", "since": "2026-11-21T14:00:00+00:00",
             "attempt": 0, "endpoint": "wss://a/feed", "msgs_per_s": 12.5,
             "seconds_since_last_message": 0.1, "last_error": ""},
            {"name": "broker-b", "state": "BACKOFF", "since": "2026-11-21T14:02:00+00:00",
             "attempt": 3, "endpoint": "tls://b:5035", "msgs_per_s": 0.0,
             "last_error": "connection refused by b:5035"},
        ],
    }  # fmt: skip
    from datetime import UTC, datetime

    text = render_status(status, now=datetime(2026, 11, 21, 14, 5, tzinfo=UTC))
    lines = text.splitlines()
    assert lines[0].startswith("wirekeep 0.1.0  pid 42  up 1h02m  config abcd")
    assert "events written 12,345" in lines[1]
    assert lines[3].split() == [
        "SESSION", "STATE", "SINCE", "ATTEMPT", "ENDPOINT", "MSG/S", "LAST", "MSG", "LAST", "ERROR",
    ]  # fmt: skip
    assert lines[5].split()[:4] == ["venue-a", "STREAMING", "14:00:00", "(5m00s)"]
    assert "connection refused by b:5035" in lines[6]


def test_human_status_shows_the_handshake_queue() -> None:
    status = {
        "daemon": {"version": "0.1.0", "pid": 42, "uptime_s": 5, "handshakes_in_flight": 256,
                   "handshakes_queued": 9744, "max_handshakes": 256},
        "sessions": [{"name": "s09999", "state": "DISCONNECTED", "handshake": "queued"}],
    }  # fmt: skip
    lines = render_status(status).splitlines()
    assert lines[2] == "handshakes 256 in progress (max 256), 9744 sessions queued"
    assert lines[6].split()[:3] == ["s09999", "DISCONNECTED", "(queued)"]


# --------------------------------------------------------------------------- the CLI


async def test_cli_status_pause_resume_reconnect_as_root(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a", "b"]) as r:
        await r.streaming()
        sock = str(r.socket)
        done = await wirekeep("status", "--json", "--socket", sock)
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert [s["name"] for s in status["sessions"]] == ["a", "b"]
        for s in status["sessions"]:
            assert {"name", "state", "since", "attempt", "last_error"} <= set(s)

        done = await wirekeep("status", "--socket", sock)
        assert done.returncode == 0, done.stderr
        assert b"SESSION" in done.stdout
        assert b"STREAMING" in done.stdout

        done = await wirekeep("pause", "a", "--reason", "maintenance window", "--socket", sock)
        assert (done.returncode, done.stdout) == (0, b"a: paused\n"), done.stderr
        done = await wirekeep("pause", "a", "--socket", sock)
        assert (done.returncode, done.stdout) == (0, b"a: already PAUSED\n")
        done = await wirekeep("resume", "a", "--socket", sock)
        assert (done.returncode, done.stdout) == (0, b"a: resumed\n")
        await r.streaming("a")
        done = await wirekeep("reconnect", "--all", "--socket", sock, "--json")
        assert done.returncode == 0, done.stderr
        assert sorted(json.loads(done.stdout)["sessions"]) == ["a", "b"]
        await r.streaming()
    events = {(e["session"], e["trigger"]): e for e in r.db.events()}
    pause = events["a", "pause"]
    assert pause["reason"] == "paused by uid 0 (root): maintenance window"
    assert pause["detail"] == {"uid": 0, "user": "root", "operator_reason": "maintenance window"}
    assert events["a", "resume"]["reason"] == "resumed by uid 0 (root)"
    assert events["b", "reconnect"]["reason"] == "reconnect requested by uid 0 (root)"
    r.db.verify()


async def test_cli_exit_codes(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.sock"
    done = await wirekeep("status", "--socket", str(missing))
    assert done.returncode == 3
    assert str(missing).encode() in done.stderr
    done = await wirekeep("pause", "--socket", str(missing))  # no NAME and no --all
    assert done.returncode == 2
    async with running_daemon(tmp_path, ["a"]) as r:
        done = await wirekeep("pause", "nosuch", "--socket", str(r.socket))
        assert done.returncode == 2
        assert b"unknown session nosuch" in done.stderr
        done = await wirekeep("pause", "a", "--reason", "x" * 501, "--socket", str(r.socket))
        assert done.returncode == 2
        # The socket path is found in the configuration file too.
        done = await wirekeep("status", "--json", env=cli_env(WIREKEEP_CONFIG=str(r.config_path)))
        assert done.returncode == 0, done.stderr


async def test_status_watch_prints_until_interrupted(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a"]) as r:
        out = tmp_path / "watch.out"
        with out.open("wb") as f:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "daemon", "status", "--watch",
                 "--json", "--interval", "0.2", "--socket", str(r.socket)],
                stdout=f, env=cli_env(),
            )  # fmt: skip
            await wait_until(lambda: out.read_bytes().count(b"\n") >= 3, "three refreshes")
            process.send_signal(2)  # Ctrl-C
            assert await process.wait() == 0
        lines = out.read_bytes().splitlines()
        assert all(json.loads(line)["sessions"][0]["name"] == "a" for line in lines)


# --------------------------------------------------------------------------- permissions


def test_permissions_policy() -> None:
    staff = grp.getgrnam("staff").gr_gid
    rules = Permissions(daemon_uid=998, admin_group="staff")
    assert rules.may_change(Peer(1, 0, 0))  # root
    assert rules.may_change(Peer(1, 998, 998))  # the daemon's own user
    assert rules.may_change(Peer(1, 1000, 1000, (staff,)))  # an admin
    assert rules.may_change(Peer(1, 1000, staff))  # an admin by primary group
    assert not rules.may_change(Peer(1, 1000, 1000, (4, 24)))
    assert not Permissions(998).may_change(Peer(1, 1000, 1000, (staff,)))
    assert "refused" in rules.refusal(Peer(1, 65534, 65534), "pause")


needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="running a peer as another uid needs root and setpriv",
)


def as_nobody(*args: str, groups: str | None = None) -> list[str]:
    """``wirekeep ARGS`` as uid nobody, run by the system python (the venv's may sit in a
    directory only root can read); the command needs nothing outside the repository."""
    python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    ids = ["--reuid=nobody", "--regid=nogroup"]
    ids += [f"--groups={groups}"] if groups else ["--clear-groups"]
    return ["setpriv", *ids, python, "-m", "daemon", *args]


@needs_setpriv
async def test_another_user_reads_status_but_may_not_pause(tmp_path: Path) -> None:
    keys = {"control_group": "nogroup", "admin_group": "staff"}
    async with running_daemon(tmp_path, ["a"], daemon_keys=keys) as r:
        await r.streaming()
        sock = str(r.socket)
        env = cli_env(PYTHONDONTWRITEBYTECODE="1")

        async def run(*args: str, groups: str | None = None) -> tuple[int, bytes, bytes]:
            done = await trio.run_process(
                as_nobody(*args, groups=groups), capture_stdout=True, capture_stderr=True,
                check=False, env=env, cwd=str(REPO),
            )  # fmt: skip
            return done.returncode, done.stdout, done.stderr

        code, out, err = await run("status", "--json", "--socket", sock)
        assert code == 0, err
        assert json.loads(out)["sessions"][0]["state"] == "STREAMING"

        for command in (["pause", "a"], ["reconnect", "--all"], ["reload"]):
            code, out, err = await run(*command, "--socket", sock)
            assert code == 1, (command, out, err)
            assert b"refused: uid 65534 (nobody) may read status only" in err
            assert b"member of group 'staff'" in err
        assert r.daemon.sessions["a"].model.state.name == "STREAMING"
        assert [e["trigger"] for e in r.db.events("a")][-1] == "data"

        # Membership in the admin group (a supplementary group: SO_PEERGROUPS) is enough.
        code, out, err = await run("pause", "a", "--reason", "ops", "--socket", sock,
                                   groups="staff")  # fmt: skip
        assert (code, out) == (0, b"a: paused\n"), err
    pause = r.db.events("a")[-1]
    assert pause["trigger"] == "pause"
    assert pause["reason"] == "paused by uid 65534 (nobody): ops"
    assert (pause["detail"]["uid"], pause["detail"]["user"]) == (65534, "nobody")


# --------------------------------------------------------------------------- robustness


GARBAGE = [
    b"",
    b"{",
    b"null",
    b"[]",
    b'"status"',
    b"{}",
    b'{"id": 1, "status": {}}',
    b'{"status": []}',
    b'{"status": "x"}',
    b'{"pause": {"sessions": ["a"], "all": true}}',
    b'{"pause": {}}',
    b'{"status": {}, "status": {}}',
    b'{"nosuch": {}}',
    b'{"id": "\xff\xfe"}',
    b"[" * 5000 + b"]" * 5000,
    b'{"reload": {"x": 1}}',
    b"\x00\x01\x02\x03",
]


async def test_garbage_gets_an_error_reply_and_the_connection_stays(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a"]) as r:
        lines = [g for g in GARBAGE if g.strip()]
        stream = await trio.open_unix_socket(str(r.socket))
        async with stream:
            for line in lines:
                await stream.send_all(line + b"\n")
            await stream.send_all(json.dumps(STATUS).encode() + b"\n")
            replies = [json.loads(x) for x in await read_lines(stream, len(lines) + 1)]
        assert [x["ok"] for x in replies] == [False] * len(lines) + [True]
        assert all(x["code"] == 65 and x["error"] for x in replies[:-1])
        # An id is echoed when the line had one.
        one = await r.call({"id": "7", "pause": {}})
        assert (one["id"], one["ok"], one["code"]) == ("7", False, 65)


async def test_text_that_is_not_unicode_gets_an_error_reply(tmp_path: Path) -> None:
    """Issue 9: a request with a lone surrogate (a \\ud800 escape) made the reply that
    echoed it raise UnicodeEncodeError: logged, no reply. Each line here gets a clear
    error, the connection stays usable, and nothing is logged as a failure."""
    lines = [
        b'{"id":"\\ud800","status":{}}',  # the id, echoed in the reply
        b'{"id":"2","\\udc00":{}}',  # a key (protobuf's upb raised SystemError)
        b'{"id":"3","pause":{"sessions":["\\udbff"]}}',
        b'{"id":"4","pause":{"all":true,"reason":"x\\udfffy"}}',
        b'{"id":"\xed\xa0\x80","status":{}}',  # a surrogate as (invalid) UTF-8 bytes
        b'{"id":"6","status":{}} \xff\xfe',
        '{"id":"7","status":{}}'.encode("utf-16"),  # json.loads(bytes) would take it
    ]
    async with running_daemon(tmp_path, ["a"]) as r:
        stream = await trio.open_unix_socket(str(r.socket))
        with structlog.testing.capture_logs() as logs:
            async with stream:
                await stream.send_all(b"\n".join([*lines, json.dumps(STATUS).encode(), b""]))
                replies = [json.loads(x) for x in await read_lines(stream, len(lines) + 1)]
    assert [x["ok"] for x in replies] == [False] * len(lines) + [True]
    assert [x["code"] for x in replies[:-1]] == [65] * len(lines)
    errors = [x["error"] for x in replies[:-1]]
    assert all("not valid Unicode" in e for e in errors[:4]), errors
    assert all("not UTF-8" in e for e in errors[4:]), errors
    assert [x["id"] for x in replies[:-1]] == ["\ufffd", "2", "3", "4", "", "", ""]
    assert not [e for e in logs if e["event"].startswith("control_")]


async def test_oversized_line_error_then_close(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a"]) as r:
        stream = await trio.open_unix_socket(str(r.socket))
        async with stream:
            await stream.send_all(json.dumps(STATUS).encode() + b"\n")
            # No newline ever; the daemon may close before it has read everything.
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(b"x" * (MAX_LINE + 10))
            replies = await read_lines(stream, 3)
        assert json.loads(replies[0])["ok"] is True
        error = json.loads(replies[1])
        assert error["ok"] is False
        assert "limit" in error["error"]
        assert len(replies) == 2  # then the connection was closed


async def test_half_closed_peer_gets_its_answers(tmp_path: Path) -> None:
    """What ``echo ... | socat - UNIX-CONNECT:`` does: write, shut down writing, read."""
    async with running_daemon(tmp_path, ["a"]) as r:
        stream = await trio.open_unix_socket(str(r.socket))
        async with stream:
            await stream.send_all(b'{"id":"1","status":{}}\n{"id":"2","status":{}}')  # no \n
            await stream.send_eof()
            replies = [json.loads(x) for x in await read_lines(stream, 3)]
        assert [x["id"] for x in replies] == ["1", "2"]
        assert replies[0]["status"]["sessions"] == []  # include_sessions defaults to false


async def test_idle_connection_is_closed_and_limit_applies(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["a"]) as r:
        control = r.daemon.control
        assert control is not None
        control.idle_timeout = 0.3
        control.max_connections = 3
        idle = [await trio.open_unix_socket(str(r.socket)) for _ in range(3)]
        await wait_until(lambda: control.active == 3, "three idle connections")
        extra = await trio.open_unix_socket(str(r.socket))
        (busy,) = await read_lines(extra, 1)
        assert json.loads(busy)["code"] == 69
        with trio.fail_after(5):
            for stream in idle:
                assert await stream.receive_some(10) == b""  # closed by the daemon
        for stream in [*idle, extra]:
            await stream.aclose()


async def test_fuzz_the_socket_while_sessions_stream(tmp_path: Path) -> None:
    """Random and malformed lines, oversized lines, half-closed and dropped connections,
    thousands of them: the daemon stays up, sessions keep streaming, no event is lost."""
    rng = random.Random(20261121)
    async with running_daemon(tmp_path, ["a", "b"]) as r:
        await r.streaming()
        control = r.daemon.control
        assert control is not None
        before_fds = fds()
        messages_before = {n: s.messages for n, s in r.daemon.sessions.items()}
        path = str(r.socket)

        def random_line() -> bytes:
            kind = rng.randrange(6)
            if kind == 0:
                return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            if kind == 1:
                text = json.dumps(STATUS)
                cut = rng.randrange(len(text))
                return text[:cut].encode() + bytes([rng.randrange(256)]) + text[cut + 1 :].encode()
            if kind == 2:
                command = rng.choice(["status", "pause", "reload", "x"])
                body = rng.choice([None, 1, "a", [], {}, {"sessions": ["zz"]}, {"all": "yes"}])
                return json.dumps({command: body}).encode()
            if kind == 3:
                return b"{" * rng.randrange(1, 3000)
            if kind == 4:
                return rng.choice(GARBAGE)
            return json.dumps(STATUS).encode()

        async def connect() -> trio.SocketStream:
            # trio takes a non-blocking AF_UNIX connect's EAGAIN (backlog full) for
            # "in progress" and returns a socket that never connected: check, retry.
            while True:
                stream = await trio.open_unix_socket(path)
                try:
                    stream.socket.getpeername()
                except OSError:
                    await stream.aclose()
                    await trio.sleep(0.01)
                else:
                    return stream

        async def one_peer(i: int) -> None:
            stream = await connect()
            try:
                mode = i % 5
                if mode == 0:  # opened and dropped
                    return
                if mode == 1:  # a few lines, then gone without reading
                    for _ in range(rng.randrange(1, 4)):
                        await stream.send_all(random_line() + b"\n")
                    return
                if mode == 2:  # half-closed after a partial line
                    await stream.send_all(random_line()[: rng.randrange(1, 50)])
                    await stream.send_eof()
                    with trio.move_on_after(2):
                        while await stream.receive_some(65536):
                            pass
                    return
                if mode == 3:  # oversized
                    with trio.move_on_after(2):
                        await stream.send_all(b"7" * (MAX_LINE + rng.randrange(1, 5000)) + b"\n")
                    return
                line = random_line()  # one line, read the answer
                await stream.send_all(line + b"\n")
                with trio.move_on_after(2):
                    await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await stream.aclose()

        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(50)

            async def limited(i: int) -> None:
                async with limiter:
                    await one_peer(i)

            for i in range(2500):
                nursery.start_soon(limited, i)

        await wait_until(
            lambda: control.active == 0 and control.connections >= 2500, "every connection done"
        )
        response = await r.call(STATUS)
        assert response["ok"]
        assert {s["state"] for s in response["status"]["sessions"]} == {"STREAMING"}
        for name, runner in r.daemon.sessions.items():
            assert runner.messages > messages_before[name]  # kept streaming
        assert fds() <= before_fds + 5  # every connection's descriptor was closed
        versions = {n: s.model.version for n, s in r.daemon.sessions.items()}
    # No event lost: every transition the sessions made is in the log, in order.
    events = r.db.by_session()
    for name, version in versions.items():
        assert [e["version"] for e in events[name]][:version] == list(range(1, version + 1))
        assert events[name][-1]["trigger"] == "shutdown"
    r.db.verify()


def test_split_status_cuts_the_result_out_without_decoding_it() -> None:
    from daemon.control import status_line

    tricky = 'x","status":{"sessions":[]},"y'
    line = status_line(tricky, {"pid": 1}, '[{"name":"a,\\"status\\":"}]').rstrip(b"\n")
    envelope, status = split_status(line)
    assert envelope["id"] == tricky
    assert status is not None
    assert json.loads(status) == {"daemon": {"pid": 1}, "sessions": [{"name": 'a,"status":'}]}
    refused = b'{"id":"s","ok":false,"error":"no","code":69,"status":{"daemon":{},"sessions":[]}}'
    assert split_status(refused) == ({}, None)  # decoded whole by the caller, to report
    assert split_status(b'{"id":"s","ok":true}') == ({}, None)


def test_every_request_the_cli_writes_is_valid() -> None:
    """cli_ops writes JSON without protobuf: the codec must accept each request."""
    lines = [
        {"id": "status", "status": {"include_sessions": True}},
        {"id": "pause", "pause": {"sessions": ["a"], "reason": "why"}},
        {"id": "resume", "resume": {"all": True}},
        {"id": "reconnect", "reconnect": {"sessions": ["a", "b"]}},
        {"id": "reload", "reload": {}},
    ]
    for line in lines:
        request = decode_request(json.dumps(line, separators=(",", ":")).encode())
        assert request.WhichOneof("command") == line["id"]
    source = (REPO / "daemon" / "cli_ops.py").read_text()
    assert '{"id": "status", "status": {"include_sessions": True}}' in source
    assert '{"id": "reload", "reload": {}}' in source
