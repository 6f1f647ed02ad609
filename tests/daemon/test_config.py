"""Tests for daemon.config: TOML -> validated, frozen settings; secrets resolved late."""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap
from pathlib import Path

import pytest

from daemon.config import (
    DEFAULT_CONFIG_PATH,
    EX_CONFIG,
    Config,
    ConfigError,
    ConfigProblem,
    HostPort,
    ProtobufAuth,
    ProtobufCredentials,
    Secrets,
    config_path,
    load_config,
    parse_config,
    parse_host_port,
    redact_url,
    resolve_secrets,
)
from statemachines.policy import BackoffSettings, CircuitSettings, RateSettings

WS_SESSION = """
[[sessions]]
name = "venue-a"
kind = "websocket"
url = "ws://127.0.0.1:8765/feed"
"""

FULL = """
[daemon]
database = "postgresql://wk:${cred:db_password}@db.example:5432/wirekeep"
control_socket = "/run/wk/control.sock"
control_group = "wirekeep"
admin_group = "wheel"
metrics_listen = "127.0.0.1:9464"
consumer_websocket_listen = "[::1]:8766"
log_format = "json"
consumer_queue = 500
consumer_max_lag = 12
max_frame = 65536
max_handshakes = 64

[defaults]
stale_after = 4.0
dead_after = 20
backoff = { max = 10.0, jitter = 0.1 }
circuit = { failures = 3 }
auth_expect = { ok = true }
auth = { client_id = "cid-1", client_secret = "${cred:client_secret}" }

[[sessions]]
name = "venue-a"
kind = "websocket"
url = "wss://Venue.example/feed?token=${env:VENUE_A_TOKEN}"
fallback_urls = ["wss://backup.example:8443/feed"]
auth_message = '{"op":"auth","key":"${env:VENUE_A_KEY}"}'
subscribe = ['{"op":"subscribe","channel":"ticks"}']
backoff = { initial = 1 }
connect_rate = { per_host = 10 }
max_frame = 4096

[[sessions]]
name = "venue-b"
kind = "protobuf"
url = "tls://pb.example:5035"
fallback_urls = ["tcp://10.0.0.7:5034"]
auth = { account_id = 123, access_token = "${cred:token_b}" }
subscribe = ["EURUSD", "GBPUSD"]
heartbeat_interval = 25.0
enabled = false
"""


