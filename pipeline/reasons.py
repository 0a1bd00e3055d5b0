"""Why an update was refused, as a code: a closed set that metrics and branches read (never the text)."""

from __future__ import annotations

REJECT_REASONS = ("stale", "corrupt", "too_large", "nonfinite", "shape", "duplicate", "signature", "other")


class Refusal(ValueError):
    """Base of the errors that refuse an update; ``code`` is one of REJECT_REASONS, the message free text."""

    default_code = "other"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code if code in REJECT_REASONS else self.default_code


def reason_code(exc: BaseException) -> str:
    """The refusal code an exception carries ("other" for any exception that carries none)."""
    code = getattr(exc, "code", None)
    return code if code in REJECT_REASONS else "other"
