"""Long calls off the GUI thread: `BackgroundTask` runs one call on a worker thread that the widget polls from a timer.

Standard library only; the function it runs must not touch Qt or MRML (the caller applies the result on the main
thread).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time


class BackgroundTask:
    """One call run on a worker thread; the GUI polls `done()` from a timer and never blocks on it.

    `cancel()` abandons the call: its result is dropped and `done()` turns true at once. Work that is already
    running (an HTTP request) finishes in the background; the backend's own cancel (training jobs) is separate.
    The function must not touch Qt or MRML; the caller applies the result on the main thread.
    """

    _executor: concurrent.futures.ThreadPoolExecutor | None = None
    _lock = threading.Lock()

    def __init__(self, description: str, fn, *args, **kwargs):
        self.description = description
        self.cancelled = False
        self.started = time.monotonic()
        with BackgroundTask._lock:
            if BackgroundTask._executor is None:
                BackgroundTask._executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="sslsegment")
            self._future = BackgroundTask._executor.submit(fn, *args, **kwargs)

    def done(self) -> bool:
        return self.cancelled or self._future.done()

    def cancel(self) -> None:
        self.cancelled = True
        self._future.cancel()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def outcome(self):
        """(result, None) or (None, exception) once done; (None, None) if cancelled."""
        if self.cancelled:
            return None, None
        exc = self._future.exception()
        return (None, exc) if exc is not None else (self._future.result(), None)

    def wait(self, timeout: float | None = None):
        """Block until done and return the result or raise its error (scripts and tests, never the GUI)."""
        return self._future.result(timeout)
