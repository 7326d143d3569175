"""Close open sessions when the program exits or is interrupted (R1: no deposit waits).

Every open ``Session`` registers here. At interpreter exit, and on SIGINT or SIGTERM,
each one still open is closed (the node settles it, or the depositor asks the chain to
close it), then the previous handler runs: Ctrl-C still raises KeyboardInterrupt and
SIGTERM still ends the program. A second signal while closing skips the cleanup.
"""

from __future__ import annotations

import atexit
import logging
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inferledger.sdk.session import Session

log = logging.getLogger("inferledger.sdk")

EXIT_TIMEOUT = 20.0  # seconds to wait for each node's `settled` frame at exit
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_sessions: dict[int, Session] = {}
_lock = threading.Lock()
_atexit_registered = False
_previous: dict[int, Any] = {}
_closing = threading.Event()


def register(session: Session) -> None:
    """Close ``session`` automatically at exit or on a signal unless it is closed first."""
    global _atexit_registered
    with _lock:
        _sessions[id(session)] = session
        if not _atexit_registered:
            atexit.register(close_all)
            _atexit_registered = True
    _install_signal_handlers()


def unregister(session: Session) -> None:
    with _lock:
        _sessions.pop(id(session), None)


def open_sessions() -> list[Session]:
    with _lock:
        return list(_sessions.values())


def close_all(timeout: float = EXIT_TIMEOUT) -> None:
    """Close every registered session; failures are reported on stderr, never raised."""
    for session in open_sessions():
        try:
            settlement = session.close(timeout=timeout)
        except BaseException as exc:  # exiting: report and move on to the next session
            print(
                f"inferledger: could not close session {session.id} at exit: {exc}",
                file=sys.stderr,
            )
            unregister(session)
            continue
        print(
            f"inferledger: closed session {session.id} at exit: {settlement.status}"
            + (f" ({settlement.message})" if settlement.message else ""),
            file=sys.stderr,
        )


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; atexit still covers us
    for signum in HANDLED_SIGNALS:
        current = signal.getsignal(signum)
        if current is _on_signal:
            continue
        _previous[signum] = current
        signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if open_sessions() and not _closing.is_set():
        _closing.set()
        try:
            # In a thread, so a lock the interrupted code holds cannot deadlock the cleanup;
            # join() stays interruptible by a second signal.
            worker = threading.Thread(target=close_all, name="inferledger-close", daemon=True)
            worker.start()
            worker.join()
        finally:
            _closing.clear()
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    elif signum == signal.SIGINT:
        raise KeyboardInterrupt
    else:
        raise SystemExit(128 + signum)
