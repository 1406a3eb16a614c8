"""The run's progress line: one line on a timer, readable in a terminal and in Kubernetes logs alike.

A run used to print a line per finished batch (62,500 lines for a million images at batch 16). Now the driver feeds
:class:`ProgressLine` the counts each finished batch reports, and it prints at most one line per ``interval_s``
(``run.progress_interval_s``), plus one at the end::

    progress  1,200/10,000 images (12.0%)  8.31 images/s  ETA 17m39s  3 errors

Images per second is measured over this attempt (resumed images are counted as done, not as speed); the ETA
divides what is left by that rate. Imports nothing heavy.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """``3725.0`` → ``"1h02m05s"``; ``59.4`` → ``"59s"``."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


class ProgressLine:
    """Counts images done and prints a line at most every ``interval_s`` seconds.

    Args:
        total: images this attempt has to process (rows of the shards still to do); None when unknown (the rows of
            a user's dataset given to ``clipmaps.pipeline.write.write_outputs``): the line shows no share or ETA.
        say: where lines go (the CLI prints them; the library default logs them).
        interval_s: least seconds between two lines (the first comes after ``interval_s`` too).
        done_before: images of shards finished by earlier attempts, shown as done but not in the rate.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        total: int | None,
        say: Callable[[str], None],
        *,
        interval_s: float = 30.0,
        done_before: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = None if total is None else int(total)
        self.say = say
        self.interval_s = float(interval_s)
        self.done_before = int(done_before)
        self.clock = clock
        self.rows = 0
        self.errors = 0
        self.lines = 0
        self._start = clock()
        self._last = self._start
        self._said: tuple[int, int] | None = None

    def update(self, rows: int, errors: int = 0) -> None:
        """Add a finished batch's ``rows`` (images) and ``errors`` (error rows); print if the interval has passed."""
        self.rows += int(rows)
        self.errors += int(errors)
        now = self.clock()
        if now - self._last >= self.interval_s:
            self._emit(now)

    def finish(self) -> None:
        """Print the final line: always, unless the last line printed already said the same counts (a timer line
        that came with the last batch)."""
        if self._said != (self.rows, self.errors) or not self.lines:
            self._emit(self.clock())

    def line(self, now: float | None = None) -> str:
        """The progress line as of ``now``."""
        now = self.clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = self.rows / elapsed
        done = self.done_before + self.rows
        if self.total is None:
            return f"progress  {done:,} images  {rate:.2f} images/s  {self.errors:,} errors"
        whole = self.done_before + self.total
        pct = f" ({100.0 * done / whole:.1f}%)" if whole else ""
        left = max(self.total - self.rows, 0)
        eta = format_duration(left / rate) if rate > 0 and left else "-" if left else "0s"
        return f"progress  {done:,}/{whole:,} images{pct}  {rate:.2f} images/s  ETA {eta}  {self.errors:,} errors"

    def _emit(self, now: float) -> None:
        self.say(self.line(now))
        self.lines += 1
        self._last = now
        self._said = (self.rows, self.errors)


__all__ = ["ProgressLine", "format_duration"]
