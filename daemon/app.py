"""The daemon: one root nursery owning the writer, the sessions, the servers and signals.

Start-up order: take the database's writer lock (a second daemon refuses, see
:mod:`daemon.dblock`), open and migrate the database, check the append-only triggers, mark
runs that never stopped as crashed, replay the log (recovery), bind the control socket
and the optional listeners (a busy path fails the start before any session runs), start
the writer, serve (status works during start-up), then one task per session; READY=1
goes to systemd once all of that is done. Shutdown (SIGTERM/SIGINT, or ``stop()``):
STOPPING=1, every session persists its shutdown transition, the servers stop, the writer
drains, and the run is marked clean.

Reload (``wirekeep reload`` over the control socket, or SIGHUP) reads and validates the
whole file first and changes nothing if it has errors. Otherwise it diffs the enabled
sessions by name and settings (what :meth:`SessionConfig.fingerprint` hashes): a removed
(or disabled) session gets REMOVE; a changed one is handed over to a new runner with the
new settings (its transition, when it was live, says "configuration changed (hash X)");
an added one starts; an unchanged one is not touched. One ``config_reloads`` row records
it.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import sqlalchemy as sa
import structlog
import trio

from daemon import migrate, notify
from daemon.adapters.base import Adapter
from daemon.config import (
    CREDENTIALS_ENV_VAR,
    Config,
    ConfigError,
    SessionConfig,
    load_config,
    redact_url,
    resolve_secrets,
)
from daemon.consumers import ConsumerHub
from daemon.control import ControlServer, Peer, ReloadOutcome
from daemon.logs import Redactor
from daemon.metrics import CountingSink, Metrics, MetricsServer, Tally
from daemon.replay import SessionView, recover
from daemon.schema import config_reloads
from daemon.session import CommandKind, Publisher, SessionClocks, SessionRunner
from daemon.store import EventStore
from daemon.writer import EventSink, EventWriter
from statemachines.policy import ConnectRateLimiter
from statemachines.session import SessionMachine, State

log = structlog.get_logger("wirekeep.daemon")

AdapterFactory = Callable[[SessionConfig, Mapping[str, str]], Adapter]


def wirekeep_version() -> str:
    try:
        return version("wirekeep")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def wall_clock() -> datetime:
    return datetime.now(UTC)


def real_clocks(seed: int | None = None) -> SessionClocks:
    rng = random.Random(seed)  # noqa: S311 - jitter, not cryptography
    return SessionClocks(wall=wall_clock, wall_ns=time.time_ns, uniform=rng.random)


def _resolve_url(session: SessionConfig, secrets: Mapping[str, str], url: str) -> str:
    return session.resolved_url(url, secrets)


class StoreInconsistent(Exception):
    """The database is missing something the daemon relies on (e.g. its triggers)."""


#: One row per successful reload (migrations/versions/0003_config_reloads.py).
#: How a changed session's runner hands over to one with the new settings: a persisted
#: ``reconnect`` (reason: configuration changed) unless it is paused or disconnected.
HANDOVER = CommandKind.RECONFIGURE


def state_summary(sessions: Mapping[str, SessionRunner]) -> str:
    """One line for STATUS=: "3 sessions: 2 STREAMING, 1 BACKOFF" (durable states)."""
    counts = Counter(r.durable.state.name for r in sessions.values())
    parts = [f"{counts[s.name]} {s.name}" for s in State if counts[s.name]]
    noun = "session" if len(sessions) == 1 else "sessions"
    return f"{len(sessions)} {noun}" + (": " + ", ".join(parts) if parts else "")


def view_of(runner: SessionRunner) -> SessionView:
    """What a stopped runner leaves for its successor (as replay would have found it)."""
    durable = runner.durable
    last = durable.record
    return SessionView(
        session=runner.name,
        state=durable.state.name,
        version=durable.version,
        since=durable.since,
        trigger=last.trigger if last is not None else None,
        reason=last.reason if last is not None else "",
        detail=dict(last.detail) if last is not None else {},
        carry=durable.memory.carried(),
        at=last.at if last is not None else None,
    )


@dataclass
class Daemon:
    """The running daemon's parts; ``run`` owns their lifetime."""

    config: Config
    secrets: Mapping[str, str]
    database_url: str
    adapter_factory: AdapterFactory
    clocks: SessionClocks = field(default_factory=real_clocks)
    publisher: Publisher | None = None
    machine: SessionMachine = field(default_factory=SessionMachine)
    sessions: dict[str, SessionRunner] = field(default_factory=dict)
    limiters: dict[str, ConnectRateLimiter] = field(default_factory=dict)
    started_at: datetime | None = None
    store: EventStore | None = None
    writer: EventWriter | None = None
    run_id: int | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    notifier: notify.Notifier = field(default_factory=notify.Notifier)
    tally: Tally = field(default_factory=Tally)
    control: ControlServer | None = None
    metrics: MetricsServer | None = None
    consumers: ConsumerHub | None = None
    _sink: EventSink | None = None
    _views: dict[str, SessionView] = field(default_factory=dict)
    _reload_lock: trio.Lock = field(default_factory=trio.Lock)
    _nursery: trio.Nursery | None = None
    _stop: trio.Event = field(default_factory=trio.Event)
    #: Connection attempts in progress at once, across sessions (daemon.max_handshakes).
    handshakes: trio.CapacityLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.handshakes = trio.CapacityLimiter(self.config.daemon.max_handshakes)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.started_at = self.clocks.wall()
        store = self.store = EventStore(self.database_url)
        try:
            self._views = await trio.to_thread.run_sync(self._open_store, store)
            writer = self.writer = EventWriter(store)
            sink = self._sink = CountingSink(writer, self.tally)
            bound = await self._bind_servers()
            async with trio.open_nursery() as root:
                await root.start(writer.run)
                async with trio.open_nursery() as servers:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        # Status answers while the sessions start (10,000 take a while);
                        # a reload waits until they all run.
                        async with self._reload_lock:
                            for serve in bound:
                                await servers.start(serve)
                            await self._start_sessions(
                                [s for s in self.config.sessions if s.enabled], sink
                            )
                        # Everything allocated so far lives as long as the daemon: keep it
                        # out of the collector's way.
                        gc.collect()
                        gc.freeze()
                        log.info(
                            "daemon_started",
                            sessions=len(self.sessions),
                            database=redact_url(self.database_url),
                            pid=os.getpid(),
                        )
                        self.notifier.ready(self.status_summary())
                        await servers.start(notify.watchdog, self.notifier, writer.stuck_for)
                        await servers.start(notify.status_loop, self.notifier, self.status_summary)
                        task_status.started()
                        await self._stop.wait()
                        async with self._reload_lock:  # a reload in progress finishes first
                            await self._shutdown_sessions()
                        if self.consumers is not None:  # what is queued, then the reason
                            await self.consumers.stop()
                        nursery.cancel_scope.cancel()
                    servers.cancel_scope.cancel()
                writer.close()
            await trio.to_thread.run_sync(self._close_run, True)
            log.info("daemon_stopped", events_written=writer.stats.events_written)
        finally:
            self.notifier.close()
            if self.control is not None:
                self.control.unlink()
            store.close()

    async def _bind_servers(self) -> list[Callable[..., Any]]:
        """Bind every listener now (before any session starts); serve them later.

        Returns the serve functions, for ``nursery.start``. Optional servers (the
        metrics endpoint, the consumer hub's sockets) belong here, each behind its setting.
        """
        daemon = self.config.daemon
        version = wirekeep_version()
        control = self.control = ControlServer(self, version=version)
        listener = control.bind(daemon.control_socket, daemon.control_group)
        bound: list[Callable[..., Any]] = [functools.partial(control.serve, listener)]
        hub = self.consumers = ConsumerHub.from_config(self.config)
        if self.publisher is None:
            self.publisher = hub
        try:
            bound += await hub.bind(
                daemon.consumer_socket, daemon.control_group, daemon.consumer_websocket_listen
            )
            if daemon.metrics_listen is not None:
                metrics = Metrics(
                    self,
                    self.tally,
                    version=version,
                    control_requests=self._requests,
                    extra=hub.metric_lines,
                )
                server = self.metrics = MetricsServer(metrics)
                listeners = await server.bind(daemon.metrics_listen)
                bound.append(functools.partial(server.serve, listeners))
        except BaseException:
            listener.socket.close()
            hub.unbind()
            raise
        return bound

    def _requests(self) -> Mapping[tuple[str, str], int]:
        return self.control.requests if self.control is not None else {}

    def status_summary(self) -> str:
        if self.stopping:
            return "stopping"
        if self.writer is not None and self.writer.failing_since is not None:
            return f"{state_summary(self.sessions)}; event store failing: {self.writer.last_error}"
        return state_summary(self.sessions)

    def stop(self) -> None:
        if not self._stop.is_set():
            self.notifier.stopping()
        self._stop.set()

    async def handle_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """SIGTERM/SIGINT stop the daemon (a second one kills it); SIGHUP reloads."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                log.info("signal", signal=signal.Signals(signum).name)
                if signum != signal.SIGHUP:
                    self.stop()
                    return
                if self._nursery is None or self.stopping:
                    log.warning("reload_ignored", why="the daemon is not running")
                else:
                    self._nursery.start_soon(self._reload_on_signal)

    async def _reload_on_signal(self) -> None:
        try:
            await self.reload(None)  # the outcome is logged; nobody waits for an answer
        except Exception:  # a bug in a reload must not take the sessions down
            log.exception("reload_failed")

    def _open_store(self, store: EventStore) -> dict[str, SessionView]:
        # First: a second daemon on this database refuses here, before it touches a row.
        store.lock_writer(started_at=self.started_at or self.clocks.wall())
        before, after = migrate.upgrade(store.engine)
        if before != after:
            log.info("database_migrated", before=before, after=after)
        if not store.append_only_triggers_present():
            raise StoreInconsistent(
                "session_events has lost its append-only triggers; run `wirekeep db upgrade` "
                "on a fresh database or restore them before starting"
            )
        host = socket.gethostname()
        crashed = store.mark_crashed_runs(host=host)
        if crashed:
            log.warning("previous_run_crashed", runs=crashed)
        views = recover(store)
        self.run_id = store.start_run(
            started_at=self.clocks.wall(),
            version=wirekeep_version(),
            host=host,
            pid=os.getpid(),
            config_hash=self.config.config_hash,
        )
        return views

    def _close_run(self, clean: bool) -> None:
        if self.store is not None and self.run_id is not None:
            self.store.finish_run(self.run_id, stopped_at=self.clocks.wall(), clean=clean)

    # -- sessions --------------------------------------------------------------------

    def limiter_for(self, session: SessionConfig, url: str) -> ConnectRateLimiter:
        """One connect-rate budget per host, shared by every session to it."""
        host = session.host_key(url)
        limiter = self.limiters.get(host)
        if limiter is None:
            limiter = self.limiters[host] = ConnectRateLimiter(session.connect_rate)
        return limiter

    async def _start_sessions(self, sessions: Sequence[SessionConfig], sink: EventSink) -> None:
        """Start runners side by side, each where the log left it.

        ``nursery.start`` returns after a scheduling round (and, for a session that was
        live when the daemon died, after its ``recover`` COMMIT): one after another,
        10,000 sessions took minutes. The runners are created in configuration order,
        which is the order status lists them in.
        """
        assert self._nursery is not None
        runners = [self._new_runner(s, self._views.get(s.name), sink) for s in sessions]
        async with trio.open_nursery() as starting:
            for runner in runners:
                starting.start_soon(self._nursery.start, runner.run)

    async def _start_session(
        self, session: SessionConfig, view: SessionView | None, sink: EventSink
    ) -> None:
        assert self._nursery is not None
        await self._nursery.start(self._new_runner(session, view, sink).run)

    def _new_runner(
        self, session: SessionConfig, view: SessionView | None, sink: EventSink
    ) -> SessionRunner:
        runner = SessionRunner(
            session,
            machine=self.machine,
            sink=sink,
            adapter=self.adapter_factory(session, self.secrets),
            limiters=functools.partial(self.limiter_for, session),
            clocks=self.clocks,
            resolve_url=functools.partial(_resolve_url, session, self.secrets),
            publisher=self.publisher,
            recovered=view,
            handshakes=self.handshakes,
        )
        self.sessions[session.name] = runner
        if self.consumers is not None:
            self.consumers.add_session(session.name, runner.shown, runner.durable.since)
        return runner

    async def _shutdown_sessions(self) -> None:
        async with trio.open_nursery() as nursery:
            for runner in self.sessions.values():
                nursery.start_soon(runner.command, CommandKind.SHUTDOWN, "daemon shutting down")

    # -- reload ----------------------------------------------------------------------

    async def reload(self, operator: Peer | None) -> ReloadOutcome:
        """Re-read the configuration file and apply it (``operator`` None: SIGHUP)."""
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                return await self._reload(operator)
            finally:
                self.notifier.ready(self.status_summary())

    def _load(
        self, path: str, running: Mapping[str, SessionConfig]
    ) -> tuple[Config, Mapping[str, str], list[str]]:
        """In a worker thread: the new configuration, its secrets, the changed sessions.

        Sessions are compared as values (the frozen settings, templates not secrets: what
        ``SessionConfig.fingerprint`` hashes). Fingerprints cost 180 µs each, 1.8 s for
        10,000 sessions; equality 7 µs.
        """
        config = load_config(path)
        secrets = resolve_secrets(config, self.environ, self.environ.get(CREDENTIALS_ENV_VAR))
        changed = [s.name for s in config.sessions if s.enabled and running.get(s.name, s) != s]
        return config, secrets, changed

    async def _reload(self, operator: Peer | None) -> ReloadOutcome:
        old = self.config
        by = operator.describe() if operator is not None else "SIGHUP"
        running = dict(self.sessions)
        configs = {name: runner.config for name, runner in running.items()}
        try:
            new, secrets, changed = await trio.to_thread.run_sync(self._load, old.path, configs)
        except ConfigError as exc:
            errors = [str(p) for p in exc.problems]
            log.warning("config_reload_refused", path=old.path, by=by, errors=errors)
            return ReloadOutcome(False, old.path, "", old.config_hash, errors=errors)
        if self.stopping:
            return ReloadOutcome(
                False, old.path, new.config_hash, old.config_hash, errors=["shutting down"]
            )
        wanted = {s.name: s for s in new.sessions if s.enabled}
        removed = [n for n in running if n not in wanted]
        added = [n for n in wanted if n not in running]
        outcome = ReloadOutcome(
            True, new.path, new.config_hash, old.config_hash, added, removed, changed,
            unchanged=len(wanted) - len(added) - len(changed),
            notes=_restart_notes(old, new),
        )  # fmt: skip
        detail: dict[str, Any] = {"config_hash": new.config_hash}
        if operator is not None:
            detail.update(uid=operator.uid, user=operator.user)
        self.secrets = secrets  # for the runners started from now on
        self.config = new
        self.handshakes.total_tokens = new.daemon.max_handshakes
        _extend_redaction(new.secret_values(secrets))
        in_file = set(new.session_names)
        async with trio.open_nursery() as nursery:
            for name in removed:
                how = "disabled in" if name in in_file else "removed from"
                reason = f"{how} the configuration (hash {new.config_hash}) by {by}"
                nursery.start_soon(self._retire, running[name], reason, detail)
            for name in changed:
                reason = (
                    f"configuration changed (hash {new.config_hash}) by {by}: "
                    "reconnecting with the new settings"
                )
                nursery.start_soon(self._hand_over, running[name], wanted[name], reason)
        await self._start_sessions([wanted[name] for name in added], self._sink_or_raise())
        try:
            await trio.to_thread.run_sync(self._record_reload, outcome, by, detail)
        except Exception as exc:  # the sessions changed already: say so, do not fail
            log.exception("config_reload_not_recorded")
            outcome.notes.append(f"the config_reloads row could not be written: {exc}")
        log.info(
            "config_reloaded", path=new.path, config_hash=new.config_hash,
            previous_hash=old.config_hash, by=by, added=added, removed=removed, changed=changed,
            unchanged=outcome.unchanged, notes=outcome.notes or None,
        )  # fmt: skip
        return outcome

    def _sink_or_raise(self) -> EventSink:
        assert self._sink is not None, "the daemon is not running"
        return self._sink

    async def _retire(self, runner: SessionRunner, reason: str, detail: Mapping[str, Any]) -> None:
        """REMOVE: persisted from any state; the runner stops."""
        await runner.command(CommandKind.REMOVE, reason, **detail)
        await runner.finished.wait()
        self._views[runner.name] = view_of(runner)  # for a later re-add
        if self.sessions.get(runner.name) is runner:
            del self.sessions[runner.name]
        if self.consumers is not None and runner.name not in self.sessions:
            self.consumers.remove_session(runner.name)

    async def _hand_over(self, runner: SessionRunner, config: SessionConfig, reason: str) -> None:
        """Stop ``runner`` and start one with ``config`` where it left off."""
        await runner.command(HANDOVER, reason)
        await runner.finished.wait()
        await self._start_session(config, view_of(runner), self._sink_or_raise())

    def _record_reload(self, outcome: ReloadOutcome, by: str, detail: Mapping[str, Any]) -> None:
        assert self.store is not None
        row = {
            "run_id": self.run_id,
            "at": self.clocks.wall(),
            "config_hash": outcome.config_hash,
            "previous_hash": outcome.previous_hash,
            "reason": f"configuration reloaded by {by}",
            "detail": {
                **detail,
                "path": outcome.path,
                "added": outcome.added,
                "removed": outcome.removed,
                "changed": outcome.changed,
                "unchanged": outcome.unchanged,
                "notes": outcome.notes,
            },
        }
        with self.store.writes.begin() as conn:
            conn.execute(sa.insert(config_reloads).values(**row))


_APPLIED_ON_RELOAD = frozenset({"admin_group", "max_handshakes"})


def _restart_notes(old: Config, new: Config) -> list[str]:
    """[daemon] settings a reload cannot apply (admin_group is read on every request,
    max_handshakes applies at once)."""
    notes = []
    for f in dataclasses.fields(new.daemon):
        if f.name in _APPLIED_ON_RELOAD:
            continue
        if getattr(old.daemon, f.name) != getattr(new.daemon, f.name):
            notes.append(f"daemon.{f.name} changed: takes effect when the daemon restarts")
    return notes


def _extend_redaction(values: tuple[str, ...]) -> None:
    """Teach the log redactor the secrets of sessions a reload added."""
    for processor in structlog.get_config().get("processors", ()):
        if isinstance(processor, Redactor):
            merged = set(processor.secrets) | {v for v in values if v}
            processor.secrets = sorted(merged, key=len, reverse=True)
