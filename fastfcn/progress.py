"""The one progress bar of the CLI (train, eval, segment): a line on stderr.

On a terminal the line is redrawn in place (``\\r`` and erase-to-end); otherwise (logs, CI,
pipes) a plain line is written at every tenth of the work and at the end, so a log of a
10,000-image run holds 11 lines instead of 10,000. Torch-free, so the CLI can show it
before any model loads.
"""

from __future__ import annotations

import sys
import time


def hms(s: float) -> str:
    """Seconds as ``MM:SS`` (``H:MM:SS`` from an hour on); ``--:--`` when unknown."""
    if s != s or s == float("inf"):
        return "--:--"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """``label [#####.....] done/total text rate unit/s eta MM:SS`` on ``stream`` (stderr).

    total: the number of steps; label: a word in front (the command or the model);
    unit: what a step is ("it", "img"); enabled: False draws nothing (``--quiet``, ``--json``).
    ``start`` is the step a resumed run began at, so the rate counts only this run's steps.
    """

    def __init__(self, total: int, label: str = "", enabled: bool = True, stream=None,
                 unit: str = "it", width: int = 24):
        self.total, self.label, self.enabled = max(1, total), label, enabled
        self.unit, self.width = unit, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.start = 0
        self.done = 0
        self._last_tenth = -1

    def step(self, text: str = "") -> None:
        """One more step done."""
        self.update(self.done + 1, text)

    def update(self, done: int, text: str = "") -> None:
        """``done`` steps of ``total`` are finished."""
        self.done = done
        if not self.enabled:
            return
        frac = min(1.0, done / self.total)
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        head = f"{self.label} " if self.label else ""
        line = f"{head}[{bar}] {done}/{self.total} {text} {rate:.2f} {self.unit}/s eta {hms(eta)}"
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
            if done >= self.total:
                self.stream.write("\n")
        elif int(frac * 10) != self._last_tenth or done >= self.total:
            self._last_tenth = int(frac * 10)
            self.stream.write(line + "\n")
        else:
            return
        self.stream.flush()

    def interrupt(self) -> str:
        """What to print before a message so that it does not land on the bar's line."""
        return "\n" if self.tty and self.enabled and 0 < self.done < self.total else ""
