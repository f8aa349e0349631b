"""A one-line progress bar on stderr, redrawn in place when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``title [#######.........]  412/900  phase  23.4s``.

    On a terminal the bar is redrawn at most ten times a second; elsewhere (a log,
    a test's pipe) only the lines given to :meth:`note` are written.
    """

    width = 30

    def __init__(self, title: str, total: int, stream: TextIO | None = None) -> None:
        self.title = title
        self.total = max(total, 1)
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.started = time.monotonic()
        self._drawn = 0.0
        self._line = ""

    def show(self, done: int, phase: str, force: bool = False) -> None:
        """Redraw the bar: ``done`` of the total, in ``phase``."""
        now = time.monotonic()
        if not self.live or (not force and now - self._drawn < 0.1):
            return
        self._drawn = now
        filled = min(self.width, self.width * done // self.total)
        bar = "#" * filled + "." * (self.width - filled)
        self._line = (
            f"{self.title} [{bar}] {min(done, self.total)}/{self.total}  {phase}  {now - self.started:.1f}s"
        )
        self.stream.write("\r\x1b[2K" + self._line)
        self.stream.flush()

    def note(self, text: str) -> None:
        """Write ``text`` on a line of its own, above the bar."""
        if self.live:
            self.stream.write("\r\x1b[2K")
        self.stream.write(f"{self.title}: {text}\n")
        if self.live and self._line:
            self.stream.write(self._line)
        self.stream.flush()

    def close(self) -> None:
        """Leave the bar's last state on its own line."""
        if self.live and self._line:
            self.stream.write("\n")
            self.stream.flush()
