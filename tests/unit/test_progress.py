"""The run's progress line: on a timer, not per batch; rate and ETA over this attempt."""

from __future__ import annotations

from clipmaps.pipeline.progress import ProgressLine, format_duration


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_one_line_per_interval_whatever_the_number_of_batches():
    clock, lines = Clock(), []
    p = ProgressLine(10_000, lines.append, interval_s=30, clock=clock)
    for _ in range(625):  # 10,000 images in batches of 16 over 125 s
        clock.t += 0.2
        p.update(16, 0)
    p.finish()
    assert len(lines) == 5  # at 30, 60, 90, 120 s and the end, not 625
    assert lines[-1] == "progress  10,000/10,000 images (100.0%)  80.00 images/s  ETA 0s  0 errors"


def test_rate_and_eta_count_this_attempt_only():
    clock, lines = Clock(), []
    p = ProgressLine(1000, lines.append, interval_s=10, done_before=9000, clock=clock)
    clock.t += 10
    p.update(100, 3)
    assert lines == ["progress  9,100/10,000 images (91.0%)  10.00 images/s  ETA 1m30s  3 errors"]


def test_nothing_to_do_says_so_once():
    lines = []
    p = ProgressLine(0, lines.append, clock=Clock())
    p.finish()
    assert lines == ["progress  0/0 images  0.00 images/s  ETA 0s  0 errors"]


def test_durations():
    assert [format_duration(s) for s in (0, 59.4, 61, 3725)] == ["0s", "59s", "1m01s", "1h02m05s"]


def test_the_final_line_is_not_a_repeat_of_a_timer_line_with_the_same_counts():
    clock, lines = Clock(), []
    p = ProgressLine(4, lines.append, interval_s=30, clock=clock)
    clock.t += 39  # the only batch comes after the interval: its timer line already says 4/4
    p.update(4, 0)
    clock.t += 1
    p.finish()
    assert lines == ["progress  4/4 images (100.0%)  0.10 images/s  ETA 0s  0 errors"]
