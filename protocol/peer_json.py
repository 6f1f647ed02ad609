"""One JSON object from a local peer, parsed strictly (the control and consumer codecs).

A peer can send anything, and three things get past ``json.loads`` that break what
comes after it: bytes that are not UTF-8 (``json.loads`` on bytes even guesses UTF-16
or UTF-32 from zero bytes), duplicate keys (the last one would silently win), and
``\\ud800`` escapes, which become lone surrogates: a str that cannot be encoded again,
so a reply that echoes it fails, and protobuf's upb raises ``SystemError`` on such a
key. Here each is a :class:`RemoteProtocolError` with a sentence, before anything else
sees the value.
"""

from __future__ import annotations

import json
import re

from protocol.errors import RemoteProtocolError

__all__ = ["first_line", "json_type_name", "parse_object", "valid_unicode"]

_SURROGATE = re.compile("[\ud800-\udfff]")

_JSON_TYPES: dict[type[object], str] = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def parse_object(data: bytes | str, prefix: str) -> dict[str, object]:
    """The JSON object in ``data``; each error's sentence starts with ``prefix``.

    Raises :class:`RemoteProtocolError` for text that is not UTF-8, not JSON (nesting
    too deep included), not an object, has a duplicate key, or a string (key or value)
    holding a lone surrogate.
    """
    if isinstance(data, str):
        text = data
        if _SURROGATE.search(text):
            raise RemoteProtocolError(f"{prefix}not valid Unicode (a lone surrogate)")
    else:
        try:
            text = data.decode("utf-8")  # strict: never a surrogate in the result
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"{prefix}not UTF-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_object_without_duplicates)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"{prefix}not JSON: {first_line(exc)}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{prefix}a JSON {json_type_name(obj)}, not an object")
    # Only an escape can produce a surrogate from text that has none (checked above).
    if "\\u" in text and _has_surrogate(obj):
        raise RemoteProtocolError(
            f"{prefix}not valid Unicode: a \\u escape names a lone surrogate (U+D800 to U+DFFF)"
        )
    return obj


def valid_unicode(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD, so that it can be encoded.

    For text from a peer that goes back into a reply (an id, a name in an error).
    """
    return _SURROGATE.sub("\ufffd", text)


def _has_surrogate(obj: dict[str, object]) -> bool:
    """Any key or string value with a lone surrogate (iterative: nesting can be deep)."""
    pending: list[object] = [obj]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending += item.keys()
            pending += item.values()
        elif isinstance(item, list):
            pending += item
    return False


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def json_type_name(value: object) -> str:
    """What JSON calls the type of a value ``json.loads`` returned: "object", "array"..."""
    return _JSON_TYPES.get(type(value), "value")


def first_line(exc: BaseException) -> str:
    """An exception's message for an error sentence: its first line, at most 200 characters."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    text = lines[0]
    return text if len(text) <= 200 else text[:197] + "..."
