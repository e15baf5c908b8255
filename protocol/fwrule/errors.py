"""Errors raised by the firewall rule language.

Every failure the package reports is a :class:`FwruleError` (a ``ValueError``) carrying the
payload ``field`` it is about (``"rule"`` for anything wrong with the rule text) and the
operator-facing ``message``. When a payload has several bad fields at once they are collected
into a :class:`FwruleMultiError` whose ``errors`` keep their own fields.
"""

from __future__ import annotations

from collections.abc import Sequence


class FwruleError(ValueError):
    """One invalid field: ``field`` names it, ``message`` says what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def to_json(self) -> dict[str, str]:
        """The ``{field, code, message}`` shape the API puts in ``errors`` lists."""
        return {"field": self.field, "code": "InvalidParameter", "message": self.message}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.field!r}, {self.message!r})"


class FwruleMultiError(FwruleError):
    """Several invalid fields, in the order they were checked.

    ``message`` is ``first of N errors: <first message>`` and ``field`` is the first error's
    field, so code that only looks at one error still gets something sensible.
    """

    def __init__(self, errors: Sequence[FwruleError]) -> None:
        if len(errors) < 2:
            raise ValueError("FwruleMultiError needs at least two errors")
        self.errors: list[FwruleError] = list(errors)
        first = self.errors[0]
        super().__init__(first.field, f"first of {len(self.errors)} errors: {first.message}")


def raise_collected(errors: Sequence[FwruleError]) -> None:
    """Raise nothing, the single error, or a multi-error, depending on how many there are."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise FwruleMultiError(errors)
