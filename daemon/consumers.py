"""The consumer hub: one upstream session shared with any number of local consumers.

Everything that decides what a consumer receives lives here; the frames themselves are
``protocol/consumer.proto`` (length-prefixed protobuf on the Unix socket, one JSON
object per message on the WebSocket endpoint, :mod:`protocol.consumer_codec`).

The data path
-------------
:meth:`ConsumerHub.data` runs on the session task for every read that brought data. It
never awaits and costs O(subscribers) with a tiny constant: it numbers the batch as one
range of the session's sequence (``seq`` from 1, per session, for the life of the
daemon), wraps it in one shared :class:`_Chunk`, appends that to each subscriber's queue
and wakes the subscriber's writer task. A writer takes everything queued at once, encodes
it (a chunk is encoded once, by whichever writer gets to it first, and the bytes are
shared by all), and sends it with one write: messages that became ready together leave
together. A slow consumer therefore costs the session nothing but the append.

Queues, drops, gaps
-------------------
Each consumer's queue holds at most ``queue_limit`` messages (``consumer_queue``),
counted in upstream messages; the write in progress is not counted. When an append
overflows it, the *oldest* queued messages are dropped (a chunk may be cut) and counted,
and a gap marker takes their place in the stream: the consumer gets
``Gap(first_missing, last_missing, cause="consumer too slow")`` exactly where the
missing messages would have been, before anything that came after them. State notices
and gap markers are never dropped.

When a session's stream stops (a transition leaves STREAMING/STALE) and later comes
back (a transition into STREAMING from elsewhere than STALE), every subscriber gets,
right after the STREAMING notice, ``Gap(cause="upstream reconnect", interrupted_s=...)``:
wirekeep numbers only what it receives, so no sequence number is missing (``missing=0``,
``first_missing`` is the next ``seq``), but the venue's messages of that interval never
arrived. A STALE spell that ends in data (the link stayed up) is not a gap.

"Behind" and the lag limit
--------------------------
A consumer is *behind* from the earlier of (a) the moment its queue first overflowed
since it last caught up and (b) the moment the oldest message not yet written to it was
queued. It catches up when a write completes with nothing dropped for it meanwhile and,
on the Unix socket, it has read what was written before that write (the kernel's send
queue holds little more than that write: a consumer draining a full socket buffer in
bursts is still behind). A consumer behind for longer than ``max_lag``
(``consumer_max_lag``) is disconnected: wirekeep finishes the frame it was writing (if
it can within ``final_grace``), sends ``Error("too slow: ...")`` and closes. Every
``Error`` is followed by the close.

Endpoints
---------
- Unix socket: created 0660 from the start (umask around ``bind``), handed to the
  configured group before ``listen`` (so nobody connects while the group is still the
  daemon's), a stale socket file from a crashed run is replaced, a live one is refused.
- WebSocket (optional): trio-websocket on the configured address (loopback by default);
  a handshake carrying a non-loopback ``Origin`` is refused, so a web page in a browser
  cannot read the stream. One WebSocket message per frame: the JSON form does not
  coalesce, its cost is in wsproto (use the Unix socket for rate).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import fcntl
import functools
import grp
import json
import math
import os
import socket as stdsocket
import stat
import struct
import termios
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import structlog
import trio
import trio_websocket

from daemon.adapters.base import Batch
from daemon.peer_errors import report_peer_error
from protocol.consumer_codec import (
    CAUSE_CONSUMER_TOO_SLOW,
    CAUSE_UPSTREAM_RECONNECT,
    REQUEST_MAX,
    ConsumerRequestDecoder,
    DataEncoder,
    data_json,
    decode_request_json,
    encode,
    encode_json,
    frame_end,
)
from protocol.consumer_pb2 import (
    ConsumerFrame,
    ConsumerRequest,
    Error,
    Gap,
    StateNotice,
    Subscribed,
)
from protocol.errors import RemoteProtocolError
from statemachines.session import TransitionRecord, begins_stay

__all__ = [
    "DEFAULT_FINAL_GRACE",
    "METRICS",
    "SOCKET_MODE",
    "Consumer",
    "ConsumerHub",
    "Disconnect",
    "HubStats",
    "bind_unix_listener",
    "bind_websocket",
]

log = structlog.get_logger("wirekeep.consumers")

#: The consumer socket's mode: owner and group read/write, nobody else.
SOCKET_MODE = 0o660
#: Seconds a consumer that is being disconnected gets to take its Error frame.
DEFAULT_FINAL_GRACE = 1.0
#: Seconds a connection to the WebSocket endpoint has to complete its HTTP upgrade.
WEBSOCKET_HANDSHAKE_TIMEOUT = 10.0
#: States in which a session's stream is flowing (or merely quiet, link up).
_STREAMING = frozenset({"STREAMING", "STALE"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_READ_SIZE = 65536
_SEND_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class Disconnect(enum.Enum):
    """Why a consumer went away (the ``reason`` label of the disconnect counter)."""

    CLOSED = "closed"  # the consumer closed the connection, or it broke
    TOO_SLOW = "too_slow"  # behind for longer than max_lag
    PROTOCOL_ERROR = "protocol_error"  # garbage, or a request that is not one
    UNKNOWN_SESSION = "unknown_session"  # subscribed to a session the daemon does not have
    STOPPING = "stopping"  # the daemon is shutting down
    INTERNAL_ERROR = "internal_error"  # its connection raised: a bug, here or in a library


# -- queue items -----------------------------------------------------------------------
#
# A consumer's queue holds three kinds of item, each able to render itself in both wire
# forms: shared data chunks (one per session read), shared frames (state notices,
# reconnect gaps, computed once for every subscriber) and, per consumer, frames of its
# own (Subscribed, the gap markers that replace dropped messages).

_DATA, _NOTICE, _GAP, _OTHER = range(4)


class _Chunk:
    """One read of one session: ``count`` messages numbered from ``first_seq``."""

    __slots__ = (
        "_json", "_pb", "count", "enqueued_at", "feed", "first_seq", "messages", "ns", "text",
    )  # fmt: skip

    kind = _DATA

    def __init__(
        self,
        feed: _Feed,
        first_seq: int,
        batch: Batch,
        ns: int,
        enqueued_at: float,
    ) -> None:
        self.feed = feed
        self.first_seq = first_seq
        self.messages = batch.messages
        self.text = batch.text
        self.count = len(batch.messages)
        self.ns = ns
        self.enqueued_at = enqueued_at
        self._pb: bytes | None = None
        self._json: list[str] | None = None

    def pb(self) -> bytes:
        if self._pb is None:
            encoder = self.feed.encoders[self.text]
            self._pb = encoder.encode_run(self.first_seq, self.ns, self.messages)
        return self._pb

    def pb_from(self, skip: int) -> bytes:
        """The chunk without its first ``skip`` messages (dropped for one consumer)."""
        encoder = self.feed.encoders[self.text]
        return encoder.encode_run(self.first_seq + skip, self.ns, self.messages[skip:])

    def json(self) -> list[str]:
        if self._json is None:
            self._json = self._json_from(0)
        return self._json

    def json_from(self, skip: int) -> list[str]:
        return self.json()[skip:] if self._json is not None else self._json_from(skip)

    def _json_from(self, skip: int) -> list[str]:
        name, ns, text, seq = self.feed.name, self.ns, self.text, self.first_seq + skip
        out = []
        for offset, payload in enumerate(self.messages[skip:]):
            obj = data_json(name, seq + offset, ns, payload, text=text)
            out.append(_dumps(obj))
        return out


class _Frame:
    """A frame other than Data, rendered at most once per wire form."""

    __slots__ = ("_json", "_pb", "enqueued_at", "frame", "kind", "session")

    count = 0

    def __init__(
        self, frame: ConsumerFrame, kind: int, session: str | None, enqueued_at: float
    ) -> None:
        self.frame = frame
        self.kind = kind
        self.session = session
        self.enqueued_at = enqueued_at
        self._pb: bytes | None = None
        self._json: str | None = None

    def pb(self) -> bytes:
        if self._pb is None:
            self._pb = encode(self.frame)
        return self._pb

    def json(self) -> str:
        if self._json is None:
            self._json = encode_json(self.frame)
        return self._json


class _GapMark:
    """Messages dropped for one consumer: grows while the drops stay contiguous."""

    __slots__ = ("enqueued_at", "first", "first_ns", "last", "last_ns", "session")

    kind = _GAP
    count = 0

    def __init__(self, session: str, first: int, last: int, ns: int, enqueued_at: float) -> None:
        self.session = session
        self.first = first
        self.last = last
        self.first_ns = ns
        self.last_ns = ns
        self.enqueued_at = enqueued_at

    def gap(self) -> Gap:
        return Gap(
            session=self.session,
            first_missing=self.first,
            last_missing=self.last,
            missing=self.last - self.first + 1,
            interrupted_s=round((self.last_ns - self.first_ns) / 1e9, 6),
            cause=CAUSE_CONSUMER_TOO_SLOW,
        )

    def pb(self) -> bytes:
        return encode(ConsumerFrame(gap=self.gap()))

    def json(self) -> str:
        return encode_json(ConsumerFrame(gap=self.gap()))


_Item = _Chunk | _Frame | _GapMark


def _dumps(obj: dict[str, object]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# -- sessions and consumers ------------------------------------------------------------


class _Feed:
    """One session as the hub sees it: its sequence, its subscribers, its last notice."""

    __slots__ = (
        "dropped", "encoders", "interrupted_at", "last_notice", "name", "next_seq", "since",
        "subscribers",
    )  # fmt: skip

    def __init__(self, name: str) -> None:
        self.name = name
        self.next_seq = 1
        self.subscribers: list[Consumer] = []
        self.last_notice: _Frame | None = None  # the state now, for a new subscriber
        self.since: datetime | None = None  # when the session entered that state
        self.interrupted_at: datetime | None = None  # when the stream last stopped
        self.dropped = 0
        self.encoders = {
            True: DataEncoder(name, text=True),
            False: DataEncoder(name, text=False),
        }


@dataclass(frozen=True, slots=True)
class _Final:
    """How a consumer's connection ends: the Error to send (None: just close) and why."""

    kind: Disconnect
    reason: str
    error: str | None
    flush: bool = False  # deliver what is queued before the Error


