"""How the local endpoints report a peer connection that raised (control and consumers).

Every connection of a local peer runs in a task of its own, and whatever that task
raises ends that connection only: no local program can take the daemon down. The
operator gets one warning naming the reason; the traceback goes to debug, because a
peer that can trigger a bug at will could otherwise fill the journal with tracebacks.
"""

from __future__ import annotations

from typing import Any

from daemon.excgroups import first_error
from protocol.peer_json import valid_unicode

__all__ = ["report_peer_error"]


def report_peer_error(log: Any, event: str, exc: BaseException, **keys: object) -> str:
    """Log ``event`` (warning, with ``reason``) and its traceback (debug); the reason."""
    leaf = first_error(exc)
    name = type(leaf).__name__
    lines = str(leaf).strip().splitlines()
    # valid_unicode: the message may echo a peer's text, and a log line must be writable.
    reason = f"{name}: {valid_unicode(lines[0][:200])}" if lines else name
    log.warning(event, reason=reason, **keys)
    log.debug(f"{event}_traceback", exc_info=exc, **keys)
    return reason
