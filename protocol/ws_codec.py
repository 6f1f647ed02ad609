"""Pure helpers for the JSON-over-WebSocket venue kind.

- :func:`find_placeholders` / :func:`render_template`: ``${env:NAME}`` and
  ``${cred:NAME}`` in configured messages (auth, subscribe). The daemon
  resolves the values (environment, systemd credentials) and passes them in a
  mapping keyed ``"env:NAME"`` / ``"cred:NAME"``; this module never reads the
  environment, and its error messages name placeholders, never values.
- :func:`check_auth_reply`: did the venue accept our auth message?
- :func:`classify`: data, heartbeat or error, cheaply, for every message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from protocol.kinds import MessageKind

__all__ = [
    "AuthVerdict",
    "MessageKind",
    "TemplateError",
    "check_auth_reply",
    "classify",
    "find_placeholders",
    "render_template",
]


class TemplateError(ValueError):
    """A template has a malformed placeholder, or a value is missing for one."""


# ${env:NAME} / ${cred:NAME}. Environment names are shell-style; credential
# names (systemd LoadCredential=) may also contain dots and dashes.
_PLACEHOLDER = re.compile(
    r"\$\{(?:(env):([A-Za-z_][A-Za-z0-9_]*)|(cred):([A-Za-z0-9_][A-Za-z0-9_.-]*))\}"
)
# Anything that starts like a placeholder; "$${" is a literal "${".
_OPENING = re.compile(r"\$\$\{|\$\{")


def _scan(template: str) -> list[tuple[int, int, str | None]]:
    """(start, end, key) for every ``${...}`` in order; key None for a ``$${`` escape."""
    found: list[tuple[int, int, str | None]] = []
    pos = 0
    while (opening := _OPENING.search(template, pos)) is not None:
        start = opening.start()
        if opening.group() == "$${":
            found.append((start, start + 3, None))
            pos = start + 3
            continue
        match = _PLACEHOLDER.match(template, start)
        if match is None:
            close = template.find("}", start)
            shown = (
                template[start : close + 1]
                if 0 <= close - start < 60
                else template[start : start + 20] + "..."
            )
            raise TemplateError(
                f"malformed placeholder {shown!r} at offset {start}:"
                " expected ${env:NAME} or ${cred:NAME} (write $${ for a literal ${)"
            )
        source = match.group(1) or match.group(3)
        name = match.group(2) or match.group(4)
        found.append((start, match.end(), f"{source}:{name}"))
        pos = match.end()
    return found


def find_placeholders(template: str) -> list[str]:
    """The keys a template needs, like ``["env:VENUE_A_KEY", "cred:secret"]``.

    In order of first appearance, without duplicates. Raises
    :class:`TemplateError` for anything that starts with ``${`` but is not a
    well-formed placeholder (a typo such as ``${ENV:KEY}`` must not be sent to
    a venue as a literal key).
    """
    keys: list[str] = []
    for _, _, key in _scan(template):
        if key is not None and key not in keys:
            keys.append(key)
    return keys


def _json_string_body(value: str) -> str:
    return json.dumps(value)[1:-1]


def render_template(template: str, secrets: Mapping[str, str], *, json_escape: bool = False) -> str:
    """Substitute every placeholder with ``secrets["env:NAME"]`` / ``secrets["cred:NAME"]``.

    With ``json_escape=True`` each value is escaped for use inside a JSON
    string (quotes, backslashes, control characters), so a secret containing
    ``"`` cannot break a JSON auth message. Raises :class:`TemplateError`
    naming the first placeholder without a value.
    """
    parts: list[str] = []
    pos = 0
    for start, end, key in _scan(template):
        parts.append(template[pos:start])
        if key is None:
            parts.append("${")
        else:
            try:
                value = secrets[key]
            except KeyError:
                raise TemplateError(f"no value for the placeholder ${{{key}}}") from None
            parts.append(_json_string_body(value) if json_escape else value)
        pos = end
    parts.append(template[pos:])
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class AuthVerdict:
    """The outcome of an auth reply: accepted, or rejected with a reason sentence."""

    accepted: bool
    reason: str = ""


# Fields venues use for error text, in the order they are tried.
_ERROR_TEXT_FIELDS = (
    "error",
    "errors",
    "message",
    "msg",
    "reason",
    "description",
    "error_message",
    "errorMessage",
    "ret_msg",
    "retMsg",
    "detail",
)
_ERROR_CODE_FIELDS = ("code", "error_code", "errorCode", "ret_code", "retCode")
_MAX_REASON = 200


def _short(text: str, limit: int = _MAX_REASON) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _matches(actual: object, expected: object) -> bool:
    """Expected dicts match by subset; bools only match bools; 1 matches 1.0."""
    if isinstance(expected, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual and _matches(actual[key], value) for key, value in expected.items()
        )
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if isinstance(expected, list | tuple):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(_matches(a, e) for a, e in zip(actual, expected, strict=True))
        )
    same_kind = type(expected) is type(actual) or (
        isinstance(expected, int | float) and isinstance(actual, int | float)
    )
    return same_kind and expected == actual


def _error_texts(obj: Mapping[str, object], depth: int = 0) -> tuple[list[str], str]:
    """Error sentences found in ``obj`` (nested up to two levels) and an error code."""
    texts: list[str] = []
    code = ""
    for field in _ERROR_TEXT_FIELDS:
        value = obj.get(field)
        if isinstance(value, str) and value.strip():
            texts.append(value.strip())
        elif isinstance(value, Mapping) and depth < 2:
            nested, nested_code = _error_texts(value, depth + 1)
            texts.extend(nested)
            code = code or nested_code
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            texts.append(", ".join(value))
    for field in _ERROR_CODE_FIELDS:
        value = obj.get(field)
        if isinstance(value, str | int) and not isinstance(value, bool) and value not in ("", 0):
            code = str(value)
            break
    return texts, code


def _venue_error_text(obj: Mapping[str, object]) -> str:
    """``"Failed to subscribe: invalid key (code 401)"``, or "" if the venue said nothing."""
    texts, code = _error_texts(obj)
    unique = list(dict.fromkeys(texts))
    if not unique:
        return ""
    return _short(": ".join(unique) + (f" (code {code})" if code else ""))


def check_auth_reply(text: str, expect: Mapping[str, object]) -> AuthVerdict:
    """Judge a venue's reply to the auth message against ``auth_expect``.

    Accepted when every key of ``expect`` is in the reply with the expected
    value (nested objects compared as subsets; ``true`` does not match ``1``).
    Otherwise rejected, with the venue's own error text as the reason when it
    gives one (fields ``error``, ``message``, ``msg``, ``reason``, ... and a
    ``code``), else a sentence naming the first key that did not match. A
    reply that is not JSON is rejected as ``"auth reply is not JSON: ..."``.
    """
    try:
        reply = json.loads(text)
    except (ValueError, RecursionError):
        return AuthVerdict(False, f"auth reply is not JSON: {_short(text, 80)!r}")
    if not isinstance(reply, dict):
        return AuthVerdict(
            False,
            f"auth reply is a JSON {type(reply).__name__}, not an object: {_short(text, 80)!r}",
        )
    if _matches(reply, expect):
        return AuthVerdict(True, "")
    venue_text = _venue_error_text(reply)
    if venue_text:
        return AuthVerdict(False, venue_text)
    for key, value in expect.items():
        if key not in reply:
            return AuthVerdict(False, f"auth reply has no {key!r} (expected {_json(value)})")
        if not _matches(reply[key], value):
            return AuthVerdict(
                False,
                f"auth reply has {key}={_short(_json(reply[key]), 60)}, expected {_json(value)}",
            )
    return AuthVerdict(False, "auth reply does not match")  # pragma: no cover - unreachable


def _json(value: object) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


# --- classification -----------------------------------------------------------

_MAX_PARSED = 4096
_HEARTBEAT_WORDS = frozenset({"ping", "pong", "heartbeat", "heartbeats", "hb"})
_TYPE_FIELDS = ("op", "type", "event", "e", "channel", "method", "action", "topic")


def classify(text: str) -> MessageKind:
    """DATA, HEARTBEAT or ERROR for one text message; cheap enough for all of them.

    Heuristics, in order:

    1. A bare ``ping`` / ``pong`` (any case, surrounding whitespace ignored) is
       a HEARTBEAT (OKX, Bitget and others send these as plain text).
    2. If the text contains none of the quoted tokens ``"ping``, ``"pong``,
       ``"heartbeat``, ``"hb"``, ``"err`` (covers ``"error"``, ``"errors"``,
       ``"errorMessage"``, ``"err_code"``) or ``"success"`` it is DATA; this
       is a handful of substring searches, no JSON parse, and decides almost
       every market-data message. Tokens and the values below are matched in
       lower case only (``"PONG"`` inside JSON is data).
    3. Otherwise, if it is longer than 4 KiB it is DATA (heartbeats and errors
       are short), and if it is not a JSON object it is DATA.
    4. A JSON object is a HEARTBEAT when one of ``op``, ``type``, ``event``,
       ``e``, ``channel``, ``method``, ``action``, ``topic`` is ``"ping"``,
       ``"pong"``, ``"heartbeat"``, ``"heartbeats"`` or ``"hb"``, or when its only key
       is ``ping`` / ``pong`` (``{"ping": 1700000000}``).
    5. It is an ERROR when one of those fields is ``"error"``, when ``error``,
       ``errors``, ``err`` or ``errorMessage`` holds anything but null, false,
       ``""``, ``0``, ``[]`` or ``{}``, or when ``success`` is ``false``.
    6. Anything else is DATA (relayed to consumers unchanged).
    """
    if len(text) <= 16 and text.strip().lower() in ("ping", "pong"):
        return MessageKind.HEARTBEAT
    # Quoted tokens found in heartbeats and errors; without any of them the
    # message is data, decided with no JSON parse (spelled out: faster than a loop).
    if not (
        '"ping' in text
        or '"pong' in text
        or '"heartbeat' in text
        or '"hb"' in text
        or '"err' in text
        or '"success"' in text
    ):
        return MessageKind.DATA
    if len(text) > _MAX_PARSED:
        return MessageKind.DATA
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return MessageKind.DATA
    if not isinstance(obj, dict):
        return MessageKind.DATA
    for field in _TYPE_FIELDS:
        value = obj.get(field)
        if isinstance(value, str):
            if value in _HEARTBEAT_WORDS:
                return MessageKind.HEARTBEAT
            if value == "error":
                return MessageKind.ERROR
    if len(obj) == 1 and ("ping" in obj or "pong" in obj):
        return MessageKind.HEARTBEAT
    for field in ("error", "errors", "err", "errorMessage"):
        if obj.get(field) not in (None, False, "", 0, [], {}):
            return MessageKind.ERROR
    if obj.get("success") is False:
        return MessageKind.ERROR
    return MessageKind.DATA
