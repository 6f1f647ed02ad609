"""sd_notify(3) in a few lines: datagrams to ``$NOTIFY_SOCKET``, and the watchdog.

systemd (``Type=notify``) reads newline-separated ``KEY=VALUE`` assignments from the
datagram socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). What the daemon sends, and when:

- ``READY=1`` once the database is open, the sockets are bound and the sessions started;
  again after a reload has finished (with or without errors).
- ``STATUS=...`` a one-line summary, resent whenever it changes (see :func:`status_loop`).
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` from a task on the Trio loop (a
  blocked loop stops the pings by itself), withheld while the event writer is stuck
  in a COMMIT, so systemd restarts a daemon that can no longer record anything.
- ``RELOADING=1`` with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, as systemd 253+ requires
  for ``Type=notify-reload``, and harmless on 252) when a reload starts.
- ``STOPPING=1`` when shutdown begins.

Without ``$NOTIFY_SOCKET`` every call is a no-op. A failed send is logged once and
never raises: notification must never take the daemon down.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog
import trio

log = structlog.get_logger("wirekeep.notify")

#: Withhold WATCHDOG=1 once a single COMMIT has run this long (seconds).
WRITER_STUCK_AFTER = 30.0
#: How often the STATUS= line is recomputed (sent only when it changed).
STATUS_INTERVAL = 1.0


class Notifier:
    """Sends sd_notify datagrams; inert when ``$NOTIFY_SOCKET`` is unset."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]  # the abstract namespace
        elif path.startswith("/"):
            self.address = path
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._failed = False
        self.last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when it went out."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:  # once: a vanished socket must not flood the log
                log.warning("sd_notify_failed", socket=self.address, error=str(exc))
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """Send ``STATUS=`` if it differs from the last one sent."""
        if status != self.last_status:
            self.last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self) -> None:
        self.last_status = "stopping"
        self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, or None when no watchdog is asked for.

    ``$WATCHDOG_PID``, when set, must be our pid (the variable may have been inherited).
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


async def watchdog(
    notifier: Notifier,
    stuck_for: Callable[[], float],
    *,
    stuck_after: float = WRITER_STUCK_AFTER,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping every half of WATCHDOG_USEC while the event writer is not stuck."""
    interval = notifier.watchdog_interval
    task_status.started()
    if interval is None:
        return
    withheld = False
    while True:
        stuck = stuck_for()
        if stuck < stuck_after:
            notifier.send("WATCHDOG=1")
            if withheld:
                log.info("watchdog_resumed")
                withheld = False
        elif not withheld:
            log.error("watchdog_withheld", writer_stuck_s=round(stuck, 1), stuck_after=stuck_after)
            withheld = True
        await trio.sleep(interval)


async def status_loop(
    notifier: Notifier,
    summary: Callable[[], str],
    *,
    interval: float = STATUS_INTERVAL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``STATUS=`` current: recompute the summary now and then, send it when it changed.

    Polling keeps the cost independent of how often sessions change (10,000 sessions
    changing state would otherwise mean 10,000 datagrams).
    """
    task_status.started()
    if not notifier.enabled:
        return
    while True:
        await trio.sleep(interval)
        notifier.status(summary())
