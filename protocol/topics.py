"""The sohoa/v1 topic scheme (DESIGN §3): build topics from typed parts and parse them back.

Topics start with a plain prefix (not ``$``) so ``#`` wildcards and ACL patterns match them.
Every id in a topic is validated, so a topic can never smuggle ``+``, ``#``, ``/`` or ``..``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import DecodeError, TopicError
from protocol.names import check_device_id, check_tid

PREFIX = "sohoa/v1"
UP = f"{PREFIX}/up"
DOWN = f"{PREFIX}/down"
MAX_OFFSET = 1 << 48
# ASCII digits only, no leading zeros, at most 15 digits (MAX_OFFSET has 15): ``str.isdigit`` would
# accept "²" and Arabic-Indic digits, and ``int`` refuses strings over 4300 digits with ValueError.
_OFFSET_RE = re.compile(r"0|[1-9][0-9]{0,14}")


class Kind(StrEnum):
    INIT = "init"
    SEG = "seg"
    FIN = "fin"
    ABORT = "abort"
    STATUS = "status"
    ACK = "ack"
    RECEIPT = "receipt"
    NOTICE = "notice"     # up: a document's text and metadata, ahead of its original (protocol.notice)
    NOTED = "noted"       # down: central's answer to a notice (never a receipt)


UP_KINDS = frozenset({Kind.INIT, Kind.SEG, Kind.FIN, Kind.ABORT, Kind.STATUS, Kind.NOTICE})
DOWN_KINDS = frozenset({Kind.ACK, Kind.RECEIPT, Kind.NOTED})
_TX_KINDS = (Kind.INIT, Kind.SEG, Kind.FIN, Kind.ABORT, Kind.NOTICE)


@dataclass(frozen=True, slots=True)
class Topic:
    kind: Kind
    device: str
    tid: str | None = None
    offset: int | None = None

    def __post_init__(self) -> None:
        check_device_id(self.device)
        needs_tid = self.kind in _TX_KINDS
        if needs_tid != (self.tid is not None):
            raise TopicError(f"{self.kind.value} topic {'needs' if needs_tid else 'takes no'} tid")
        if self.tid is not None:
            check_tid(self.tid)
        if (self.kind is Kind.SEG) != (self.offset is not None):
            raise TopicError("only seg topics carry an offset")
        if self.offset is not None and not 0 <= self.offset < MAX_OFFSET:
            raise TopicError(f"offset {self.offset} out of range")

    def __str__(self) -> str:
        if self.kind in DOWN_KINDS:
            return f"{DOWN}/{self.device}/{self.kind.value}"
        if self.kind is Kind.STATUS:
            return f"{UP}/{self.device}/status"
        base = f"{UP}/{self.device}/tx/{self.tid}/{self.kind.value}"
        return f"{base}/{self.offset}" if self.kind is Kind.SEG else base


def parse_topic(topic: str) -> Topic:
    """Parse a concrete topic; raise :class:`TopicError` for anything outside the scheme."""
    try:
        return _parse_topic(topic)
    except TopicError:
        raise
    except DecodeError as exc:
        raise TopicError(f"{exc} in topic {topic[:200]!r}") from exc


def _unknown(topic: str) -> TopicError:
    return TopicError(f"unknown topic {topic[:200]!r}")


def _parse_topic(topic: str) -> Topic:
    parts = topic.split("/")
    if parts[:2] != ["sohoa", "v1"] or len(parts) < 5:
        raise TopicError(f"not a sohoa/v1 topic: {topic[:200]!r}")
    direction, device = parts[2], parts[3]
    if direction == "down" and len(parts) == 5 and parts[4] in ("ack", "receipt", "noted"):
        return Topic(Kind(parts[4]), device)
    if direction != "up":
        raise _unknown(topic)
    if len(parts) == 5 and parts[4] == "status":
        return Topic(Kind.STATUS, device)
    if len(parts) >= 7 and parts[4] == "tx":
        tid, kind = parts[5], parts[6]
        if kind == "seg" and len(parts) == 8:
            if not _OFFSET_RE.fullmatch(parts[7]):
                raise TopicError(f"bad segment offset in {topic[:200]!r}")
            return Topic(Kind.SEG, device, tid, int(parts[7]))
        if kind in ("init", "fin", "abort", "notice") and len(parts) == 7:
            return Topic(Kind(kind), device, tid)
    raise _unknown(topic)


def device_up_filter(device: str) -> str:
    """Everything one device may publish (ACL write pattern)."""
    return f"{UP}/{check_device_id(device)}/#"


def device_down_filter(device: str) -> str:
    """Everything one device may read (ACL read pattern)."""
    return f"{DOWN}/{check_device_id(device)}/#"


CENTRAL_SHARED_FILTER = f"$share/central/{UP}/#"
