"""A model-based harness for ``SessionRunner``: random scripts of operator commands, venue
faults and passing time, run against the real runner, adapters and simulated venue.

A script is a list of steps (:data:`STEP`, a hypothesis strategy). :func:`run_script` runs
one script in a single ``trio.run`` under ``MockClock(autojump_threshold=0)`` and, after
every step, once every task is blocked (no virtual time passes for the check), checks the
invariants that must hold whatever happened (:meth:`Harness.check`):

- no exception escaped the runner (its task is alive unless the session was removed), and
  none was contained by its internal-error guard (nothing was logged at error level);
- the log verifies: every persisted transition is legal, versions are gapless;
- the runner's state and version are the fold of its events, and ``shown`` matches them;
- ``since`` is the entry time: the ``at`` of the latest event that changed the state
  (self-loops such as ``connected`` or ``throttled`` do not move it), None before any;
- the session is PAUSED exactly when the operator's last word was ``pause``, and no
  connection (attempt or primary probe) was opened while it was PAUSED;
- every command is answered within :data:`COMMAND_TIMEOUT` virtual seconds.

One script is one example: hypothesis shrinks a failing script to a short list of steps.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypeAlias, get_args
from unittest import mock

import structlog.testing
import structlog.typing
import trio
import trio.testing
from hypothesis import strategies as st
from sessionkit import PB_PORT, T0, WS_PORT, Kit, MemoryLog, Net, sessions_from, venue

import daemon.session
from daemon.app import view_of
from daemon.config import SessionConfig
from daemon.session import CommandKind, SessionRunner
from daemon.venue import FaultName, SimulatedVenue
from statemachines.session import SessionMachine, State, TransitionRecord

#: How long (virtual seconds) any command may take to be answered.
COMMAND_TIMEOUT = 30.0
#: How often a session on its fallback probes the primary. The daemon's 30 s would need a
#: link that stays quiet for 30 s; patched down so that failback happens within seconds.
PROBE_INTERVAL = 2.0
#: One machine for every example, as one serves every session of a daemon: building it
#: costs more than a short script. Each runner unregisters its model when it ends.
MACHINE = SessionMachine()

Kind: TypeAlias = Literal["protobuf", "websocket"]
Where: TypeAlias = Literal["primary", "backup", "both"]
Operator: TypeAlias = Literal["pause", "resume", "reconnect", "reload", "remove"]

# -- the steps of a script ------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    """Let virtual time pass."""

    seconds: float

    def __repr__(self) -> str:
        return f"Wait({self.seconds})"


@dataclass(frozen=True)
class Command:
    """An operator command. ``reload`` hands the session over to a new runner (what a
    config reload that changes the session does); on a removed session it adds it back."""

    kind: Operator

    def __repr__(self) -> str:
        return f"Command({self.kind!r})"


@dataclass(frozen=True)
class Fault:
    """A fault of the simulated venue(s): instant (drop, garbage, oversized) or timed."""

    name: FaultName
    where: Where
    seconds: float | None = None
    delay: float = 0.001  # slow_drip: seconds between bytes

    def __repr__(self) -> str:
        extra = "" if self.seconds is None else f", {self.seconds}"
        extra += f", delay={self.delay}" if self.name == "slow_drip" else ""
        return f"Fault({self.name!r}, {self.where!r}{extra})"


@dataclass(frozen=True)
class Primary:
    """The primary endpoint's host accepts connections again (up) or refuses them."""

    up: bool

    def __repr__(self) -> str:
        return f"Primary(up={self.up})"


Step: TypeAlias = Wait | Command | Fault | Primary

_WHERE = st.sampled_from(("backup", "primary", "both"))
_SECONDS = st.sampled_from((2.0, 0.5, 6.0, 20.0))
STEP: st.SearchStrategy[Step] = st.one_of(
    st.sampled_from((0.3, 0.1, 0.7, 1.2, 2.0, 3.5, 5.0, 9.0)).map(Wait),
    st.sampled_from(get_args(Operator)).map(Command),
    st.builds(Fault, st.sampled_from(("drop", "garbage", "oversized")), _WHERE),
    st.builds(Fault, st.sampled_from(("silent", "refuse", "reject_auth")), _WHERE, _SECONDS),
    st.builds(Fault, st.just("slow_drip"), _WHERE, _SECONDS, delay=st.sampled_from((0.001, 0.05))),
    st.builds(Fault, st.just("clear"), _WHERE),
    st.booleans().map(Primary),
)
SCRIPT = st.lists(STEP, max_size=20)


