"""One event loop in a daemon thread that owns every session connection.

Sessions live longer than any one caller's event loop: a sync program has none, an
async one may end (``asyncio.run`` returns) while a session is still open, and the
exit and signal handlers run outside any loop. Running the WebSockets here lets the
sync and async APIs share one implementation, and lets a session be closed from
anywhere, at any time, including at interpreter exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Job(Generic[T]):
    """A coroutine running on the portal. Unlike its future, ``finished`` is set only
    once the coroutine has really stopped, so a cancelled job can be waited for."""

    def __init__(self, future: concurrent.futures.Future[T], finished: threading.Event) -> None:
        self.future = future
        self.finished = finished

    def result(self, timeout: float | None = None) -> T:
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.finished.is_set()

    def cancel(self, wait: float | None = 10.0) -> None:
        """Cancel and wait up to ``wait`` seconds for the coroutine to unwind."""
        self.future.cancel()
        self.finished.wait(wait)

    async def acancel(self, wait: float | None = 10.0) -> None:
        """``cancel`` without blocking the caller's event loop."""
        self.future.cancel()
        if not self.finished.is_set():
            await asyncio.to_thread(self.finished.wait, wait)


class _DaemonExecutor(concurrent.futures.ThreadPoolExecutor):
    """One daemon thread per call (the loop uses it for DNS lookups).

    The standard pool refuses work once the interpreter starts shutting down, which is
    exactly when the exit handler reconnects to a node by host name to close a session.
    """

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=run, name="inferledger-sdk-call", daemon=True).start()
        return future


class Portal:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                loop.set_default_executor(_DaemonExecutor())
                thread = threading.Thread(
                    target=loop.run_forever, name="inferledger-sdk", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def in_portal(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the portal loop; cancelling the future cancels it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def start(self, coro: Coroutine[Any, Any, T]) -> Job[T]:
        """Schedule ``coro`` and return a Job that can be cancelled and waited for."""
        finished = threading.Event()

        async def run() -> T:
            try:
                return await coro
            finally:
                finished.set()

        return Job(self.submit(run()), finished)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the portal loop and block until it finishes (sync callers)."""
        if self.in_portal():
            coro.close()
            raise RuntimeError("blocking call from inside the SDK's event loop")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the portal loop from any other event loop (async callers)."""
        if self.in_portal():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))


_default: Portal | None = None
_default_lock = threading.Lock()


def portal() -> Portal:
    """The process's portal, started on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Portal()
        return _default
