"""The venue's control port: one JSON object per line in, one JSON reply per line out.

Made for a person at a terminal (``nc 127.0.0.1 8767``) and for the demo::

    {"fault": "silent", "seconds": 10}             -> {"ok": true, "hit": 0}
    {"fault": "drop", "kind": "websocket"}         -> {"ok": true, "hit": 3}
    {"fault": "clear"}                             -> {"ok": true, "hit": 1}
    {"status": true}                               -> {"ok": true, "counters": ..., "faults": ...}
    anything else                                  -> {"ok": false, "error": "..."}

Blank lines are ignored; a bad line gets an error reply and the connection stays open.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final, Protocol

import trio

from daemon.venue.faults import Fault, FaultError
from daemon.venue.hub import LINK_ERRORS

__all__ = ["Controllable", "handle_control_line", "serve_control"]

MAX_LINE: Final = 64 * 1024
_USAGE: Final = 'expected {"fault": NAME, ...} or {"status": true}'


class Controllable(Protocol):
    def apply_fault(self, fault: Fault | Mapping[str, object]) -> int: ...

    def status(self) -> dict[str, object]: ...


def handle_control_line(venue: Controllable, line: bytes) -> dict[str, object]:
    """The reply to one control line (never raises)."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return {"ok": False, "error": f"not JSON; {_USAGE}"}
    if not isinstance(request, dict):
        return {"ok": False, "error": f"not a JSON object; {_USAGE}"}
    if request.get("status") is True and len(request) == 1:
        return {"ok": True, **venue.status()}
    if "fault" not in request:
        return {"ok": False, "error": _USAGE}
    try:
        hit = venue.apply_fault(request)
    except FaultError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "hit": hit}


def _encode(reply: Mapping[str, object]) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


async def serve_control(venue: Controllable, stream: trio.abc.Stream) -> None:
    """Answer control lines on ``stream`` until the peer closes it."""
    buffer = bytearray()
    try:
        while data := await stream.receive_some(4096):
            buffer += data
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end]).strip()
                del buffer[: end + 1]
                if line:
                    await stream.send_all(_encode(handle_control_line(venue, line)))
            if len(buffer) > MAX_LINE:
                await stream.send_all(_encode({"ok": False, "error": "line too long"}))
                return
    except LINK_ERRORS:
        pass
    finally:
        await trio.aclose_forcefully(stream)
