"""A last error is news: it is reported for a day or until acknowledged; alarms stay while true."""

from __future__ import annotations

from edge.alarms import ERROR_SHOWN_FOR_S, Alarms


async def test_last_error_expires_and_can_be_acknowledged() -> None:
    alarms = Alarms()
    alarms.error("Biên bản.txt: not a scan")
    at = alarms.last_error_at
    assert at is not None
    assert alarms.current_error(at + 60) == "Biên bản.txt: not a scan"
    assert alarms.current_error(at + ERROR_SHOWN_FOR_S + 1) is None
    alarms.acknowledge(at - 1)            # read before it happened: still news
    assert alarms.last_error is not None
    alarms.raise_("disk full")
    alarms.acknowledge(at + 1)
    assert alarms.last_error is None and alarms.current_error() is None
    assert alarms.active == {"disk full"}  # an alarm is a condition: only its cause clears it
