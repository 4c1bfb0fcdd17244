"""A background thread that repeats one step until stopped, and can be woken early."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

#: seconds before a step that raised runs again, doubling to the most
ERROR_WAIT_S, ERROR_WAIT_MAX_S = 2.0, 60.0


class BackgroundLoop:
    """Runs :meth:`step` in a daemon thread; ``step`` returns how long to wait before the next.

    :meth:`wake` cuts the wait short (new work arrived); :meth:`stop` lets the current step
    finish, then ends the thread. A step that raises is logged and runs again after a wait
    that doubles while it goes on failing (a database locked by another process, a killed
    fork server): the thread never ends but by :meth:`stop`, and :meth:`recover` puts right
    what the failed step left.
    """

    thread_name = "background-loop"

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> float:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def request_stop(self) -> None:
        """Ask the loop to end after its current step, without waiting for it."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float | None = 30) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def stopping(self) -> bool:
        """Whether the loop was asked to stop (a long step can end early)."""
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def recover(self) -> None:
        """Called after a step raised, before the next (nothing by default)."""

    def _run(self) -> None:
        errors = 0
        while not self._stop.is_set():
            try:
                wait = self.step()
                if errors:
                    log.info("%s: works again after %d failed step(s)", self.thread_name, errors)
                errors = 0
            except Exception:
                errors += 1
                wait = min(ERROR_WAIT_MAX_S, ERROR_WAIT_S * 2 ** (errors - 1))
                log.exception(
                    "%s: step failed (%d in a row); trying again in %g s",
                    self.thread_name, errors, wait,
                )  # fmt: skip
                try:
                    self.recover()
                except Exception:
                    log.exception("%s: recovering after the failed step failed", self.thread_name)
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()
