"""Control socket figures against a daemon with 10,000 sessions, with baselines from the same run.

    python tests/benchmarks/bench_status.py [--json] [--sessions 10000] [--live 500]
                                            [--rounds 15]

The daemon runs as a child process (``wirekeep daemon``) with 10,000 configured protobuf
sessions: ``--live`` of them stream from the simulated venue (another child, ``wirekeep
venue``, 1 message/s and a heartbeat every 5 s per connection), so the daemon works while
it is measured; the others were paused by an operator (their ``pause`` events are written
to the database before the daemon starts, and recovery keeps them PAUSED). One Python
venue process cannot take 10,000 handshakes at once on this machine, and the size of a
status entry does not depend on the state.

- ``status_10k_sessions_ms``: median wall time of the whole ``wirekeep status --json``
  command, interpreter start included, output to /dev/null. Baselines, interleaved round
  by round: ``python_startup_ms`` (``python -c pass``, same interpreter) and
  ``cli_startup_ms`` (``wirekeep status --help``: the imports, no request).
- ``status_10k_request_ms``: the part the command does once started (connect, request,
  receive, check the envelope, cut out the StatusResult), measured in this process.
- ``control_requests_per_s``: status requests (daemon header only) answered one after
  another on one connection. Baseline: ``trio_echo_round_trips_per_s``, the same lines
  echoed by a bare Trio server in its own process (the round-trip floor on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIREKEEP = [sys.executable, "-m", "daemon"]


def seed_paused(directory: Path, names: list[str]) -> None:
    """A ``pause`` event for each of ``names``: the daemon recovers them PAUSED."""
    from datetime import UTC, datetime

    from daemon import migrate
    from daemon.store import EventStore
    from statemachines.session import TransitionRecord

    store = EventStore(f"sqlite:///{directory / 'events.db'}")
    try:
        migrate.upgrade(store.engine)
        at = datetime.now(UTC)
        detail = {"uid": 0, "user": "root", "operator_reason": "benchmark"}
        reason = "paused by uid 0 (root): benchmark"
        store.append(
            [TransitionRecord(n, 1, at, "pause", "DISCONNECTED", "PAUSED", reason, detail)
             for n in names]
        )  # fmt: skip
    finally:
        store.close()


def start_venue(directory: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    out = directory / "venue.out"
    with out.open("wb") as f:
        venue = subprocess.Popen(
            [*WIREKEEP, "venue", "--pb-port", "0", "--ws-port", "0", "--control-port", "0",
             "--rate", "1", "--heartbeat-interval", "5"],
            stdout=f, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in out.read_text().splitlines():
            if line.startswith("protobuf"):
                return venue, int(line.split()[1].rsplit(":", 1)[1])
        time.sleep(0.1)
    venue.kill()
    raise SystemExit(f"the venue did not start: {out.read_text()}")


def write_config(directory: Path, sessions: int, port: int) -> Path:
    lines = [
        "[daemon]",
        f'database = "sqlite:///{directory / "events.db"}"',
        f'control_socket = "{directory / "control.sock"}"',
        'log_format = "json"',
        "",
        "[defaults]",
        "heartbeat_interval = 10.0",
        "stale_after = 15.0",
        "dead_after = 60.0",
        "connect_rate = { per_host = 100000, window = 1.0 }",
    ]
    for i in range(sessions):
        lines += [
            "",
            "[[sessions]]",
            f'name = "venue-{i:05d}"',
            'kind = "protobuf"',
            f'url = "tcp://127.0.0.1:{port}"',
            'auth = { client_id = "bench", client_secret = "bench-client-secret",'
            ' account_id = 1, access_token = "bench-access-token" }',
            'subscribe = ["EURUSD"]',
        ]
    path = directory / "wirekeep.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Client:
    def __init__(self, path: str, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def call(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def close(self) -> None:
        self.sock.close()


STATUS_ALL = b'{"id":"b","status":{"include_sessions":true}}\n'
STATUS_HEADER = b'{"id":"b","status":{}}\n'


def wait_for_daemon(path: str, live: int, process: subprocess.Popen[bytes]) -> None:
    """Until the live sessions stream."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the daemon exited with {process.returncode}")
        try:
            client = Client(path, timeout=600)  # served once every session has started
        except OSError:
            time.sleep(0.5)
            continue
        try:
            status = json.loads(client.call(STATUS_ALL))["status"]
        finally:
            client.close()
        streaming = sum(s["state"] == "STREAMING" for s in status["sessions"])
        if streaming == live:
            return
        time.sleep(0.5)
    raise SystemExit("the sessions did not all stream within 600 s")


