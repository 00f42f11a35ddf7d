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
    """A scanned file we refuse (empty, not an image/PDF, corrupt, encrypted, too large…).

    ``code`` names the kind of refusal for the clerk's message (``edge.reasons``); when a raiser
    does not give one it is read from the reason text.
    """

    hint = "re-scan the document; the refused file is kept in the refused-scans folder with the reason"

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class IncompleteFileError(BadInputError):
    """The file does not end the way its format must (no PDF trailer, no PNG IEND, …).

    Not a refusal yet: a scanner may still be writing it. The intake waits, and refuses it only
    once it has stayed incomplete and unchanged for ``intake.incomplete_grace_seconds``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason, code="incomplete")


class OcrEngineError(EdgeError):
    """The OCR engine itself failed (tesseract missing, crashed, timed out): retryable."""

    hint = "check that tesseract and the 'vie' language data are installed (tesseract --list-langs)"


class ContentChangedError(EdgeError):
    """The held original changed while (or since) it was read: a writer still holds it.

    Not a failure of the scan: the row takes the new content and is processed again.
    """

    hint = "the scanner was still writing; the box waits for it and sends the final file"


class EdgeAlreadyRunning(EdgeError):
    """Another ``sohoa edge run`` holds this home: two services would both take the same scans."""

    hint = "stop the other one first (systemctl stop sohoa-edge)"
    exit_code = 75   # EX_TEMPFAIL: it can start once the other has stopped
