"""The one writer: a thread that owns the catalog connection and commits groups of calls.

Datasette's write thread (``with conn: conn.execute("BEGIN IMMEDIATE"); task.fn(conn)``), with group
commit: every call waiting when the thread comes round runs in one transaction, each inside its own
savepoint (a call that raises is rolled back alone and its caller gets the exception), then
``before_commit`` (the segment journal's fsync) and one COMMIT. Functions given the connection never
commit. N batches and assemblies cost one journal fsync and one WAL fsync together.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from central import catalog
from central.ingest.store import SqliteIngestStore

log = logging.getLogger("sohoa.central.writer")

T = TypeVar("T")
_Call = tuple[Callable[[Any], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]


class GroupWriter:
    """``call(fn)`` runs ``fn(store)`` in the writer's next group transaction.

    ``connect`` opens the connection (on the writer's thread) and ``store`` wraps it in the interface
    the calls get (``central.ingest.store``); ``begin`` starts a write transaction: SQLite's
    ``BEGIN IMMEDIATE`` takes the write lock at once, so two workers on one file queue instead of
    failing their upgrade.
    """

    def __init__(self, path: Path | None = None, *, before_commit: Callable[[], None] = lambda: None,
                 name: str = "catalog-writer", max_group: int = 256,
                 connect: Callable[[], Any] | None = None, store: Callable[[Any], Any] = SqliteIngestStore,
                 begin: str = "BEGIN IMMEDIATE") -> None:
        if connect is None:
            assert path is not None
            connect = functools.partial(catalog.connect, path)
        self._connect = connect
        self._store = store
        self._begin = begin
        self._before_commit = before_commit
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._opened: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self.commits = 0
        self.calls = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        failure = self._opened.get()
        if failure is not None:
            self._thread.join()
            raise failure

    async def call(self, fn: Callable[[Any], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, future, loop))
        return await future

    async def close(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        try:
            conn = self._connect()
            store = self._store(conn)
        except BaseException as exc:
            self._opened.put(exc)
            return
        self._opened.put(None)
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                group = [first]
                stop = False
                while len(group) < self._max_group:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    group.append(item)
                self._run_group(conn, store, group)
                if stop:
                    return
        finally:
            conn.close()

    def _run_group(self, conn: Any, store: Any, group: list[_Call]) -> None:
        results: list[tuple[_Call, Any, BaseException | None]] = []
        try:
            conn.execute(self._begin)
            for call in group:
                conn.execute("SAVEPOINT call")
                try:
                    value = call[0](store)
                except Exception as exc:   # handed to the caller, whatever it is
                    conn.execute("ROLLBACK TO SAVEPOINT call")
                    conn.execute("RELEASE SAVEPOINT call")
                    results.append((call, None, exc))
                else:
                    conn.execute("RELEASE SAVEPOINT call")
                    results.append((call, value, None))
            self._before_commit()
            conn.execute("COMMIT")
            self.commits += 1
            self.calls += len(group)
        except BaseException as exc:
            # The commit (or the journal's fsync) failed: nothing of the group is durable.
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            log.error("group of %d writes not committed: %s", len(group), exc)  # noqa: TRY400 - the cause is enough
            results = [(call, None, exc) for call in group]
        for (_fn, future, loop), value, error in results:
            loop.call_soon_threadsafe(_settle, future, value, error)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
