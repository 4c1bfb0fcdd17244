"""Refusals the node logs and audits, reported once a minute per sender and reason.

A sender that is refused keeps trying: a scanner with the wrong called AE title resends each
image, a router with an expired password retries every few seconds, a port scanner opens
connections as fast as they are closed. One log line and one Security Alert per try buries the
log and floods the audit repository. Here the first refusal of a kind (its ``key``: who and
why) is reported at once; those that follow within :attr:`Refusals.every_s` are counted and
reported together, as one line and one alert with their number, when the window ends
(:meth:`Refusals.flush`, from the node's main loop) or when the node stops. Nothing is lost:
every refusal is in a count.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Window:
    since: float
    logged: str
    audited: str | None
    host: str
    calling: str
    count: int = 0  # refused since ``since`` and not reported yet


class Refusals:
    """``audit(calling, host, reason)``: what records a Security Alert (the node's audit
    trail); none, refusals are only logged."""

    #: seconds between two reports of one kind of refusal
    every_s = 60.0
    #: kinds remembered at most (one per sender and reason): past it, refusals of a new kind
    #: are reported one by one rather than memory growing with the addresses that call
    most_kept = 4096

    def __init__(
        self,
        audit: Callable[[str, str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audit = audit
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}
        self._lock = threading.Lock()

    def report(
        self, key: Hashable, logged: str, audited: str | None = None, host: str = "",
        calling: str = "",
    ) -> None:  # fmt: skip
        """One refusal of kind ``key``: ``logged`` is its log line, ``audited`` the reason of
        its Security Alert (none: not audited), from ``calling`` (an AE title) at ``host``."""
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window.since < self.every_s:
                window.count += 1
                window.logged, window.audited = logged, audited  # the latest words
                return
            earlier = window.count if window is not None else 0  # a window not flushed yet
            if window is not None or len(self._windows) < self.most_kept:
                self._windows[key] = _Window(now, logged, audited, host, calling)
            before = f" (and {earlier} more in the {now - window.since:.0f} s before)" if (
                window is not None and earlier) else ""  # fmt: skip
        self._say(logged, audited, host, calling, before)

    def flush(self, final: bool = False) -> None:
        """Report the refusals counted in windows that have ended (every window, ``final``:
        the node stops). A kind refused again within its window keeps one, so a sender that
        goes on is reported once per window; the others are forgotten."""
        now = self._clock()
        due: list[tuple[_Window, float]] = []
        with self._lock:
            for key, window in list(self._windows.items()):
                if not final and now - window.since < self.every_s:
                    continue
                if window.count and not final:
                    self._windows[key] = dataclasses.replace(window, since=now, count=0)
                else:
                    del self._windows[key]
                if window.count:
                    due.append((window, now - window.since))
        for w, elapsed in due:
            times = "time" if w.count == 1 else "times"
            said = f" ({w.count} more {times} in the last {elapsed:.0f} s)"
            self._say(w.logged, w.audited, w.host, w.calling, said)

    def _say(self, logged: str, audited: str | None, host: str, calling: str, suffix: str) -> None:
        """Log (and audit) one report; ``suffix`` says how many it stands for."""
        log.warning("%s%s", logged, suffix)
        if audited is not None and self._audit is not None:
            self._audit(calling, host, audited + suffix)
