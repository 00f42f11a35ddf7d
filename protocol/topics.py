"""The sohoa/v1 topic scheme (DESIGN §3): build topics from typed parts and parse them back.

Topics start with a plain prefix (not ``$``) so ``#`` wildcards and ACL patterns match them.
Every id in a topic is validated, so a topic can never smuggle ``+``, ``#``, ``/`` or ``..``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from protocol.errors import DecodeError, TopicError
from protocol.names import check_device_id, check_tid

PREFIX = "sohoa/v1"
UP = f"{PREFIX}/up"
DOWN = f"{PREFIX}/down"
MAX_OFFSET = 1 << 48


class Kind(str, Enum):
    INIT = "init"
    SEG = "seg"
    FIN = "fin"
    ABORT = "abort"
    STATUS = "status"
    ACK = "ack"
    RECEIPT = "receipt"


UP_KINDS = frozenset({Kind.INIT, Kind.SEG, Kind.FIN, Kind.ABORT, Kind.STATUS})
DOWN_KINDS = frozenset({Kind.ACK, Kind.RECEIPT})


@dataclass(frozen=True, slots=True)
class Topic:
    kind: Kind
    device: str
    tid: str | None = None
    offset: int | None = None

    def __post_init__(self) -> None:
        check_device_id(self.device)
        needs_tid = self.kind in (Kind.INIT, Kind.SEG, Kind.FIN, Kind.ABORT)
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
    parts = topic.split("/")
    try:
        if parts[:2] != ["sohoa", "v1"] or len(parts) < 5:
            raise TopicError(f"not a sohoa/v1 topic: {topic!r}")
        direction, device = parts[2], parts[3]
        if direction == "down" and len(parts) == 5 and parts[4] in ("ack", "receipt"):
            return Topic(Kind(parts[4]), device)
        if direction != "up":
            raise TopicError(f"unknown topic {topic!r}")
        if len(parts) == 5 and parts[4] == "status":
            return Topic(Kind.STATUS, device)
        if len(parts) >= 7 and parts[4] == "tx":
            tid, kind = parts[5], parts[6]
            if kind == "seg" and len(parts) == 8:
                if not parts[7].isdigit() or (len(parts[7]) > 1 and parts[7][0] == "0"):
                    raise TopicError(f"bad segment offset in {topic!r}")
                return Topic(Kind.SEG, device, tid, int(parts[7]))
            if kind in ("init", "fin", "abort") and len(parts) == 7:
                return Topic(Kind(kind), device, tid)
        raise TopicError(f"unknown topic {topic!r}")
    except TopicError:
        raise
    except DecodeError as exc:
        raise TopicError(f"{exc} in topic {topic!r}") from exc


def device_up_filter(device: str) -> str:
    """Everything one device may publish (ACL write pattern)."""
    return f"{UP}/{check_device_id(device)}/#"


def device_down_filter(device: str) -> str:
    """Everything one device may read (ACL read pattern)."""
    return f"{DOWN}/{check_device_id(device)}/#"


CENTRAL_SHARED_FILTER = f"$share/central/{UP}/#"
