"""Central's error hierarchy: what an operator can act on, translated to exit codes in cli.py.

Wire-level faults from devices are ``protocol.errors`` classes; these are central's own failures
(bad config, a home that is not initialised, an enrollment that would clobber a device).
"""

from __future__ import annotations

from protocol.errors import EnvelopeError, ProtocolError


class CentralError(Exception):
    """Base for central failures; ``hint`` tells the operator what to do next."""

    hint = "see the message"
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(CentralError):
    """central.toml is missing, malformed, or names a bad value."""

    hint = "fix central.toml or re-run `sohoa central init`"
    exit_code = 78  # EX_CONFIG


class HomeError(CentralError):
    """The home directory is missing, not initialised, or already initialised."""

    hint = "run `sohoa central init --home DIR` first"
    exit_code = 66  # EX_NOINPUT


class AlreadyRunningError(CentralError):
    """Another process already runs as this worker on this home."""

    hint = "stop it first, or give this one its own name: sohoa central run --worker N"
    exit_code = 75  # EX_TEMPFAIL: it can start once the other has stopped


class EnrollError(CentralError):
    """A device id cannot be enrolled (reserved, invalid, already enrolled)."""

    hint = "pick another device id, or revoke the old device first"
    exit_code = 65  # EX_DATAERR


class DeviceError(CentralError):
    """A command names a device central does not know."""

    hint = "check the id against GET /api/devices"
    exit_code = 65  # EX_DATAERR


class CatalogError(CentralError):
    """The catalog file cannot be used as it is (written by a newer sohoa, a failed migration)."""

    hint = "restore the catalog from a backup, or run the sohoa version that wrote it"
    exit_code = 65  # EX_DATAERR


class StorageError(CentralError):
    """An object could not be stored or read back with the expected hash."""

    hint = "check the storage root's disk space and permissions"
    exit_code = 74  # EX_IOERR


# -- refusals of a device's transfer; their class names travel to the edge as ack error_class ----

class UnknownDeviceError(EnvelopeError):
    """The init names a device central never enrolled."""

    hint = "enroll the device with `sohoa central enroll` and give it the bundle"


class RevokedDeviceError(EnvelopeError):
    """The device was enrolled but has been revoked."""

    hint = "this box is no longer trusted; re-enroll it under a new id if it was recovered"


class ReplayError(EnvelopeError):
    """A sequence number or transfer id is reused for different bytes."""

    hint = "the device's outbox reused a sequence number; re-package the document"


class SequenceReusedError(ReplayError):
    """A correctly signed init reuses a sequence number another transfer of the device holds.

    An honest box never does this (one sequence number per outbox row, one transfer id per row), so
    two boxes share one identity: a cloned SD card, or a box re-imaged from an old copy. Central
    flags the device ``possible_clone``; the edge keeps the refused scan so it can be sent again.
    """

    hint = ("two boxes share this device identity (a cloned SD card or a re-imaged box): enroll one of "
            "them under a new id (`sohoa central enroll NEW_ID`), re-initialise it with that bundle and "
            "retry its refused scans, then `sohoa central device clear-clone DEVICE`")


class AbortedError(ProtocolError):
    """The device aborted the transfer."""

    hint = "the device gave up on this transfer; it will re-package if the document still exists"


class NoticeQuotaError(ProtocolError):
    """A device has too many documents catalogued from notices whose originals never came."""

    hint = ("the box's notices are refused until its originals arrive; its documents are still taken "
            "whole, with their original, as before")


class LateNoticeError(ProtocolError):
    """A notice for a transfer central already refused: nothing to catalogue."""

    hint = "the document's own transfer was refused; see that transfer's error"


class QuotaExceededError(ProtocolError):
    """The device is over a per-device quota (open transfers, bytes announced, new transfers per hour).

    Answered as a DEFERRED ack with ``retry_after``: the transfer is not refused, only not started yet;
    the edge keeps the document and announces it again later.
    """

    hint = ("the box opens more transfers, or faster, than [ingest] in central.toml allows; an honest "
            "box never should (see docs/DECISIONS.md): check it in the fleet view")