def timed_run(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
    return (time.perf_counter() - started) * 1000


def request_ms(path: str) -> tuple[float, int]:
    """What ``wirekeep status --json`` does once started (daemon.cli_ops), output discarded."""
    from daemon.cli_ops import Connection

    started = time.perf_counter()
    conn = Connection(path, 30)
    status = conn.status()
    conn.close()
    return (time.perf_counter() - started) * 1000, len(status)


def requests_per_s(path: str, seconds: float = 2.0) -> float:
    client = Client(path)
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        client.call(STATUS_HEADER)
        count += 1
    elapsed = time.perf_counter() - started
    client.close()
    return count / elapsed


ECHO_SERVER = """
import sys, trio
async def echo(stream):
    buffer = b""
    async with stream:
        async for chunk in stream:
            buffer += chunk
            while b"\\n" in buffer:
                line, _, buffer = buffer.partition(b"\\n")
                await stream.send_all(line + b"\\n")
async def main(path):
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(16)
    await trio.serve_listeners(echo, [trio.SocketListener(sock)])
trio.run(main, sys.argv[1])
"""


def echo_round_trips_per_s(directory: Path, env: dict[str, str], seconds: float = 2.0) -> float:
    """The floor: a Trio server in its own process answering each line with itself."""
    path = str(directory / "echo.sock")
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, path], env=env)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        return requests_per_s(path, seconds)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--live", type=int, default=500, help="sessions that stream")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="wk-bench-"))
    sock = str(directory / "control.sock")
    drop = ("NOTIFY_SOCKET", "WIREKEEP_CONFIG", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    # Bytecode cached, as for an installed package (pip compiles it), outside the tree.
    env["PYTHONPYCACHEPREFIX"] = str(directory / "pycache")
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    venue, port = start_venue(directory, env)
    config = write_config(directory, args.sessions, port)
    seed_paused(directory, [f"venue-{i:05d}" for i in range(args.live, args.sessions)])
    with (directory / "daemon.log").open("wb") as log:
        daemon = subprocess.Popen(
            [*WIREKEEP, "daemon", "--config", str(config)], stdout=log, stderr=log, env=env
        )
    try:
        started = time.perf_counter()
        wait_for_daemon(sock, args.live, daemon)
        startup_s = time.perf_counter() - started
        time.sleep(2)  # past the first burst of attempts
        status_cmd = [*WIREKEEP, "status", "--json", "--socket", sock]
        noop_cmd = [*WIREKEEP, "status", "--help"]
        python_cmd = [sys.executable, "-c", "pass"]
        for cmd in (status_cmd, noop_cmd, python_cmd):
            timed_run(cmd, env)  # warm the page cache and write the bytecode
        status, python, noop, request = [], [], [], []
        size = 0
        for _ in range(args.rounds):
            python.append(timed_run(python_cmd, env))
            noop.append(timed_run(noop_cmd, env))
            status.append(timed_run(status_cmd, env))
            ms, size = request_ms(sock)
            request.append(ms)
        rps = requests_per_s(sock)
        echo = echo_round_trips_per_s(directory, env)
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        venue.terminate()
        venue.wait(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)
    figures = {
        "sessions": args.sessions,
        "streaming_sessions": args.live,
        "status_10k_sessions_ms": round(statistics.median(status), 1),
        "python_startup_ms": round(statistics.median(python), 1),
        "cli_startup_ms": round(statistics.median(noop), 1),
        "status_10k_request_ms": round(statistics.median(request), 1),
        "status_response_bytes": size,
        "control_requests_per_s": round(rps),
        "trio_echo_round_trips_per_s": round(echo),
        "requests_ratio_to_echo": round(rps / echo, 3),
        "daemon_startup_s": round(startup_s, 1),
        "daemon_exit_code": daemon.returncode,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        width = max(map(len, figures))
        for key, value in figures.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