@dataclass(frozen=True)
class Setup:
    """What a script starts from: the session kind, the venues' pace, the primary's host.

    A ``quiet`` venue sends a heartbeat every 2.5 s and a quote every 4 s: longer than
    ``stale_after`` (a quiet link flaps between STREAMING and STALE) and longer than the
    primary probe interval (a session waits in AUTHENTICATED for its first message).
    """

    kind: Kind
    quiet: bool
    primary_up: bool


SETUP = st.builds(Setup, st.sampled_from(("protobuf", "websocket")), st.booleans(), st.booleans())

# -- the session and its venues -------------------------------------------------------------


@functools.cache
def session_config(kind: Kind) -> SessionConfig:
    """A session with a primary and a fallback endpoint and timers of a few seconds."""
    if kind == "protobuf":
        primary, backup = f"tcp://primary:{PB_PORT}", f"tcp://backup:{PB_PORT}"
        specific = (
            'auth = { client_id = "c", client_secret = "s3cret", account_id = 1, '
            'access_token = "t0ken" }\nsubscribe = ["EURUSD"]\n'
        )
    else:
        primary, backup = f"ws://primary:{WS_PORT}/feed", f"ws://backup:{WS_PORT}/feed"
        specific = (
            'auth_message = \'{"op":"auth","key":"k"}\'\nauth_expect = { ok = true }\n'
            'subscribe = [\'{"op":"subscribe","channel":"ticks"}\']\n'
        )
    toml = (
        f'[[sessions]]\nname = "s"\nkind = "{kind}"\nurl = "{primary}"\n'
        f'fallback_urls = ["{backup}"]\n{specific}'
        "connect_timeout = 1.0\nauth_timeout = 1.0\nheartbeat_interval = 1.0\n"
        "stale_after = 1.5\ndead_after = 3.0\n"
        "backoff = { initial = 0.25, max = 1.0, multiplier = 2.0, jitter = 0.0, "
        "reset_after = 4.0 }\n"
        "circuit = { failures = 3, cooldown = 3.0 }\n"
        "connect_rate = { per_host = 3, window = 5.0 }\n"
    )
    (config,) = sessions_from(toml)
    return config


@dataclass
class WatchedNet(Net):
    """The memory-stream network, noting every connection opened while the session is
    PAUSED (``is_paused()``): attempts and primary probes alike."""

    is_paused: Callable[[], bool] = lambda: False
    opened_while_paused: list[tuple[float, str]] = field(default_factory=list)

    async def open(self, host: str, port: int) -> trio.abc.Stream:
        if self.is_paused():
            self.opened_while_paused.append((trio.current_time(), host))
        return await super().open(host, port)


# -- running a script -----------------------------------------------------------------------


