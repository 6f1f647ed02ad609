"""Getting at what went wrong inside Trio's exception groups (nurseries wrap everything)."""

from __future__ import annotations


def first_error(exc: BaseException) -> BaseException:
    """The first exception in (possibly nested) exception groups: what went wrong."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def sole(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups, else ``exc`` itself
    (a group of several failures is not explained as any one of them)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