def write(tmp_path: Path, text: str, name: str = "wirekeep.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert all(p.path == str(path) for p in info.value.problems)
    return [(p.key, p.reason) for p in info.value.problems]


def one_problem(tmp_path: Path, text: str) -> tuple[str, str]:
    found = problems_of(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


def session_toml(body: str, kind: str = "websocket", url: str = "wss://v.example/feed") -> str:
    return f'[[sessions]]\nname = "venue-a"\nkind = "{kind}"\nurl = "{url}"\n{body}\n'


# --------------------------------------------------------------------------- valid configs


def test_full_config_round_trip_with_defaults_merged(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    config = load_config(path)

    assert config.path == str(path)
    assert config.config_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    d = config.daemon
    assert d.database == "postgresql+psycopg://wk:${cred:db_password}@db.example:5432/wirekeep"
    assert d.control_socket == "/run/wk/control.sock"
    assert d.consumer_socket == "/run/wk/consumers.sock"
    assert d.control_group == "wirekeep"
    assert d.admin_group == "wheel"
    assert d.metrics_listen == HostPort("127.0.0.1", 9464)
    assert d.consumer_websocket_listen == HostPort("::1", 8766)
    assert str(d.consumer_websocket_listen) == "[::1]:8766"
    assert d.log_format == "json"
    assert d.consumer_queue == 500
    assert d.consumer_max_lag == 12.0
    assert isinstance(d.consumer_max_lag, float)
    assert d.max_frame == 65536
    assert d.max_handshakes == 64

    assert [s.name for s in config.sessions] == ["venue-a", "venue-b"]
    a = config.session("venue-a")
    assert a.kind == "websocket"
    assert a.url == "wss://Venue.example/feed?token=${env:VENUE_A_TOKEN}"
    assert a.fallback_urls == ("wss://backup.example:8443/feed",)
    assert a.endpoints == (a.url, "wss://backup.example:8443/feed")
    assert a.auth_message == '{"op":"auth","key":"${env:VENUE_A_KEY}"}'
    assert dict(a.auth_expect) == {"ok": True}
    assert a.auth is None  # the [defaults] auth table is for protobuf sessions only
    assert a.subscribe == ('{"op":"subscribe","channel":"ticks"}',)
    assert (a.connect_timeout, a.auth_timeout, a.heartbeat_interval) == (10.0, 10.0, 10.0)
    assert (a.stale_after, a.dead_after) == (4.0, 20.0)
    # backoff: initial from the session, max and jitter from [defaults], the rest built in
    assert a.backoff == BackoffSettings(
        initial=1.0, max=10.0, multiplier=2.0, jitter=0.1, reset_after=30.0
    )
    assert isinstance(a.backoff.initial, float)
    assert a.circuit == CircuitSettings(failures=3, cooldown=60.0)
    assert a.connect_rate == RateSettings(per_host=10, window=60.0)
    assert a.enabled is True
    assert a.max_frame == 4096

    b = config.session("venue-b")
    assert b.kind == "protobuf"
    assert b.auth_message is None
    assert dict(b.auth_expect) == {}  # auth_expect defaults are for websocket sessions only
    assert b.auth == ProtobufAuth(
        client_id="cid-1",
        client_secret="${cred:client_secret}",
        account_id=123,
        access_token="${cred:token_b}",
    )
    assert b.subscribe == ("EURUSD", "GBPUSD")
    assert b.heartbeat_interval == 25.0
    assert b.backoff == BackoffSettings(initial=0.5, max=10.0, jitter=0.1)
    assert b.enabled is False
    assert b.max_frame == 65536  # the daemon's max_frame

    with pytest.raises(KeyError, match="venue-z"):
        config.session("venue-z")


def test_settings_are_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sessions[0].stale_after = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.sessions[0].auth_expect["ok"] = False  # type: ignore[index]
    hash(config)  # hashable all the way down


def test_empty_file_gives_all_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    d = config.daemon
    assert d.database == "sqlite:////var/lib/wirekeep/events.db"
    assert d.control_socket == "/run/wirekeep/control.sock"
    assert d.consumer_socket == "/run/wirekeep/consumers.sock"
    assert (d.control_group, d.admin_group, d.metrics_listen) == (None, None, None)
    assert d.consumer_websocket_listen is None
    assert (d.log_format, d.consumer_queue, d.consumer_max_lag) == ("auto", 10_000, 30.0)
    assert d.max_frame == 1 << 20
    assert d.max_handshakes == 256
    assert config.sessions == ()


def test_minimal_session_gets_built_in_defaults(tmp_path: Path) -> None:
    (s,) = load_config(write(tmp_path, WS_SESSION)).sessions
    assert (s.stale_after, s.dead_after, s.connect_timeout) == (5.0, 30.0, 10.0)
    assert s.backoff == BackoffSettings(0.5, 30.0, 2.0, 0.2, 30.0)
    assert s.circuit == CircuitSettings(5, 60.0)
    assert s.connect_rate == RateSettings(60, 60.0)
    assert (s.fallback_urls, s.subscribe, s.auth_message, s.auth) == ((), (), None, None)
    assert s.enabled is True


def test_parse_config_from_bytes() -> None:
    data = WS_SESSION.encode()
    config = parse_config(data, "/x/y.toml")
    assert config.path == "/x/y.toml"
    assert config.config_hash == hashlib.sha256(data).hexdigest()[:16]


def test_the_message_format() -> None:
    data = session_toml("stale_after = 45.0").encode()
    with pytest.raises(ConfigError) as info:
        parse_config(data, "/etc/wirekeep/wirekeep.toml")
    assert str(info.value) == (
        "/etc/wirekeep/wirekeep.toml: sessions[venue-a].stale_after: "
        "must be less than dead_after (30.0), got 45.0"
    )
    assert info.value.problems == (
        ConfigProblem(
            "/etc/wirekeep/wirekeep.toml",
            "sessions[venue-a].stale_after",
            "must be less than dead_after (30.0), got 45.0",
        ),
    )
    assert EX_CONFIG == 78


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        # types
        (
            session_toml("stale_after = true"),
            "sessions[venue-a].stale_after",
            "must be a number, got boolean true",
        ),
        (
            session_toml('connect_timeout = "10"'),
            "sessions[venue-a].connect_timeout",
            "must be a number, got string '10'",
        ),
        (
            session_toml("circuit = { failures = 2.5 }"),
            "sessions[venue-a].circuit.failures",
            "must be an integer, got float 2.5",
        ),
        (
            session_toml('enabled = "yes"'),
            "sessions[venue-a].enabled",
            "must be true or false, got string 'yes'",
        ),
        (
            session_toml("connect_rate = 5"),
            "sessions[venue-a].connect_rate",
            "must be a table, got integer 5",
        ),
        (
            session_toml("subscribe = [1]"),
            "sessions[venue-a].subscribe[0]",
            "must be a string, got integer 1",
        ),
        (
            session_toml("auth_expect = { ok = [1] }"),
            "sessions[venue-a].auth_expect.ok",
            "must be a string, number or boolean, got an array",
        ),
        (
            "[daemon]\nconsumer_queue = true\n",
            "daemon.consumer_queue",
            "must be an integer, got boolean true",
        ),
        # ranges
        (
            "[daemon]\nmax_handshakes = 0\n",
            "daemon.max_handshakes",
            "must be at least 1, got 0",
        ),
        (
            session_toml("auth_timeout = 0"),
            "sessions[venue-a].auth_timeout",
            "must be greater than 0, got 0.0",
        ),
        (
            session_toml("heartbeat_interval = -1.5"),
            "sessions[venue-a].heartbeat_interval",
            "must be greater than 0, got -1.5",
        ),
        (
            session_toml("dead_after = inf"),
            "sessions[venue-a].dead_after",
            "must be a finite number, got inf",
        ),
        (
            session_toml("stale_after = 30.0"),
            "sessions[venue-a].stale_after",
            "must be less than dead_after (30.0), got 30.0",
        ),
        (
            session_toml("backoff = { initial = 40.0 }"),
            "sessions[venue-a].backoff.initial",
            "must not be greater than backoff.max (30.0), got 40.0",
        ),
        (
            session_toml("backoff = { jitter = 1 }"),
            "sessions[venue-a].backoff.jitter",
            "must be at least 0 and less than 1, got 1.0",
        ),
        (
            session_toml("backoff = { jitter = -0.1 }"),
            "sessions[venue-a].backoff.jitter",
            "must be at least 0 and less than 1, got -0.1",
        ),
        (
            session_toml("backoff = { multiplier = 0.9 }"),
            "sessions[venue-a].backoff.multiplier",
            "must be at least 1, got 0.9",
        ),
        (
            session_toml("backoff = { reset_after = 0 }"),
            "sessions[venue-a].backoff.reset_after",
            "must be greater than 0, got 0.0",
        ),
        (
            session_toml("connect_rate = { per_host = 0 }"),
            "sessions[venue-a].connect_rate.per_host",
            "must be at least 1, got 0",
        ),
        (
            session_toml("max_frame = 0"),
            "sessions[venue-a].max_frame",
            "must be at least 1, got 0",
        ),
        (
            "[daemon]\nconsumer_max_lag = 0\n",
            "daemon.consumer_max_lag",
            "must be greater than 0, got 0.0",
        ),
        # enums
        (
            session_toml("", kind="rest"),
            "sessions[venue-a].kind",
            'must be "websocket" or "protobuf", got \'rest\'',
        ),
        (
            '[daemon]\nlog_format = "text"\n',
            "daemon.log_format",
            'must be "auto", "json" or "console", got \'text\'',
        ),
        # required keys and names
        (
            '[[sessions]]\nname = "venue-a"\nkind = "websocket"\n',
            "sessions[venue-a].url",
            "required key is missing",
        ),
        (
            '[[sessions]]\nkind = "websocket"\nurl = "ws://h/"\n',
            "sessions[0].name",
            "required key is missing",
        ),
        (
            '[[sessions]]\nname = "-bad"\nkind = "websocket"\nurl = "ws://h/"\n',
            "sessions[0].name",
            "must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit, "
            "got '-bad'",
        ),
        (
            '[sessions]\nname = "a"\n',
            "sessions",
            "must be an array of tables: write each session as [[sessions]]",
        ),
        # URLs
        (
            session_toml("", url="https://v.example/feed"),
            "sessions[venue-a].url",
            "must start with ws:// or wss:// for a websocket URL, got 'https'",
        ),
        (
            session_toml("", kind="protobuf", url="wss://v.example/feed"),
            "sessions[venue-a].url",
            "must start with tcp:// or tls:// for a protobuf URL, got 'wss'",
        ),
        (
            session_toml("", kind="protobuf", url="tcp://v.example"),
            "sessions[venue-a].url",
            "needs a port (tcp://host:port)",
        ),
        (
            session_toml("", kind="protobuf", url="tls://v.example:5035/path"),
            "sessions[venue-a].url",
            "takes only a host and a port (tls://host:port)",
        ),
        (
            session_toml("", url="wss:///feed"),
            "sessions[venue-a].url",
            "the host is missing (expected wss://host/path)",
        ),
        (
            session_toml("", url="v.example/feed"),
            "sessions[venue-a].url",
            "must be an absolute URL like wss://host/path",
        ),
        (
            session_toml("", url="wss://v.example:99999/feed"),
            "sessions[venue-a].url",
            "is not a valid URL (Port out of range 0-65535)",
        ),
        (
            session_toml("", url="wss://user:pw@v.example/feed"),
            "sessions[venue-a].url",
            "must not contain a user name or password; use auth, auth_message or the query",
        ),
        (
            session_toml("", url="wss://v.example/feed#x"),
            "sessions[venue-a].url",
            "must not have a #fragment",
        ),
        (
            session_toml('fallback_urls = ["wss://ok.example/", "ws://bad example/"]'),
            "sessions[venue-a].fallback_urls[1]",
            "must not contain whitespace or control characters",
        ),
        (
            '[daemon]\ndatabase = "mysql://db/x"\n',
            "daemon.database",
            "must start with sqlite:///, postgresql+psycopg:// or postgresql://, got 'mysql'",
        ),
        (
            '[daemon]\ndatabase = "sqlite:///:memory:"\n',
            "daemon.database",
            "needs a database file (sqlite:////absolute/path.db); an in-memory SQLite "
            "database is private to one thread",
        ),
        # listen addresses and sockets
        (
            '[daemon]\nmetrics_listen = "9464"\n',
            "daemon.metrics_listen",
            "must be host:port: expected host:port, e.g. 127.0.0.1:9464",
        ),
        (
            '[daemon]\nmetrics_listen = ":9464"\n',
            "daemon.metrics_listen",
            "must be host:port: the host is missing (127.0.0.1 for loopback only, 0.0.0.0 for all)",
        ),
        (
            '[daemon]\nconsumer_websocket_listen = "127.0.0.1:70000"\n',
            "daemon.consumer_websocket_listen",
            "must be host:port: the port must be between 0 and 65535, got 70000",
        ),
        (
            f'[daemon]\ncontrol_socket = "/{"x" * 120}"\n',
            "daemon.control_socket",
            "is 121 bytes long; a Unix socket path has at most 107",
        ),
        (
            '[daemon]\ncontrol_socket = "/run/a.sock"\nconsumer_socket = "/run/a.sock"\n',
            "daemon.consumer_socket",
            "must differ from control_socket",
        ),
        (
            '[daemon]\nmetrics_listen = "127.0.0.1:9000"\n'
            'consumer_websocket_listen = "127.0.0.1:9000"\n',
            "daemon.consumer_websocket_listen",
            "must differ from metrics_listen (127.0.0.1:9000)",
        ),
        # JSON templates
        (
            session_toml("auth_message = '{\"op\": auth}'"),
            "sessions[venue-a].auth_message",
            "must be JSON text: Expecting value at character 7",
        ),
        (
            session_toml("subscribe = ['{\"op\":']"),
            "sessions[venue-a].subscribe[0]",
            "must be JSON text: Expecting value at character 6",
        ),
        # kind-specific keys
        (
            session_toml('auth = { client_id = "x" }'),
            "sessions[venue-a].auth",
            'only applies to kind = "protobuf" sessions (this one is "websocket")',
        ),
        (
            session_toml("auth_message = '{}'", kind="protobuf", url="tcp://v.example:1"),
            "sessions[venue-a].auth_message",
            'only applies to kind = "websocket" sessions (this one is "protobuf")',
        ),
        (
            session_toml(
                'auth = { client_id = "a", client_secret = "b", account_id = 1 }',
                kind="protobuf",
                url="tcp://v.example:1",
            ),
            "sessions[venue-a].auth.access_token",
            "required key is missing from auth",
        ),
        (
            session_toml(
                'auth = { client_id = "a", client_secret = "b", account_id = "12x", '
                'access_token = "t" }',
                kind="protobuf",
                url="tcp://v.example:1",
            ),
            "sessions[venue-a].auth.account_id",
            "must be an integer or a placeholder, got string '12x'",
        ),
    ],
)
def test_each_problem_has_its_key_and_reason(
    tmp_path: Path, toml: str, key: str, reason: str
) -> None:
    assert one_problem(tmp_path, toml) == (key, reason)


def test_integer_is_accepted_where_a_float_is_expected(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, session_toml("stale_after = 2\nbackoff = { max = 8 }")))
    (s,) = config.sessions
    assert s.stale_after == 2.0
    assert isinstance(s.stale_after, float)
    assert s.backoff.max == 8.0


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems_of(
        tmp_path,
        """
        [daemon]
        database = "mysql://x"
        log_format = "text"

        [[sessions]]
        name = "venue-a"
        kind = "websocket"
        url = "http://x/feed"
        stale_after = 45.0
        backoff = { initial = 20.0, max = 10.0, jitter = 1.5 }

        [[sessions]]
        name = "venue-b"
        kind = "protobuf"
        url = "tcp://host"
        circuit = { failures = 0, cooldown = false }
        """,
    )
    assert [key for key, _ in found] == [
        "daemon.database",
        "daemon.log_format",
        "sessions[venue-a].url",
        "sessions[venue-a].stale_after",
        "sessions[venue-a].backoff.jitter",
        "sessions[venue-a].backoff.initial",
        "sessions[venue-b].url",
        "sessions[venue-b].circuit.failures",
        "sessions[venue-b].circuit.cooldown",
    ]