class Consumer:
    """One connected consumer: subscriptions, the bounded queue, counters, the lag clock."""

    def __init__(self, hub: ConsumerHub, number: int, endpoint: str, peer: str) -> None:
        self.hub = hub
        self.number = number
        self.endpoint = endpoint  # "unix" or "websocket"
        self.peer = peer
        self.limit = hub.queue_limit
        self.sessions: dict[str, None] = {}  # ordered set
        self.all = False
        self.connected_at = trio.current_time()
        # The queue: items in order, ``queued`` data messages in it, ``skip`` messages
        # of the first item already dropped.
        self.queue: collections.deque[_Item] = collections.deque()
        self.queued = 0
        self.skip = 0
        # Notices and gap markers displaced from the head of the queue by drops, in
        # order; never dropped. ``open_gaps``: per session, the marker in ``front``
        # that the next contiguous drop of that session extends.
        self.front: list[_Item] = []
        self.open_gaps: dict[str, _GapMark] = {}
        self.behind_since: float | None = None
        self.delivered = 0
        self.dropped = 0
        self.gaps = 0
        self.final: _Final | None = None
        self.send_scope: trio.CancelScope | None = None
        self.done = trio.Event()
        # The writer task while it waits for something to write (see wait()).
        self._sleeper: trio.lowlevel.Task | None = None

    def __repr__(self) -> str:
        return f"<consumer {self.number} ({self.endpoint}, {self.peer})>"

    # -- the hub's side: never awaits --------------------------------------------------

    def push(self, item: _Item) -> None:
        self.queue.append(item)
        if item.count:
            self.queued += item.count
            if self.queued > self.limit:
                self._overflow()
        if self._sleeper is not None:
            self._wake()

    def _overflow(self) -> None:
        """Drop the oldest messages until the queue holds ``limit``; mark the gaps."""
        excess = self.queued - self.limit
        queue = self.queue
        now = trio.current_time()
        while excess > 0:
            item = queue[0]
            if isinstance(item, _Chunk):
                feed = item.feed
                available = item.count - self.skip
                n = available if available <= excess else excess
                first = item.first_seq + self.skip
                mark = self.open_gaps.get(feed.name)
                if mark is None:
                    mark = _GapMark(feed.name, first, first + n - 1, item.ns, item.enqueued_at)
                    self.front.append(mark)
                    self.open_gaps[feed.name] = mark
                else:
                    mark.last = first + n - 1
                    mark.last_ns = item.ns
                feed.dropped += n
                self.dropped += n
                self.hub.stats.messages_dropped += n
                self.queued -= n
                excess -= n
                if n == available:
                    queue.popleft()
                    self.skip = 0
                else:
                    self.skip += n
            else:
                queue.popleft()
                self.front.append(item)
                if item.session is not None:
                    self.open_gaps.pop(item.session, None)
        if self.behind_since is None:
            self.behind_since = now
            log.warning(
                "consumer_behind",
                consumer=self.number,
                peer=self.peer,
                queue=self.limit,
                note="dropping the oldest messages for this consumer",
            )

    def fail(
        self, kind: Disconnect, reason: str, *, error: bool = True, flush: bool = False
    ) -> None:
        """End this consumer: (flush what is queued,) send an Error (unless not), close."""
        if self.final is not None:
            return
        self.final = _Final(kind, reason, reason if error else None, flush)
        self.hub.detach(self)  # nothing more is queued for it
        if not flush:
            self.queue.clear()
            self.front.clear()
            self.queued = self.skip = 0
            if self.send_scope is not None:
                self.send_scope.cancel()
        if self._sleeper is not None:
            self._wake()

    # -- the writer's side ---------------------------------------------------------------

    def has_items(self) -> bool:
        return bool(self.queue or self.front)

    async def wait(self) -> None:
        """Until something is queued (or the consumer is ending).

        Parks the task directly (what a trio.Event does inside, without building one per
        wait): this is once per write, for every consumer.
        """
        if self.has_items() or self.final is not None:
            return
        self._sleeper = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._sleeper = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _wake(self) -> None:
        task, self._sleeper = self._sleeper, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def take(self) -> tuple[list[_Item], collections.deque[_Item], int]:
        front, queue, skip = self.front, self.queue, self.skip
        self.front = []
        self.queue = collections.deque()
        self.queued = self.skip = 0
        self.open_gaps.clear()
        return front, queue, skip

    def oldest(self) -> float | None:
        if self.front:
            return self.front[0].enqueued_at
        if self.queue:
            return self.queue[0].enqueued_at
        return None

    def behind_for(self, now: float) -> float:
        starts = [t for t in (self.behind_since, self.oldest()) if t is not None]
        return max(0.0, now - min(starts)) if starts else 0.0

    def status(self, now: float) -> dict[str, object]:
        return {
            "id": self.number,
            "endpoint": self.endpoint,
            "peer": self.peer,
            "sessions": list(self.sessions),
            "all": self.all,
            "connected_s": round(now - self.connected_at, 3),
            "queued": self.queued,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "gaps": self.gaps,
            "behind_s": round(self.behind_for(now), 3),
        }


