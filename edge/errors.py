"""Edge error hierarchy: what went wrong on the box, with a hint an operator can act on.

``BadInputError`` means *this file* is refused (quarantine it, do not retry); any other
``EdgeError`` is about the box (a missing tool, a full disk) and is worth retrying later.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base for edge failures; ``hint`` tells the operator what to do about it."""

    hint = "see the edge log for details"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class BadInputError(EdgeError):
    """A scanned file we refuse (empty, not an image/PDF, corrupt, encrypted, too large…)."""

    hint = "re-scan the document; the refused file is kept in the failed folder with the reason"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OcrEngineError(EdgeError):
    """The OCR engine itself failed (tesseract missing, crashed, timed out): retryable."""

    hint = "check that tesseract and the 'vie' language data are installed (tesseract --list-langs)"
