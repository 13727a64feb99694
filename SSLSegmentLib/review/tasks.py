"""Long calls off the GUI thread: `BackgroundTask` runs one call on a worker thread that the widget polls from a timer.

Standard library only; the function it runs must not touch Qt or MRML (the caller applies the result on the main
thread).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time


class BackgroundTask:
    """One call run on its own daemon thread; the GUI polls `done()` from a timer and never blocks on it.

    `cancel()` abandons the call: its result is dropped and `done()` turns true at once. Work that is already
    running (an HTTP request) finishes in the background, and changes nothing the GUI shows, because the function
    must not touch Qt, MRML or the review session's state (the caller applies the result on the main thread; the
    session's fetch_*/send_* halves are such functions). Each task has its own thread, so abandoned calls never hold
    up the next one, and a daemon thread never holds up closing the application.
    """

    def __init__(self, description: str, fn, *args, **kwargs):
        self.description = description
        self.cancelled = False
        self.started = time.monotonic()
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True,
                                        name=f"sslsegment-{description[:40]}")
        self._thread.start()

    def _run(self, fn, args, kwargs) -> None:
        if not self._future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the GUI thread through outcome()
            self._future.set_exception(exc)
        else:
            self._future.set_result(result)

    def done(self) -> bool:
        return self.cancelled or self._future.done()

    def cancel(self) -> None:
        self.cancelled = True

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def outcome(self):
        """(result, None) or (None, exception) once done; (None, None) if cancelled."""
        if self.cancelled:
            return None, None
        exc = self._future.exception()
        return (None, exc) if exc is not None else (self._future.result(), None)

    def wait(self, timeout: float | None = None):
        """Block until the call returns (even a cancelled one) and return its result or raise its error (scripts
        and tests, never the GUI)."""
        return self._future.result(timeout)

    @property
    def daemon(self) -> bool:
        return self._thread.daemon