@dataclass
class HubStats:
    """Counters since the daemon started (``consumers_connected`` is a gauge)."""

    consumers_connected: int = 0
    consumers_accepted: int = 0
    messages_delivered: int = 0
    messages_dropped: int = 0
    gaps_sent: dict[str, int] = field(
        default_factory=lambda: {CAUSE_CONSUMER_TOO_SLOW: 0, CAUSE_UPSTREAM_RECONNECT: 0}
    )
    disconnects: dict[str, int] = field(default_factory=lambda: {k.value: 0 for k in Disconnect})


# -- the hub -----------------------------------------------------------------------------


class ConsumerHub:
    """The daemon's Publisher: fans each session's stream out to its subscribers."""

    def __init__(
        self,
        sessions: Iterable[str] = (),
        *,
        queue_limit: int = 10_000,
        max_lag: float = 30.0,
        final_grace: float = DEFAULT_FINAL_GRACE,
    ) -> None:
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be at least 1, not {queue_limit}")
        if not max_lag > 0:
            raise ValueError(f"max_lag must be positive, not {max_lag}")
        self.queue_limit = queue_limit
        self.max_lag = max_lag
        self.final_grace = final_grace
        self.handshake_timeout = WEBSOCKET_HANDSHAKE_TIMEOUT
        self.stats = HubStats()
        self._feeds: dict[str, _Feed] = {}
        self._consumers: dict[int, Consumer] = {}
        self._everything: list[Consumer] = []  # subscribed with ``all``
        self._retired: dict[str, int] = {}  # removed sessions' next seq, for a re-add
        self._unserved: list[tuple[trio.SocketListener, str | None]] = []
        self._numbers = 0
        for name in sessions:
            self.add_session(name)

    @classmethod
    def from_config(cls, config: Any) -> ConsumerHub:
        """From a :class:`daemon.config.Config`: its enabled sessions, queue and lag limit."""
        return cls(
            (s.name for s in config.sessions if s.enabled),
            queue_limit=config.daemon.consumer_queue,
            max_lag=config.daemon.consumer_max_lag,
        )

    # -- sessions ------------------------------------------------------------------------

    @property
    def sessions(self) -> list[str]:
        return list(self._feeds)

    @property
    def consumers(self) -> list[Consumer]:
        return list(self._consumers.values())

    def add_session(
        self, name: str, last: TransitionRecord | None = None, since: datetime | None = None
    ) -> None:
        """A session consumers may subscribe to; ``last``: its last event (e.g. recovered),
        ``since``: when it entered its state (default: ``last.at``)."""
        feed = self._feeds.get(name)
        if feed is None:
            feed = self._feeds[name] = _Feed(name)
            feed.next_seq = self._retired.pop(name, 1)  # numbering never restarts
            added = True
        else:
            added = False
        if last is not None and feed.last_notice is None:
            feed.since = since or last.at
            feed.last_notice = _Frame(_notice(last, feed.since), _NOTICE, name, trio.current_time())
        if added:
            for consumer in self._everything:
                self._attach(consumer, [name])

    def remove_session(self, name: str) -> None:
        """Removed from the configuration: its subscribers are told the new set."""
        feed = self._feeds.pop(name, None)
        if feed is None:
            return
        self._retired[name] = feed.next_seq
        for consumer in feed.subscribers:
            consumer.sessions.pop(name, None)
            consumer.push(self._subscribed(consumer))

    # -- Publisher: called by the session tasks ------------------------------------------

    def data(self, session: str, batch: Batch, received_at_ns: int) -> None:
        feed = self._feeds.get(session)
        if feed is None:
            return
        messages = batch.messages
        first = feed.next_seq
        feed.next_seq = first + len(messages)
        subscribers = feed.subscribers
        if not subscribers:
            return
        chunk = _Chunk(feed, first, batch, received_at_ns, trio.current_time())
        try:  # free unless it raises: a fault in the hub must not take a session down
            for consumer in subscribers:
                consumer.push(chunk)
        except Exception:  # noqa: BLE001 - a bug: logged; the consumers pay, not the session
            self._contain(subscribers)

    def transition(self, record: TransitionRecord) -> None:
        feed = self._feeds.get(record.session)
        if feed is None:
            self.add_session(record.session)
            feed = self._feeds[record.session]
        now = trio.current_time()
        if feed.since is None or begins_stay(record.trigger, record.source, record.dest):
            feed.since = record.at
        try:
            notice = _Frame(_notice(record), _NOTICE, feed.name, now)
            # A new subscriber is told the state now, as of when it was entered.
            feed.last_notice = (
                notice
                if feed.since == record.at
                else _Frame(_notice(record, feed.since), _NOTICE, feed.name, now)
            )
            for consumer in feed.subscribers:
                consumer.push(notice)
        except Exception:  # noqa: BLE001 - a bug: logged; see data()
            self._contain(feed.subscribers)
        if record.source in _STREAMING and record.dest not in _STREAMING:
            if feed.interrupted_at is None:
                feed.interrupted_at = record.at
        elif record.dest == "STREAMING" and feed.interrupted_at is not None:
            interrupted = (record.at - feed.interrupted_at).total_seconds()
            feed.interrupted_at = None
            self._reconnect_gap(feed, interrupted)

    def _contain(self, consumers: list[Consumer]) -> None:
        """A failure while queueing for ``consumers``: log it, and let them start over."""
        log.exception("consumer_hub_failed", consumers=len(consumers))
        for consumer in list(consumers):
            consumer.fail(Disconnect.INTERNAL_ERROR, "internal error in wirekeep; reconnect")

    def _reconnect_gap(self, feed: _Feed, interrupted_s: float) -> None:
        gap = Gap(
            session=feed.name,
            first_missing=feed.next_seq,
            last_missing=feed.next_seq - 1,
            missing=0,
            interrupted_s=round(interrupted_s, 6),
            cause=CAUSE_UPSTREAM_RECONNECT,
        )
        item = _Frame(ConsumerFrame(gap=gap), _GAP, feed.name, trio.current_time())
        for consumer in feed.subscribers:
            consumer.push(item)
        log.info(
            "consumer_gap",
            session=feed.name,
            cause=CAUSE_UPSTREAM_RECONNECT,
            interrupted_s=round(interrupted_s, 3),
            consumers=len(feed.subscribers),
        )

    # -- consumers -----------------------------------------------------------------------

    def connect(self, endpoint: str, peer: str) -> Consumer:
        self._numbers += 1
        consumer = Consumer(self, self._numbers, endpoint, peer)
        self._consumers[consumer.number] = consumer
        self.stats.consumers_accepted += 1
        self.stats.consumers_connected += 1
        log.info("consumer_connected", consumer=consumer.number, endpoint=endpoint, peer=peer)
        return consumer

    def detach(self, consumer: Consumer) -> None:
        """Queue nothing more for ``consumer``."""
        for name in consumer.sessions:
            feed = self._feeds.get(name)
            if feed is not None and consumer in feed.subscribers:
                feed.subscribers.remove(consumer)
        if consumer in self._everything:
            self._everything.remove(consumer)

    def disconnect(self, consumer: Consumer) -> None:
        if self._consumers.pop(consumer.number, None) is None:
            return
        self.detach(consumer)
        final = consumer.final or _Final(Disconnect.CLOSED, "closed", None)
        self.stats.consumers_connected -= 1
        self.stats.disconnects[final.kind.value] += 1
        consumer.done.set()
        log.info(
            "consumer_disconnected",
            consumer=consumer.number,
            peer=consumer.peer,
            why=final.kind.value,
            reason=final.reason,
            delivered=consumer.delivered,
            dropped=consumer.dropped,
        )

    def request(self, consumer: Consumer, request: ConsumerRequest) -> None:
        """Act on one request; a request the hub cannot satisfy fails the consumer."""
        if request.WhichOneof("request") != "subscribe":  # pragma: no cover - decoder checks
            consumer.fail(Disconnect.PROTOCOL_ERROR, "request asks for nothing")
            return
        sub = request.subscribe
        names = list(dict.fromkeys(sub.sessions))
        if not names and not sub.all:
            consumer.fail(
                Disconnect.PROTOCOL_ERROR,
                "subscribe names no session: give session names, or all",
            )
            return
        unknown = [name for name in names if name not in self._feeds]
        if unknown:
            known = ", ".join(self._feeds) or "none"
            missing = ", ".join(repr(_clip(name)) for name in unknown[:5])
            consumer.fail(
                Disconnect.UNKNOWN_SESSION,
                f"unknown session{'s' if len(unknown) > 1 else ''} {missing}; "
                f"this daemon has: {known}",
            )
            return
        if sub.all:
            names = list(self._feeds)
            if not consumer.all:
                consumer.all = True
                self._everything.append(consumer)
        self._attach(consumer, names, always=True)

    def _attach(self, consumer: Consumer, names: list[str], *, always: bool = False) -> None:
        """Subscribe; reply Subscribed, then each new session's current state."""
        new = [name for name in names if name not in consumer.sessions]
        if not new and not always:
            return
        for name in new:
            consumer.sessions[name] = None
        consumer.push(self._subscribed(consumer))
        for name in new:
            feed = self._feeds[name]
            if feed.last_notice is not None:
                consumer.push(feed.last_notice)
            feed.subscribers.append(consumer)

    def _subscribed(self, consumer: Consumer) -> _Frame:
        frame = ConsumerFrame(subscribed=Subscribed(sessions=list(consumer.sessions)))
        return _Frame(frame, _OTHER, None, trio.current_time())

    async def stop(self, reason: str = "daemon stopping") -> None:
        """Tell every consumer (after what is queued for it) and wait for them to go.

        Waits at most ``final_grace`` seconds; call before cancelling the servers.
        """
        consumers = list(self._consumers.values())
        for consumer in consumers:
            consumer.fail(Disconnect.STOPPING, reason, flush=True)
        with trio.move_on_after(self.final_grace):
            for consumer in consumers:
                await consumer.done.wait()

    # -- status and metrics --------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """For ``wirekeep status --json`` (key ``consumers``)."""
        now = trio.current_time()
        stats = self.stats
        return {
            "connected": stats.consumers_connected,
            "accepted": stats.consumers_accepted,
            "messages_delivered": stats.messages_delivered,
            "messages_dropped": stats.messages_dropped,
            "gaps_sent": dict(stats.gaps_sent),
            "disconnects": dict(stats.disconnects),
            "queue_limit": self.queue_limit,
            "max_lag_s": self.max_lag,
            "sessions": {
                name: {
                    "subscribers": len(feed.subscribers),
                    "last_seq": feed.next_seq - 1,
                    "dropped": feed.dropped,
                }
                for name, feed in self._feeds.items()
            },
            "consumers": [c.status(now) for c in self._consumers.values()],
        }

    def metric_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """(name, labels, value) for the /metrics endpoint; see :data:`METRICS`."""
        stats = self.stats
        out: list[tuple[str, dict[str, str], float]] = [
            ("wirekeep_consumers_connected", {}, stats.consumers_connected),
            ("wirekeep_consumers_accepted_total", {}, stats.consumers_accepted),
            ("wirekeep_consumer_messages_delivered_total", {}, stats.messages_delivered),
        ]
        out += [
            ("wirekeep_consumer_messages_dropped_total", {"session": name}, feed.dropped)
            for name, feed in self._feeds.items()
        ]
        out += [
            ("wirekeep_consumer_gaps_total", {"cause": cause}, n)
            for cause, n in stats.gaps_sent.items()
        ]
        out += [
            ("wirekeep_consumer_disconnects_total", {"reason": reason}, n)
            for reason, n in stats.disconnects.items()
        ]
        out += [
            ("wirekeep_consumer_subscribers", {"session": name}, len(feed.subscribers))
            for name, feed in self._feeds.items()
        ]
        return out

    def metric_lines(self) -> list[str]:
        """The samples in Prometheus text form, with HELP and TYPE (for /metrics)."""
        out: list[str] = []
        family = None
        for name, labels, value in self.metric_samples():
            if name != family:
                family = name
                kind = "counter" if name.endswith("_total") else "gauge"
                out.append(f"# HELP {name} {METRICS[name]}")
                out.append(f"# TYPE {name} {kind}")
            shown = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            number = str(int(value)) if float(value).is_integer() else repr(float(value))
            out.append(f"{name}{{{shown}}} {number}" if shown else f"{name} {number}")
        return out

    # -- endpoints -----------------------------------------------------------------------

    async def bind(
        self, path: str, group: str | None = None, websocket: tuple[str, int] | None = None
    ) -> list[Callable[..., Awaitable[None]]]:
        """Bind the consumer socket (and the WebSocket endpoint): serve them later.

        Returns the serve functions, for ``nursery.start``. What is bound but never
        served is closed (and the socket file removed) by :meth:`unbind`.
        """
        listener = bind_unix_listener(path, group=group)
        self._unserved.append((listener, path))
        serve: list[Callable[..., Awaitable[None]]] = [
            functools.partial(self.serve_listener, listener, path)
        ]
        if websocket is not None:
            try:
                listeners = await bind_websocket(*websocket)
            except BaseException:
                self.unbind()
                raise
            self._unserved += [(ws, None) for ws in listeners]
            serve.append(functools.partial(self.serve_websocket_listeners, listeners))
        return serve

    def unbind(self) -> None:
        """Close what :meth:`bind` bound and nothing has served (start-up failed)."""
        for listener, path in self._unserved:
            if path is not None:
                _unlink_socket(path)
            listener.socket.close()
        self._unserved.clear()

    # -- endpoints: serving ------------------------------------------------------------------------

    async def serve_unix(
        self,
        path: str,
        *,
        group: str | None = None,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind the consumer socket and serve it until cancelled (see :meth:`serve_listener`)."""
        listener = bind_unix_listener(path, group=group)
        await self.serve_listener(listener, path, task_status=task_status)

    async def serve_listener(
        self,
        listener: trio.SocketListener,
        path: str | None = None,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve consumers on a bound listener until cancelled; then ``path`` is removed.

        For a daemon that binds every socket before it starts anything
        (:func:`bind_unix_listener`), and serves them later.
        """
        self._served(listener)
        try:
            async with trio.open_nursery() as nursery:
                log.info("consumer_socket_listening", path=path)
                task_status.started(path or "")
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self.serve_connection, stream)
        finally:
            if path is not None:
                _unlink_socket(path)
            listener.socket.close()

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """Serve one consumer on a connected stream socket (Unix, or a socketpair)."""
        await self._serve_peer("unix", stream, lambda: _just(_UnixPeer(self, stream)))

    async def _serve_peer(
        self,
        endpoint: str,
        stream: trio.SocketStream,
        open_peer: Callable[[], contextlib.AbstractAsyncContextManager[_Peer | None]],
    ) -> None:
        """Where every consumer connection runs, whatever the endpoint: its guard.

        ``open_peer`` sets the connection up (None: it ended during the set-up, e.g. a
        refused WebSocket handshake) and tears it down. Whatever this connection raises,
        there or while it runs, ends this connection only (issue 9: a library error in
        one peer's reader task once ended the WebSocket endpoint and the daemon): it is
        logged with its reason, the consumer counted as ``internal_error``, the socket
        closed. A consumer is disconnected here, however its connection ended.
        """
        consumer: Consumer | None = None
        try:
            async with open_peer() as peer:
                if peer is not None:
                    consumer = peer.consumer
                    await peer.run()
        except* Exception as failure:  # noqa: BLE001 - the guard; cancellation goes on
            reason = report_peer_error(
                log, "consumer_peer_error", failure, endpoint=endpoint,
                consumer=consumer.number if consumer is not None else None,
            )  # fmt: skip
            if consumer is not None:
                consumer.fail(Disconnect.INTERNAL_ERROR, f"internal error: {reason}", error=False)
        finally:
            if consumer is not None:
                self.disconnect(consumer)
            await trio.aclose_forcefully(stream)

    async def serve_websocket(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The optional WebSocket endpoint (JSON frames) until cancelled; reports the port."""
        listeners = await bind_websocket(host, port)
        await self.serve_websocket_listeners(listeners, task_status=task_status)

    async def serve_websocket_listeners(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the WebSocket endpoint on listeners from :func:`bind_websocket`."""
        for listener in listeners:
            self._served(listener)
        host, port = listeners[0].socket.getsockname()[:2]
        if not (host.startswith("127.") or host == "::1"):
            log.warning(
                "consumer_websocket_not_loopback",
                host=host,
                note="the WebSocket endpoint has no authentication; anyone who can reach "
                "this address can read every session",
            )
        # trio.serve_listeners rather than trio_websocket.WebSocketServer: the server
        # runs each connection's reader task where an exception from it ends the server.
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._websocket_connection, listeners)
            log.info("consumer_websocket_listening", host=host, port=port)
            task_status.started(port)

    def _served(self, listener: trio.SocketListener) -> None:
        self._unserved = [(x, p) for x, p in self._unserved if x is not listener]

    async def _websocket_connection(self, stream: trio.SocketStream) -> None:
        """One connection to the WebSocket endpoint, from the HTTP upgrade to the close."""
        await self._serve_peer("websocket", stream, lambda: self._websocket_peer(stream))

    @contextlib.asynccontextmanager
    async def _websocket_peer(self, stream: trio.SocketStream) -> AsyncIterator[_Peer | None]:
        """The handshake (None if it failed or was refused), then the consumer; the close.

        trio-websocket's reader task runs in this nursery: whatever it raises cancels
        the consumer and leaves through here, to :meth:`_serve_peer`.
        """
        async with trio.open_nursery() as nursery:
            request = None
            with trio.move_on_after(self.handshake_timeout):
                request = await trio_websocket.wrap_server_stream(
                    nursery, stream, max_message_size=REQUEST_MAX
                )
            ws = await self._websocket_handshake(request) if request is not None else None
            try:
                yield _WebSocketPeer(self, ws) if ws is not None else None
            finally:
                if ws is not None:
                    with trio.move_on_after(self.final_grace) as scope:
                        scope.shield = True
                        await ws.aclose()
                nursery.cancel_scope.cancel()  # the reader task, when the handshake failed

    async def _websocket_handshake(
        self, request: trio_websocket.WebSocketRequest
    ) -> trio_websocket.WebSocketConnection | None:
        """Accept the upgrade, unless a web page on another site asks (None: refused)."""
        origin = _header(request.headers, b"origin")
        if origin is not None and not _loopback_origin(origin):
            log.warning("consumer_websocket_refused", origin=origin[:200])
            await request.reject(403, body=b"cross-origin consumers are not allowed\n")
            return None
        return await request.accept()


