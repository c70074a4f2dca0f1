"""The one progress bar of the CLI (train, eval, segment, video): a line on stderr.

On a terminal the line is redrawn in place (``\\r`` and erase-to-end); otherwise (logs, CI,
pipes) a plain line is written at every tenth of the work and at the end, so a log of a
10,000-image run holds 11 lines instead of 10,000. Work of unknown length (a video whose
container does not say its frame count) shows a count instead of a bar, logged at most once
every ``LOG_EVERY_S`` seconds. Torch-free, so the CLI can show it before any model loads.
"""

from __future__ import annotations

import sys
import time

LOG_EVERY_S = 10.0  # unknown totals, not on a terminal: one line per this many seconds


def hms(s: float) -> str:
    """Seconds as ``MM:SS`` (``H:MM:SS`` from an hour on); ``--:--`` when unknown."""
    if s != s or s == float("inf"):
        return "--:--"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """``label [#####.....] done/total text rate unit/s eta MM:SS`` on ``stream`` (stderr).

    total: the number of steps, None when unknown (``label done unit ...``, no bar, no eta);
    an estimate may be exceeded: the line then stays at its last drawing until ``finish``.
    label: a word in front (the command or the model); unit: what a step is ("it", "img");
    enabled: False draws nothing (``--quiet``, ``--json``). ``start`` is the step a resumed
    run began at, so the rate counts only this run's steps.
    """

    def __init__(self, total: int | None, label: str = "", enabled: bool = True, stream=None,
                 unit: str = "it", width: int = 24):
        self.total = None if total is None else max(1, total)
        self.label, self.enabled = label, enabled
        self.unit, self.width = unit, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.start = 0
        self.done = 0
        self._last_tenth = -1
        self._last_log = self.t0
        self._ended = False  # the line is finished (a newline written on a terminal)
        self._text = ""

    def step(self, text: str = "", n: int = 1) -> None:
        """``n`` more steps done."""
        self.update(self.done + n, text)

    def update(self, done: int, text: str = "") -> None:
        """``done`` steps of ``total`` are finished."""
        self.done, self._text = done, text
        if not self.enabled or self._ended:
            return
        end = self.total is not None and done >= self.total
        if self.tty:
            self._write("\r" + self._line() + "\033[K" + ("\n" if end else ""))
            self._ended = end
        elif self._log_due() or end:
            self._write(self._line() + "\n")
            self._ended = end

    def finish(self) -> None:
        """The work is over (also where fewer or more steps than ``total`` were done): draw the
        final line once, and end it on a terminal."""
        if not self.enabled or self._ended or not self.done:
            return
        self._write(("\r" + self._line() + "\033[K\n") if self.tty else self._line() + "\n")
        self._ended = True

    def _log_due(self) -> bool:
        """Not on a terminal: at every tenth of a known total, every LOG_EVERY_S otherwise."""
        if self.total is None:
            now = time.perf_counter()
            if now - self._last_log < LOG_EVERY_S:
                return False
            self._last_log = now
            return True
        tenth = int(min(1.0, self.done / self.total) * 10)
        if tenth == self._last_tenth:
            return False
        self._last_tenth = tenth
        return True

    def _line(self) -> str:
        done = self.done
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        head = f"{self.label} " if self.label else ""
        if self.total is None:
            return f"{head}{done} {self.unit} {self._text} {rate:.2f} {self.unit}/s"
        filled = int(min(1.0, done / self.total) * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        eta = max(self.total - done, 0) / rate if rate > 0 else float("nan")
        return f"{head}[{bar}] {done}/{self.total} {self._text} {rate:.2f} {self.unit}/s eta {hms(eta)}"

    def _write(self, s: str) -> None:
        self.stream.write(s)
        self.stream.flush()

    def interrupt(self) -> str:
        """What to print before a message so that it does not land on the bar's line."""
        return "\n" if self.tty and self.enabled and self.done > 0 and not self._ended else ""