def test_str_has_one_line_per_problem(tmp_path: Path) -> None:
    path = write(tmp_path, session_toml("stale_after = -1\ndead_after = false"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).splitlines() == [
        f"{path}: sessions[venue-a].stale_after: must be greater than 0, got -1.0",
        f"{path}: sessions[venue-a].dead_after: must be a number, got boolean false",
    ]


def test_several_url_problems_on_one_key(tmp_path: Path) -> None:
    found = problems_of(tmp_path, session_toml("", url="https://u:p@/x#f"))
    assert found == [
        (
            "sessions[venue-a].url",
            "must start with ws:// or wss:// for a websocket URL, got 'https'",
        ),
        (
            "sessions[venue-a].url",
            "must not contain a user name or password; use auth, auth_message or the query",
        ),
        ("sessions[venue-a].url", "the host is missing (expected wss://host/path)"),
        ("sessions[venue-a].url", "must not have a #fragment"),
    ]


def test_duplicate_toml_keys_name_the_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [daemon]
        database = "sqlite:////tmp/a.db"
        database = "sqlite:////tmp/b.db"

        [[sessions]]
        name = "a"
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.path == str(path)
    assert problem.key == "-"
    assert problem.reason == (
        "invalid TOML: Cannot overwrite a value (at line 4, column 33); "
        "a key or table is defined twice"
    )
    assert str(info.value).startswith(f"{path}: -: invalid TOML")


def test_duplicate_key_on_the_last_line_still_gets_a_line(tmp_path: Path) -> None:
    key, reason = one_problem(tmp_path, "a = 1\n\nb = 2\nb = 3\n")
    assert key == "-"
    assert "line 4" in reason
    assert "defined twice" in reason


def test_duplicate_table_is_an_error(tmp_path: Path) -> None:
    key, reason = one_problem(tmp_path, "[daemon]\n[daemon]\n")
    assert key == "-"
    assert reason == (
        "invalid TOML: Cannot declare ('daemon',) twice (at line 2, column 8); "
        "a key or table is defined twice"
    )


def test_toml_syntax_error(tmp_path: Path) -> None:
    assert one_problem(tmp_path, "[daemon]\ndatabase = \nx = 1\n") == (
        "-",
        "invalid TOML: Invalid value (at line 2, column 12)",
    )


def test_missing_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: -: file not found"

    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: -: is a directory, not a file"

    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"a = 1\n\xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(binary)
    assert str(info.value) == f"{binary}: -: not UTF-8 text (byte 6)"


def test_duplicate_session_names(tmp_path: Path) -> None:
    found = problems_of(
        tmp_path,
        WS_SESSION
        + WS_SESSION
        + '[[sessions]]\nname = "venue-a"\nkind = "websocket"\nurl = "ws://h/"\nstale_after = 0\n',
    )
    assert found == [
        ("sessions[1].name", "duplicate session name 'venue-a' (sessions[0])"),
        ("sessions[2].name", "duplicate session name 'venue-a' (sessions[0])"),
        # a later duplicate's other problems are located by index, not by the name
        ("sessions[2].stale_after", "must be greater than 0, got 0.0"),
    ]


def test_unknown_keys_suggest_the_closest_known_key(tmp_path: Path) -> None:
    found = problems_of(
        tmp_path,
        """
        [deamon]
        [daemon]
        metric_listen = "127.0.0.1:1"
        [defaults]
        backof = { max = 1.0 }
        [[sessions]]
        name = "venue-a"
        kind = "websocket"
        url = "ws://h/"
        stale_afterr = 3.0
        backoff = { maximum = 3.0 }
        zzz = 1
        """,
    )
    assert found == [
        ("deamon", "unknown section (did you mean 'daemon'?)"),
        ("daemon.metric_listen", "unknown key (did you mean 'metrics_listen'?)"),
        ("defaults.backof", "unknown key (did you mean 'backoff'?)"),
        ("sessions[venue-a].stale_afterr", "unknown key (did you mean 'stale_after'?)"),
        ("sessions[venue-a].backoff.maximum", "unknown key (did you mean 'max'?)"),
        (
            "sessions[venue-a].zzz",
            "unknown key (known: name, kind, url, fallback_urls, auth_message, auth_expect, "
            "auth, subscribe, connect_timeout, auth_timeout, heartbeat_interval, stale_after, "
            "dead_after, backoff, circuit, connect_rate, enabled, max_frame)",
        ),
    ]


def test_name_cannot_be_a_default(tmp_path: Path) -> None:
    assert one_problem(tmp_path, '[defaults]\nname = "x"\n') == (
        "defaults.name",
        "a session name cannot be given under [defaults]",
    )


def test_a_bad_default_is_reported_once_under_defaults(tmp_path: Path) -> None:
    found = problems_of(
        tmp_path,
        "[defaults]\nstale_after = -2\nbackoff = { jitter = 2 }\n"
        + WS_SESSION
        + WS_SESSION.replace("venue-a", "venue-b"),
    )
    assert found == [
        ("defaults.stale_after", "must be greater than 0, got -2.0"),
        ("defaults.backoff.jitter", "must be at least 0 and less than 1, got 2.0"),
    ]


def test_cross_field_problem_from_defaults_and_session(tmp_path: Path) -> None:
    # both values from [defaults]: reported once, there
    found = problems_of(
        tmp_path,
        "[defaults]\nstale_after = 40.0\n" + WS_SESSION + WS_SESSION.replace("venue-a", "b"),
    )
    assert found == [("defaults.stale_after", "must be less than dead_after (30.0), got 40.0")]
    # one from the session: reported under the session
    found = problems_of(
        tmp_path, "[defaults]\nstale_after = 40.0\n" + session_toml("dead_after = 35")
    )
    assert found == [
        ("sessions[venue-a].stale_after", "must be less than dead_after (35.0), got 40.0")
    ]


def test_defaults_layers_merge_tables_and_replace_lists(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            [defaults]
            kind = "websocket"
            subscribe = ['{"a":1}']
            backoff = { initial = 2.0, max = 8.0 }
            connect_rate = { window = 10 }

            [[sessions]]
            name = "one"
            url = "ws://h/"
            backoff = { max = 16.0 }

            [[sessions]]
            name = "two"
            url = "ws://h/"
            subscribe = []
            connect_rate = { per_host = 3 }
            """,
        )
    )
    one, two = config.sessions
    assert one.kind == two.kind == "websocket"
    assert one.subscribe == ('{"a":1}',)
    assert two.subscribe == ()
    assert one.backoff == BackoffSettings(initial=2.0, max=16.0)
    assert two.backoff == BackoffSettings(initial=2.0, max=8.0)
    assert one.connect_rate == RateSettings(per_host=60, window=10.0)
    assert two.connect_rate == RateSettings(per_host=3, window=10.0)


def test_auth_merges_across_layers_and_checks_placeholders(tmp_path: Path) -> None:
    found = problems_of(
        tmp_path,
        """
        [defaults]
        auth = { client_id = "c", client_secret = "${cred:}" }
        [[sessions]]
        name = "pb"
        kind = "protobuf"
        url = "tcp://h:1"
        auth = { account_id = -1, access_token = "${env:TOKEN" }
        """,
    )
    assert found == [
        (
            "defaults.auth.client_secret",
            "malformed placeholder '${cred:}': expected ${env:NAME} or ${cred:NAME}; "
            "a credential name is letters, digits, '_', '.' and '-'",
        ),
        ("sessions[pb].auth.account_id", "must not be negative, got -1"),
        (
            "sessions[pb].auth.access_token",
            "unterminated placeholder '${env:TOKEN': expected ${env:NAME} or ${cred:NAME}",
        ),
    ]


# --------------------------------------------------------------------------- placeholders


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        (
            "${ENV:X}",
            "malformed placeholder '${ENV:X}': expected ${env:NAME} or ${cred:NAME}; "
            "write $${ for a literal ${",
        ),
        (
            "${X}",
            "malformed placeholder '${X}': expected ${env:NAME} or ${cred:NAME}; "
            "write $${ for a literal ${",
        ),
        (
            "${env:1X}",
            "malformed placeholder '${env:1X}': expected ${env:NAME} or ${cred:NAME}; "
            "an environment variable name is letters, digits and '_'",
        ),
        (
            "${cred:../x}",
            "malformed placeholder '${cred:../x}': expected ${env:NAME} or ${cred:NAME}; "
            "a credential name is letters, digits, '_', '.' and '-'",
        ),
    ],
)
def test_malformed_placeholders(tmp_path: Path, template: str, reason: str) -> None:
    toml = session_toml(f"auth_message = '\"{template}\"'")
    assert one_problem(tmp_path, toml) == ("sessions[venue-a].auth_message", reason)


def test_placeholders_where_they_are_not_resolved(tmp_path: Path) -> None:
    found = problems_of(
        tmp_path,
        """
        [daemon]
        database = "postgresql://u:p@${env:HOST}/db"
        control_socket = "/run/${env:X}.sock"
        [[sessions]]
        name = "venue-a"
        kind = "websocket"
        url = "wss://h/${env:PATH_PART}"
        subscribe = ['{"k":"${env:K}"}']
        """,
    )
    where = "placeholders work in auth_message, auth, daemon.database and URL query strings"
    assert found == [
        (
            "daemon.database",
            "placeholders are allowed only in the user name, password and query",
        ),
        ("daemon.control_socket", f"placeholders are not resolved here ({where})"),
        ("sessions[venue-a].url", "placeholders are allowed only in the query string"),
        ("sessions[venue-a].subscribe[0]", f"placeholders are not resolved here ({where})"),
    ]


def test_dollar_dollar_brace_is_a_literal(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, session_toml("auth_message = '\"$${not_a_secret}\"'")))
    (s,) = config.sessions
    assert s.auth_message == '"$${not_a_secret}"'
    assert s.resolved_auth_message(Secrets()) == '"${not_a_secret}"'
    assert load_config(write(tmp_path, FULL)).secret_refs()[0] == (
        "daemon.database",
        "cred:db_password",
    )


# --------------------------------------------------------------------------- secrets

CRED_CONFIG = """
[daemon]
database = "postgresql://wk:${cred:db_password}@db/wk"

[[sessions]]
name = "venue-a"
kind = "websocket"
url = "wss://v.example/feed?token=${env:TOKEN}&x=1"
auth_message = '{"op":"auth","key":"${env:KEY}","n":${env:N}}'

[[sessions]]
name = "venue-b"
kind = "protobuf"
url = "tcp://pb.example:5034"
auth = { client_id = "cid", client_secret = "${cred:secret}", account_id = "${env:ACCOUNT}", access_token = "tok-${cred:token}" }
"""  # noqa: E501


def test_secrets_from_env_and_credentials_dir(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CRED_CONFIG))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db_password").write_text("p@ss/w:rd\n")  # one trailing newline is stripped
    (creds / "secret").write_text("s3cret\n\n")  # ... only one
    (creds / "token").write_text("t0ken-value")
    environ = {
        "TOKEN": "a&b=c-token",
        "KEY": 'k"ey\\-secret',
        "N": "777777",
        "ACCOUNT": "4242",
        "CREDENTIALS_DIRECTORY": str(creds),
    }
    secrets = resolve_secrets(config, environ)  # the directory comes from the environment
    assert dict(secrets) == {
        "cred:db_password": "p@ss/w:rd",
        "env:TOKEN": "a&b=c-token",
        "env:KEY": 'k"ey\\-secret',
        "env:N": "777777",
        "cred:secret": "s3cret\n",
        "env:ACCOUNT": "4242",
        "cred:token": "t0ken-value",
    }
    assert "s3cret" not in repr(secrets)
    assert "env:TOKEN" in repr(secrets)

    assert config.daemon.resolved_database(secrets) == (
        "postgresql+psycopg://wk:p%40ss%2Fw%3Ard@db/wk"
    )
    a, b = config.sessions
    assert a.resolved_endpoints(secrets) == ("wss://v.example/feed?token=a%26b%3Dc-token&x=1",)
    assert a.resolved_auth_message(secrets) == '{"op":"auth","key":"k\\"ey\\\\-secret","n":777777}'
    assert b.resolved_auth(secrets) == ProtobufCredentials(
        client_id="cid", client_secret="s3cret\n", account_id=4242, access_token="tok-t0ken-value"
    )
    assert "s3cret" not in repr(b.resolved_auth(secrets))
    assert b.resolved_auth_message(secrets) is None
    assert a.resolved_auth(secrets) is None

    values = config.secret_values(secrets)
    assert list(values) == sorted(values, key=lambda v: (-len(v), v))
    for expected in (
        "p@ss/w:rd",
        "p%40ss%2Fw%3Ard",
        "a&b=c-token",
        "a%26b%3Dc-token",
        'k"ey\\-secret',
        'k\\"ey\\\\-secret',
        "s3cret\n",
        "tok-t0ken-value",
        "t0ken-value",
    ):
        assert expected in values
    assert "" not in values
    assert "4242" not in values  # an account id is no secret (and too short to mask)


def test_explicit_credentials_dir_wins(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[daemon]\ndatabase = "postgresql://u:${cred:pw}@h/d"\n'))
    creds = tmp_path / "c"
    creds.mkdir()
    (creds / "pw").write_text("right-one\r\n")
    secrets = resolve_secrets(config, {"CREDENTIALS_DIRECTORY": "/nonexistent"}, str(creds))
    assert secrets["cred:pw"] == "right-one"


def test_missing_secrets_are_named_without_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CRED_CONFIG))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "secret").write_text("")  # empty
    environ = {"KEY": "super-secret-value", "N": "991799", "ACCOUNT": "8812", "TOKEN": "tok-value"}
    with pytest.raises(ConfigError) as info:
        resolve_secrets(config, environ, str(creds))
    found = [(p.key, p.reason) for p in info.value.problems]
    assert found == [
        (
            "daemon.database",
            f"secret ${{cred:db_password}}: credential 'db_password' not found in {creds}",
        ),
        ("sessions[venue-b].auth.client_secret", "secret ${cred:secret} is empty"),
        (
            "sessions[venue-b].auth.access_token",
            f"secret ${{cred:token}}: credential 'token' not found in {creds}",
        ),
    ]
    message = str(info.value)
    assert all(line.startswith(f"{config.path}: ") for line in message.splitlines())
    for value in environ.values():
        assert value not in message


def test_missing_env_and_no_credentials_directory(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CRED_CONFIG))
    with pytest.raises(ConfigError) as info:
        resolve_secrets(config, {"N": "111111", "ACCOUNT": "1"})
    reasons = {p.key: p.reason for p in info.value.problems}
    assert reasons["sessions[venue-a].url"] == (
        "secret ${env:TOKEN}: environment variable TOKEN is not set"
    )
    assert reasons["daemon.database"] == (
        "secret ${cred:db_password}: credential 'db_password' needs a credentials directory, "
        "and $CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit sets it)"
    )
    assert len(info.value.problems) == 5  # TOKEN, KEY, db_password, secret, token


def test_account_id_must_resolve_to_an_integer(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CRED_CONFIG))
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("db_password", "secret", "token"):
        (creds / name).write_text("x-long-enough")
    environ = {"TOKEN": "t-token", "KEY": "k-secret", "N": "111111", "ACCOUNT": "not-a-number"}
    with pytest.raises(ConfigError) as info:
        resolve_secrets(config, environ, str(creds))
    assert [(p.key, p.reason) for p in info.value.problems] == [
        ("sessions[venue-b].auth.account_id", "must resolve to an integer (from ${env:ACCOUNT})")
    ]
    assert "not-a-number" not in str(info.value)


def test_disabled_sessions_need_no_secrets(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, session_toml("enabled = false", url="wss://h/?t=${env:MISSING}"))
    )
    assert resolve_secrets(config, {}) == Secrets()
    with pytest.raises(KeyError, match="env:MISSING"):
        config.sessions[0].resolved_endpoints(Secrets())


def test_secret_values_include_a_literal_database_password(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[daemon]\ndatabase = "postgresql://u:p%40ssword@h/d"\n'))
    assert config.secret_values(Secrets()) == ("p%40ssword", "p@ssword")


@pytest.mark.parametrize(
    ("toml", "environ", "key"),
    [
        (session_toml("""auth_message = '{"key":"${env:K}"}'"""), {"K": "abc"}, "auth_message"),
        ('[daemon]\ndatabase = "postgresql://u:pw@h/d"\n', {}, "daemon.database"),
    ],
)
def test_secrets_too_short_to_mask_are_refused(
    tmp_path: Path, toml: str, environ: dict[str, str], key: str
) -> None:
    config = load_config(write(tmp_path, toml))
    with pytest.raises(ConfigError) as info:
        resolve_secrets(config, environ)
    (problem,) = info.value.problems
    assert problem.key.endswith(key)
    assert "secrets need at least 6" in problem.reason
    assert "abc" not in str(info.value)


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://wk:hunter2@db.example:5432/wk",
            "postgresql+psycopg://wk:***@db.example:5432/wk",
        ),
        ("postgresql://wk:p/w@d@db/wk", "postgresql://wk:***@d@db/wk"),
        ("postgresql://wk@db/wk", "postgresql://wk@db/wk"),
        ("postgresql://:pw@db/wk", "postgresql://:***@db/wk"),
        ("sqlite:////var/lib/wirekeep/events.db", "sqlite:////var/lib/wirekeep/events.db"),
        (
            "wss://v.example/feed?token=abc&channel=ticks&api_key=k#x",
            "wss://v.example/feed?token=***&channel=ticks&api_key=***#x",
        ),
        ("wss://v.example/feed?password=", "wss://v.example/feed?password="),
        ("tcp://h:1", "tcp://h:1"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_config_path_precedence() -> None:
    env = {"WIREKEEP_CONFIG": "/env/wk.toml"}
    assert config_path("/cli/wk.toml", env) == "/cli/wk.toml"
    assert config_path(None, env) == "/env/wk.toml"
    assert config_path(None, {}) == DEFAULT_CONFIG_PATH == "/etc/wirekeep/wirekeep.toml"
    assert config_path(None, {"WIREKEEP_CONFIG": ""}) == DEFAULT_CONFIG_PATH


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:8766", ("::1", 8766)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected
    assert str(parse_host_port(text)) == text


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("9464", "expected host:port"),
        (":9464", "the host is missing"),
        ("::1:9464", "needs brackets"),
        ("[::1]9464", r"expected \[address\]:port"),
        ("h:port", "the port must be a number"),
        ("h:-1", "the port must be a number"),
        ("h:65536", "between 0 and 65535"),
    ],
)
def test_parse_host_port_rejects(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_host_port(text)


def test_host_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    a, b = config.sessions
    assert a.host_key() == "venue.example:443"
    assert a.host_key(a.fallback_urls[0]) == "backup.example:8443"
    assert a.host_key("ws://h.example/x") == "h.example:80"
    assert a.host_key("wss://[::1]/x") == "[::1]:443"
    assert b.host_key() == "pb.example:5035"
    assert b.host_key(b.fallback_urls[0]) == "10.0.0.7:5034"


def fingerprints(tmp_path: Path, text: str) -> dict[str, str]:
    config: Config = load_config(write(tmp_path, text))
    return {s.name: s.fingerprint() for s in config.sessions}


def test_fingerprints_change_only_with_a_setting(tmp_path: Path) -> None:
    base = fingerprints(tmp_path, FULL)
    assert all(len(f) == 16 for f in base.values())
    assert base["venue-a"] != base["venue-b"]
    # the same settings written differently: equal
    reworded = FULL.replace("dead_after = 20", "dead_after = 20.0") + "\n# a comment\n"
    assert fingerprints(tmp_path, reworded) == base
    # one session's setting changes: only its fingerprint changes
    changed = fingerprints(
        tmp_path, FULL.replace("heartbeat_interval = 25.0", "heartbeat_interval = 26.0")
    )
    assert changed["venue-a"] == base["venue-a"]
    assert changed["venue-b"] != base["venue-b"]
    # a [defaults] change reaches every session that uses it
    changed = fingerprints(tmp_path, FULL.replace("stale_after = 4.0", "stale_after = 3.0"))
    assert changed["venue-a"] != base["venue-a"]
    assert changed["venue-b"] != base["venue-b"]
    # a nested table and a template change too
    changed = fingerprints(tmp_path, FULL.replace("initial = 1 }", "initial = 2 }"))
    assert changed["venue-a"] != base["venue-a"]
    changed = fingerprints(tmp_path, FULL.replace("${env:VENUE_A_KEY}", "${env:OTHER}"))
    assert changed["venue-a"] != base["venue-a"]
    assert changed["venue-b"] == base["venue-b"]


def test_config_hash_follows_the_bytes(tmp_path: Path) -> None:
    one = load_config(write(tmp_path, WS_SESSION)).config_hash
    two = load_config(write(tmp_path, WS_SESSION + "\n# comment\n")).config_hash
    assert len(one) == 16
    assert one != two