async def bind_websocket(host: str, port: int) -> list[trio.SocketListener]:
    """The WebSocket endpoint's listening sockets (port 0: any free port)."""
    return await trio.open_tcp_listeners(port, host=host)


#: Every metric family of :meth:`ConsumerHub.metric_samples`, with its help text.
METRICS = {
    "wirekeep_consumers_connected": "Consumers connected now (both endpoints).",
    "wirekeep_consumers_accepted_total": "Consumer connections accepted.",
    "wirekeep_consumer_messages_delivered_total": "Upstream messages written to consumers.",
    "wirekeep_consumer_messages_dropped_total": (
        "Messages dropped for consumers whose queue was full, by session."
    ),
    "wirekeep_consumer_gaps_total": "Gap markers sent to consumers, by cause.",
    "wirekeep_consumer_disconnects_total": "Consumers that went away, by reason.",
    "wirekeep_consumer_subscribers": "Consumers subscribed to each session now.",
}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _notice(record: TransitionRecord, at: datetime | None = None) -> ConsumerFrame:
    """A StateNotice for ``record``, timed ``at`` (default: the event's own time)."""
    at = at or record.at
    at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return ConsumerFrame(
        state_notice=StateNotice(
            session=record.session,
            state=record.dest,
            previous=record.source,
            reason=record.reason,
            at_ns=(at - _EPOCH) // timedelta(microseconds=1) * 1000,
            version=record.version,
            trigger=record.trigger,
        )
    )