class Harness:
    """The session under test (its current runner), its venues, and the reference model."""

    def __init__(
        self, nursery: trio.Nursery, setup: Setup, logs: list[structlog.typing.EventDict]
    ) -> None:
        self.nursery = nursery
        self.logs = logs
        self.config = session_config(setup.kind)
        pace = {"rate": 0.25, "heartbeat_interval": 2.5} if setup.quiet else {"rate": 2.0}
        self.venues: dict[str, SimulatedVenue] = {"primary": venue(**pace), "backup": venue(**pace)}
        self.net = WatchedNet(nursery, dict(self.venues), is_paused=self._is_paused)
        self.log = MemoryLog()
        self.kit = Kit(self.net, self.log, MACHINE)
        self.runner: SessionRunner | None = None
        self.crash: BaseException | None = None
        self.removed = False
        #: The reference model: was the operator's last word on this session ``pause``?
        self.expect_paused = False

    def _is_paused(self) -> bool:
        return self.runner is not None and self.runner.model.state is State.PAUSED

    async def start(self, runner: SessionRunner) -> None:
        self.runner = runner
        self.removed = False
        await self.nursery.start(self._run, runner)

    async def _run(self, runner: SessionRunner, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            await runner.run(task_status=task_status)
        except Exception as exc:  # noqa: BLE001 - kept for check(), which raises it
            self.crash = exc

    @property
    def current(self) -> SessionRunner:
        assert self.runner is not None
        return self.runner

    async def apply(self, step: Step) -> None:
        if isinstance(step, Wait):
            await trio.sleep(step.seconds)
        elif isinstance(step, Command):
            await self._command(step.kind)
        elif isinstance(step, Fault):
            for name in ("primary", "backup") if step.where == "both" else (step.where,):
                self.venues[name].fault(step.name, seconds=step.seconds, delay=step.delay)
        elif step.up:
            self.net.down.discard("primary")
        else:
            self.net.down.add("primary")

    async def _command(self, kind: Operator) -> None:
        runner = self.current
        if kind == "reload":
            if not self.removed:
                await runner.command(CommandKind.RECONFIGURE, "configuration reloaded")
                await runner.finished.wait()
            else:
                self.expect_paused = False  # a removed session comes back from DISCONNECTED
            await self.start(self.kit.runner(self.config, recovered=view_of(runner)))
            return
        result = await runner.command(CommandKind(kind), f"{kind} by the model test")
        if self.removed:
            assert result == "session is not running", result
        elif kind == "pause":
            self.expect_paused = True
        elif kind in ("resume", "remove"):
            self.expect_paused = False
        if kind == "remove" and not self.removed:
            await runner.finished.wait()
            self.removed = True

    def check(self) -> None:
        """The invariants; raises AssertionError (or the runner's own exception)."""
        if self.crash is not None:
            raise self.crash
        for entry in self.logs:
            if entry["log_level"] in ("error", "critical"):
                raise entry.get("exc") or AssertionError(f"logged: {entry}")
        runner = self.current
        assert runner.finished.is_set() == self.removed, "the runner stopped on its own"
        self.log.verify()
        events = self.log.of(runner.name)
        state = events[-1].dest if events else State.DISCONNECTED.name
        model = runner.model
        assert (model.state.name, model.version) == (state, len(events)), (
            f"runner at {model.state.name} v{model.version}, its events at {state} v{len(events)}"
        )
        shown = runner.shown
        if events:
            assert shown is not None, "no transition shown"
            assert (shown.dest, shown.version) == (state, len(events)), shown
        entered = entry_time(events)
        assert model.since == entered, f"since is {model.since}, entered {state} at {entered}"
        assert (model.state is State.PAUSED) == self.expect_paused, (
            f"{model.state.name}, but the operator's last word was "
            f"{'pause' if self.expect_paused else 'not pause'}"
        )
        assert not self.net.opened_while_paused, (
            f"connections opened while PAUSED: {self.net.opened_while_paused}"
        )


def entry_time(events: Sequence[TransitionRecord]) -> datetime | None:
    """When the session entered its current state: the latest state-changing event."""
    return next((e.at for e in reversed(events) if e.dest != e.source), None)


async def _drive(
    setup: Setup,
    script: Sequence[Step],
    logs: list[structlog.typing.EventDict],
    failures: list[BaseException],
) -> None:
    async with trio.open_nursery() as nursery:
        harness = Harness(nursery, setup, logs)
        await harness.apply(Primary(setup.primary_up))
        await harness.start(harness.kit.runner(harness.config))
        await trio.testing.wait_all_tasks_blocked()
        for number, step in enumerate(script, start=1):
            try:
                wait = step.seconds if isinstance(step, Wait) else 0.0
                with trio.fail_after(wait + COMMAND_TIMEOUT + 1.0):
                    await harness.apply(step)
                    await trio.testing.wait_all_tasks_blocked()
                harness.check()
            except Exception as exc:  # noqa: BLE001 - any failure ends the script: say where
                exc.add_note(f"at step {number} ({step!r}), t={trio.current_time():g} s")
                exc.add_note(_timeline(harness.log.records))
                failures.append(exc)
                break
        nursery.cancel_scope.cancel()


def _timeline(records: Sequence[TransitionRecord]) -> str:
    lines = ["the log (virtual seconds):"]
    for r in records:
        at = (r.at - T0).total_seconds()
        lines.append(f"  {at:7.2f} v{r.version} {r.source} -{r.trigger}-> {r.dest}: {r.reason}")
    return "\n".join(lines)


def run_script(setup: Setup, script: Sequence[Step]) -> None:
    """Run ``script`` against a fresh session; raises the first invariant violation."""
    failures: list[BaseException] = []
    with (
        structlog.testing.capture_logs(processors=[_keep_exception]) as logs,
        mock.patch.object(daemon.session, "PRIMARY_PROBE_INTERVAL", PROBE_INTERVAL),
    ):
        clock = trio.testing.MockClock(autojump_threshold=0)
        trio.run(_drive, setup, script, logs, failures, clock=clock)
    if failures:
        raise failures[0]


def _keep_exception(
    _logger: object, _method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Keep the exception a ``log.exception`` call is about, so that :meth:`Harness.check`
    re-raises it: hypothesis then tells one contained bug from another by its origin."""
    if event.get("exc_info") is True:
        event["exc"] = sys.exc_info()[1]
    return event
