"""A background thread that repeats one step until stopped, and can be woken early."""

from __future__ import annotations

import threading


class BackgroundLoop:
    """Runs :meth:`step` in a daemon thread; ``step`` returns how long to wait before the next.

    :meth:`wake` cuts the wait short (new work arrived); :meth:`stop` lets the current step
    finish, then ends the thread.
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

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.step()
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()