@contextlib.asynccontextmanager
async def _just(peer: _Peer) -> AsyncIterator[_Peer]:
    """A peer that needs no set-up or tear-down, for :meth:`ConsumerHub._serve_peer`."""
    yield peer


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# -- connections -------------------------------------------------------------------------


class _Peer:
    """One consumer connection: a reader of requests, a writer of frames."""

    consumer: Consumer

    def __init__(self, hub: ConsumerHub) -> None:
        self.hub = hub
        self.lag = trio.CancelScope()  # the writer's; see _write
        self.deadline = math.inf  # when the write in progress makes the consumer too slow

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read)
            await self._write()
            nursery.cancel_scope.cancel()
        await self.close()

    async def _write(self) -> None:
        consumer, hub, stats = self.consumer, self.hub, self.hub.stats
        # One scope for the writer's life. Its deadline is the lag limit, set by send()
        # only while a write has to wait for the consumer (the fast path sets nothing);
        # fail() cancels it to end a write in progress at once.
        with trio.CancelScope() as self.lag:
            consumer.send_scope = self.lag
            try:
                while True:
                    await consumer.wait()
                    final = consumer.final
                    if final is not None and not (final.flush and consumer.has_items()):
                        break
                    oldest = consumer.oldest()
                    assert oldest is not None
                    behind = consumer.behind_since
                    start = oldest if behind is None or oldest < behind else behind
                    self.deadline = start + hub.max_lag
                    drops = consumer.dropped
                    front, queue, skip = consumer.take()
                    payload, delivered, gaps, reconnects = self.render(front, queue, skip)
                    await self.send(payload)
                    consumer.delivered += delivered
                    stats.messages_delivered += delivered
                    if gaps or reconnects:
                        consumer.gaps += gaps + reconnects
                        stats.gaps_sent[CAUSE_CONSUMER_TOO_SLOW] += gaps
                        stats.gaps_sent[CAUSE_UPSTREAM_RECONNECT] += reconnects
                    if (
                        consumer.behind_since is not None
                        and consumer.dropped == drops
                        and self.unread() <= 2 * len(payload) + 4096
                    ):
                        consumer.behind_since = None  # caught up
            except _SEND_ERRORS:
                consumer.fail(Disconnect.CLOSED, "connection lost", error=False)
                return
            finally:
                consumer.send_scope = None
        if self.lag.cancelled_caught and consumer.final is None:
            lag = trio.current_time() - (self.deadline - hub.max_lag)
            consumer.fail(
                Disconnect.TOO_SLOW,
                f"too slow: behind for {lag:.1f} s (the limit is {hub.max_lag:.1f} s); "
                f"{consumer.dropped} messages dropped, queue of {hub.queue_limit}",
            )
        final = consumer.final
        if final is not None and final.error is not None:
            self.deadline = math.inf
            with trio.move_on_after(hub.final_grace), contextlib.suppress(*_SEND_ERRORS):
                await self.send_error(final.error)

    @staticmethod
    def _tally(items: Iterable[_Item]) -> tuple[int, int]:
        """(gap markers for drops, reconnect gaps) among ``items``."""
        gaps = reconnects = 0
        for item in items:
            if item.kind == _GAP:
                if type(item) is _GapMark:
                    gaps += 1
                else:
                    reconnects += 1
        return gaps, reconnects

    # -- per transport -----------------------------------------------------------------

    def unread(self) -> int:
        """Bytes written to the consumer that it has not read yet (0: unknown)."""
        return 0

    async def _read(self) -> None:
        raise NotImplementedError

    def render(
        self, front: list[_Item], queue: collections.deque[_Item], skip: int
    ) -> tuple[Any, int, int, int]:
        raise NotImplementedError

    async def send(self, payload: Any) -> None:
        raise NotImplementedError

    async def send_error(self, message: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class _UnixPeer(_Peer):
    """Length-prefixed protobuf over a stream socket; one write per wake-up."""

    def __init__(self, hub: ConsumerHub, stream: trio.SocketStream) -> None:
        super().__init__(hub)
        self.stream = stream
        self.sock = stream.socket
        self.fd = self.sock.fileno()
        self.consumer = hub.connect("unix", _peer_credentials(self.sock))
        # The write in progress and how much of it left: if it is interrupted, the rest
        # of its current frame must go out before anything else can.
        self._out: memoryview | None = None
        self._sent = 0
        self._error_sent = False

    async def _read(self) -> None:
        consumer, hub = self.consumer, self.hub
        decoder = ConsumerRequestDecoder()
        while True:
            try:
                data = await self.sock.recv(_READ_SIZE)
            except OSError:
                consumer.fail(Disconnect.CLOSED, "connection lost", error=False)
                return
            if not data:
                consumer.fail(Disconnect.CLOSED, "closed by the consumer", error=False)
                return
            try:
                decoder.feed(data)
                requests = decoder.messages()
            except RemoteProtocolError as exc:
                consumer.fail(Disconnect.PROTOCOL_ERROR, f"bad request: {exc}")
                return
            for request in requests:
                hub.request(consumer, request)
                if consumer.final is not None:
                    return
            if decoder.error is not None:
                consumer.fail(Disconnect.PROTOCOL_ERROR, f"bad request: {decoder.error}")
                return

    def render(
        self, front: list[_Item], queue: collections.deque[_Item], skip: int
    ) -> tuple[bytes, int, int, int]:
        parts = [item.pb() for item in front]
        gaps, reconnects = self._tally(front)
        delivered = 0
        if skip:
            head = queue.popleft()
            assert type(head) is _Chunk
            parts.append(head.pb_from(skip))
            delivered = head.count - skip
        others = False
        for item in queue:
            parts.append(item.pb())
            if item.kind == _DATA:
                delivered += item.count
            else:
                others = True
        if others:
            more, again = self._tally(queue)
            gaps, reconnects = gaps + more, reconnects + again
        return b"".join(parts), delivered, gaps, reconnects

    def unread(self) -> int:
        """The kernel's count of bytes the consumer has not read (skb sizes: a bit more)."""
        try:
            raw = fcntl.ioctl(self.fd, termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return 0
        value: int = struct.unpack("i", raw)[0]
        return value

    async def send(self, payload: bytes) -> None:
        """Write it all; yields to the scheduler only when the consumer's buffer is full.

        A plain non-blocking write(2) first (Trio made the socket non-blocking): most
        writes complete at once, with no checkpoint, no scope, no task switch.
        """
        view = self._out = memoryview(payload)
        total = len(view)
        try:
            sent = os.write(self.fd, view)
        except BlockingIOError:
            sent = 0
        self._sent = sent
        if sent < total:
            self.lag.deadline = self.deadline
            try:
                while sent < total:
                    await trio.lowlevel.wait_writable(self.sock)
                    with contextlib.suppress(BlockingIOError):
                        sent += os.write(self.fd, view[sent:])
                    self._sent = sent
            finally:
                self.lag.deadline = math.inf
        self._out = None

    async def send_error(self, message: str) -> None:
        rest = b""
        if self._out is not None:  # interrupted in the middle of a write
            rest = bytes(self._out[self._sent : frame_end(self._out, self._sent)])
            self._out = None
        await self.send(rest + encode(ConsumerFrame(error=Error(message=message))))
        self._error_sent = True

    async def close(self) -> None:
        if not self._error_sent:
            return
        # Half-close, then read until the consumer closes too (at most final_grace):
        # closing with its unread requests pending would reset the connection and could
        # destroy the Error frame before the consumer reads it.
        with trio.move_on_after(self.hub.final_grace):
            try:
                self.sock.shutdown(stdsocket.SHUT_WR)
                while await self.sock.recv(_READ_SIZE):
                    pass
            except OSError:
                pass


class _WebSocketPeer(_Peer):
    """JSON text messages over trio-websocket; one WebSocket message per frame."""

    def __init__(self, hub: ConsumerHub, ws: trio_websocket.WebSocketConnection) -> None:
        super().__init__(hub)
        self.ws = ws
        remote = ws.remote
        where = (
            f"{remote.address}:{remote.port}"
            if isinstance(remote, trio_websocket.Endpoint)
            else str(remote)
        )
        self.consumer = hub.connect("websocket", where)

    async def _read(self) -> None:
        consumer, hub = self.consumer, self.hub
        while True:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                consumer.fail(Disconnect.CLOSED, "closed by the consumer", error=False)
                return
            try:
                request = decode_request_json(message)
            except RemoteProtocolError as exc:
                consumer.fail(Disconnect.PROTOCOL_ERROR, f"bad request: {exc}")
                return
            hub.request(consumer, request)
            if consumer.final is not None:
                return

    def render(
        self, front: list[_Item], queue: collections.deque[_Item], skip: int
    ) -> tuple[list[str], int, int, int]:
        out: list[str] = []
        for item in front:
            assert not isinstance(item, _Chunk)
            out.append(item.json())
        delivered = 0
        if skip:
            head = queue.popleft()
            assert type(head) is _Chunk
            out += head.json_from(skip)
            delivered = head.count - skip
        for item in queue:
            if isinstance(item, _Chunk):
                out += item.json()
                delivered += item.count
            else:
                out.append(item.json())
        gaps, reconnects = self._tally([*front, *queue])
        return out, delivered, gaps, reconnects

    async def send(self, payload: list[str]) -> None:
        send = self.ws.send_message
        self.lag.deadline = self.deadline
        try:
            for text in payload:
                await send(text)
        except trio_websocket.ConnectionClosed:
            raise trio.BrokenResourceError("the consumer closed the WebSocket") from None
        finally:
            self.lag.deadline = math.inf

    async def send_error(self, message: str) -> None:
        await self.send([encode_json(ConsumerFrame(error=Error(message=message)))])

    async def close(self) -> None:
        final = self.consumer.final
        code = 1000 if final is None or final.error is None else 1008
        reason = None if final is None or final.error is None else final.error[:120]
        with trio.move_on_after(self.hub.final_grace), contextlib.suppress(*_SEND_ERRORS):
            await self.ws.aclose(code, reason)


# -- the Unix socket ---------------------------------------------------------------------


def _peer_credentials(sock: Any) -> str:
    """``pid 1234 uid 1000`` of the process at the other end of a Unix socket."""
    try:
        raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
    except (OSError, AttributeError, struct.error):
        return "unknown peer"
    return f"pid {pid} uid {uid}"


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise OSError(errno.EINVAL, f"no group named {group!r}") from None


def bind_unix_listener(
    path: str, *, group: str | None = None, mode: int = SOCKET_MODE, backlog: int = 128
) -> trio.SocketListener:
    """A listening Unix socket at ``path`` with ``mode`` (and ``group``) from the start.

    The umask is set around ``bind`` (the file is never more open than ``mode``), the
    group is changed before ``listen`` (nobody can connect while the group is still the
    daemon's). A socket file left by a crashed run is replaced; one that somebody still
    listens on is an error, and so is a path that is not a socket.
    """
    _remove_stale(path)
    gid = _group_id(group) if group else None
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        previous = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(previous)
        try:
            if gid is not None:
                os.chown(path, -1, gid)
            sock.listen(backlog)
        except BaseException:
            _unlink_socket(path)
            raise
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        _unlink_socket(path)  # left by a run that did not stop cleanly
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process is listening on {path}")


def _unlink_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- WebSocket helpers -------------------------------------------------------------------


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _loopback_origin(origin: str) -> bool:
    """Is a browser Origin (``http://localhost:3000``) a page served from this machine?"""
    if origin == "null":
        return False
    host = urlsplit(origin).hostname or ""
    return host in _LOOPBACK_NAMES or host.startswith("127.")
