"""Progress for people: the ETA's pace, the progress bar on a terminal and in a log file, log records
beside the bar, and which loggers ``-v`` opens."""
import contextlib
import io
import logging
import math

import pytest

from streampetr_plugin.cli.common import PROJECT_LOGGERS, setup_logging
from streampetr_plugin.training.metrics_log import IterationPace, ProgressAwareHandler, ProgressBar


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def screen(text: str) -> list:
    """The lines a terminal shows after ``text``: a carriage return moves to the start of the line,
    later characters overwrite earlier ones."""
    lines, column = [[]], 0
    for char in text:
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append([])
            column = 0
        else:
            line = lines[-1]
            line.extend(" " * (column + 1 - len(line)))
            line[column] = char
            column += 1
    return ["".join(line).rstrip() for line in lines]


def test_pace_is_the_plain_mean_until_the_window_is_full():
    pace = IterationPace(window=100)
    pace.add(5.0, 10)  # 0.5 s per iteration
    pace.add(2.0, 10)  # 0.2 s per iteration
    assert pace.seconds_per_iteration == pytest.approx(7.0 / 20)
    assert pace.remaining(100) == pytest.approx(35.0)


def test_pace_barely_moves_for_one_slow_interval_after_a_long_steady_run():
    pace = IterationPace(window=100)
    for _ in range(30):
        pace.add(2.0, 10)  # 300 iterations at 0.2 s
    assert pace.seconds_per_iteration == pytest.approx(0.2)
    pace.add(20.0, 10)  # 10 iterations at 2 s (a passing load)
    # exponential average with time constant 100: the slow ten weigh 1 - 0.99^10 = 9.6 %
    expected = 0.2 + (1 - 0.99**10) * (2.0 - 0.2)
    assert pace.seconds_per_iteration == pytest.approx(expected)
    assert pace.seconds_per_iteration < 0.4  # the last ten alone would say 2.0


def test_pace_is_unknown_before_the_first_interval():
    assert math.isnan(IterationPace().remaining(10))


def test_bar_in_a_log_file_writes_whole_lines_without_redraws():
    log = io.StringIO()
    bar = ProgressBar(total=50, stream=log, line_interval_s=3600.0)
    for iteration in range(1, 51):
        bar.update(iteration, f"loss {1.0 / iteration:.4f}")
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the first update and the last iteration only (the interval is an hour)
    assert len(lines) == 2
    assert "1/50" in lines[0] and "50/50" in lines[1] and "loss 0.0200" in lines[1]


def test_bar_on_a_terminal_is_redrawn_in_place():
    terminal = Terminal()
    bar = ProgressBar(total=20, initial=2, stream=terminal)
    for iteration in range(3, 21):
        bar.update(iteration, "loss 1.0")
    bar.close()
    shown = [line for line in screen(terminal.getvalue()) if line]
    assert len(shown) == 1  # one line, redrawn 18 times
    assert "20/20" in shown[0] and "it/s" in shown[0] and "ETA" in shown[0] and "loss 1.0" in shown[0]


@contextlib.contextmanager
def logging_to(terminal: Terminal, name: str):
    """A logger writing ``LEVEL message`` records to ``terminal`` through the bar-aware handler."""
    handler = ProgressAwareHandler(terminal)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger(name)
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        yield log
    finally:
        log.removeHandler(handler)


def test_log_records_appear_on_their_own_lines_above_the_bar():
    terminal = Terminal()
    with logging_to(terminal, "test_metrics_log.bar") as log:
        bar = ProgressBar(total=30, stream=terminal)
        for iteration in range(1, 31):
            bar.update(iteration, "loss 2.5000")
            if iteration % 10 == 0:
                log.info("iter %d/30", iteration)
        bar.close()
    shown = [line for line in screen(terminal.getvalue()) if line]
    assert shown[:3] == ["INFO iter 10/30", "INFO iter 20/30", "INFO iter 30/30"]
    assert len(shown) == 4 and shown[3].startswith("[") and "30/30" in shown[3]


@pytest.fixture
def restore_project_loggers():
    yield
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_verbose_opens_the_project_debug_records_only(restore_project_loggers):
    setup_logging(verbose=True)
    assert logging.getLogger("streampetr_plugin.training.trainer").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("streampetr.integration").isEnabledFor(logging.DEBUG)
    for third_party in ("matplotlib.font_manager", "PIL.PngImagePlugin", "nuscenes"):
        assert not logging.getLogger(third_party).isEnabledFor(logging.DEBUG)
    setup_logging(verbose=False)
    assert not logging.getLogger("streampetr_plugin.training.trainer").isEnabledFor(logging.DEBUG)


def test_an_error_record_is_the_last_line_until_the_bar_moves_on():
    terminal = Terminal()
    with logging_to(terminal, "test_metrics_log.error") as log:
        bar = ProgressBar(total=10, stream=terminal)
        bar.update(4, "loss nan")
        log.error("stopping at iteration 4: the loss was not finite")
    shown = [line for line in screen(terminal.getvalue()) if line]
    assert shown == ["ERROR stopping at iteration 4: the loss was not finite"]
    bar.update(5, "loss 1.0")
    shown = [line for line in screen(terminal.getvalue()) if line]
    assert len(shown) == 2 and "5/10" in shown[1]
    bar.close()
