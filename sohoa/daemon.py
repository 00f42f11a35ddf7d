"""``sohoa edge run`` and ``sohoa central run`` as systemd services: readiness, watchdog, signals, logs.

- sd_notify is the socket protocol of sd_notify(3) spoken directly: one datagram to
  ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). It is a stable, documented
  interface of a dozen lines; the PyPI ``sdnotify`` package is unmaintained since 2017 and
  ``systemd-python`` needs libsystemd headers to build on every box.
- READY=1 is sent once the service is really up (edge: intake watching and outbox open; central:
  HTTP listening), STOPPING=1 when SIGTERM arrives, RELOADING=1 … READY=1 around a SIGHUP reload.
- The watchdog ping (WATCHDOG=1 every half ``WATCHDOG_USEC``) runs on the service's event loop and
  only while the service task is alive, so a wedged loop or a dead service stops the pings and
  systemd restarts the unit.
- SIGHUP re-reads the configuration and applies what can change in place (log level, and what the
  service's own ``reload`` accepts); a bad file is logged and the running config kept. It never
  stops the service. SIGTERM/SIGINT cancel the service, which closes its outbox/database and MQTT
  session, within ``drain_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("sohoa.daemon")

LOG_FORMATS = ("auto", "text", "journal", "json")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
# syslog priorities journald reads from a "<N>" line prefix (sd-daemon(3)).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
DRAIN_TIMEOUT_S = 20.0


# -- sd_notify ---------------------------------------------------------------------------------
def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``READY=1``) to systemd; False when not run by systemd or on error."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError as exc:
        # Never take the service down over a notification.
        log.debug("sd_notify %s failed: %s", states, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``), or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 1e6 / 2, 0.05)
    except ValueError:
        return None


# -- logging -----------------------------------------------------------------------------------
class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``: journald adds the time and parses the priority prefix."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        priority = _PRIORITY.get(record.levelno, 6)
        # Every line carries the prefix, so a traceback keeps its priority line by line.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """True when stderr is the journal stream systemd connected (``$JOURNAL_STREAM`` = dev:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        info = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def configure_logging(level: int, log_format: str = "auto", *, stream: TextIO | None = None) -> str:
    """Install one stderr handler on the root logger; returns the format actually used."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    chosen = log_format
    if chosen == "auto":
        chosen = "journal" if stderr_is_journal(stream) else "text"
    formatter: logging.Formatter
    if chosen == "journal":
        formatter = JournalFormatter()
    elif chosen == "json":
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return chosen


def level_of(name: str) -> int:
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"log level {name!r}: use one of {', '.join(LEVELS)}") from None


def set_level(level: int) -> None:
    root = logging.getLogger()
    if root.level != level:
        root.setLevel(level)
        log.info("log level now %s", logging.getLevelName(level).lower())


# -- the service runner ------------------------------------------------------------------------
async def supervise(main: Coroutine[Any, Any, None], *, ready: asyncio.Event,
                    reload: Callable[[], str], name: str,
                    drain_timeout: float = DRAIN_TIMEOUT_S) -> None:
    """Run ``main`` as a service until SIGTERM/SIGINT; SIGHUP calls ``reload`` (never stops it).

    ``reload`` returns a one-line summary of what changed and raises ValueError (or OSError) to
    refuse a bad configuration, which is then logged while the running one is kept.
    An exception from ``main`` propagates (the command line turns it into an exit code).
    """
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(main, name=name)
    stopping = asyncio.Event()

    def stop(signum: int) -> None:
        if not stopping.is_set():
            log.info("%s: stopping (%s)", name, signal.Signals(signum).name)
            notify("STOPPING=1")
            stopping.set()
            task.cancel()

    def hangup() -> None:
        notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            summary = reload()
        except (ValueError, OSError) as exc:
            # A refused file is the operator's to fix, not a bug: one line, no traceback.
            log.error("reload refused, the running configuration is kept: %s", exc)  # noqa: TRY400
        else:
            log.info("reloaded: %s", summary)
        finally:
            notify("READY=1", "STATUS=running")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    loop.add_signal_handler(signal.SIGHUP, hangup)
    watchdog = asyncio.create_task(_watchdog(task), name=f"{name}-watchdog")
    announce = asyncio.create_task(_announce_ready(ready, name), name=f"{name}-ready")
    try:
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not stopping.is_set():
                raise
            # The service is cancelling itself (closing its database and broker session).
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await task
            if not task.done():
                log.warning("%s did not stop within %.0f s; exiting anyway", name, drain_timeout)
        else:
            if not stopping.is_set():
                raise RuntimeError(f"{name} ended by itself")
    finally:
        for helper in (watchdog, announce):
            helper.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


async def _announce_ready(ready: asyncio.Event, name: str) -> None:
    await ready.wait()
    notify("READY=1", f"STATUS={name} running", f"MAINPID={os.getpid()}")
    log.info("%s ready", name)


async def _watchdog(service: asyncio.Task[None]) -> None:
    interval = watchdog_interval()
    if interval is None:
        return
    while not service.done():
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


# -- the two services --------------------------------------------------------------------------
def run_edge(home: Path, *, verbose: bool) -> int:
    """``sohoa edge run``: the edge service under ``supervise``."""
    from edge import config as edge_config  # noqa: PLC0415 - keeps `sohoa --help` fast
    from edge.service import EdgeService  # noqa: PLC0415 - keeps `sohoa --help` fast

    config = edge_config.load(home)
    _apply_level(config.log.level, verbose)

    async def main() -> None:
        service = EdgeService(config)

        def reload() -> str:
            fresh = edge_config.load(home)   # ConfigError is a ValueError: refused, kept
            _apply_level(fresh.log.level, verbose)
            return service.reload(fresh)

        await supervise(service.run(), ready=service.ready, reload=reload, name="sohoa-edge")

    asyncio.run(main())
    return 0


def run_central(home: Path, *, verbose: bool, worker: str | None = None) -> int:
    """``sohoa central run [--worker NAME]``: ingest + HTTP under ``supervise``."""
    from central import worker as central_worker  # noqa: PLC0415 - keeps `sohoa --help` fast
    from central.config import load_config  # noqa: PLC0415 - keeps `sohoa --help` fast
    from central.errors import CentralError  # noqa: PLC0415 - keeps `sohoa --help` fast

    config = central_worker.as_worker(load_config(home), worker)   # a bad name fails before any loop starts
    _apply_level(config.log_level, verbose)

    async def main() -> None:
        ready = asyncio.Event()

        def reload() -> str:
            try:
                fresh = load_config(home)
            except CentralError as exc:
                raise ValueError(f"{exc} ({exc.hint})") from exc
            _apply_level(fresh.log_level, verbose)
            return f"log level {fresh.log_level}; other central.toml changes need a restart"

        await supervise(central_worker.serve(home, ready=ready, worker=worker), ready=ready, reload=reload,
                        name=config.broker.client_id)

    asyncio.run(main())
    return 0


def _apply_level(name: str, verbose: bool) -> None:
    set_level(logging.DEBUG if verbose else level_of(name))
