"""What the trainer reports while it runs (rank 0 only): JSON lines, TensorBoard, a progress bar.

``metrics.jsonl`` in the run directory gets one JSON object per line. Training records (``"kind":
"train"``), averaged over the iterations since the previous record: ``iteration``, ``epoch``, every
entry of the detector's loss dict (means over ranks), ``loss`` (the sum of the ``*loss*`` entries),
``lr`` (of the parameters without a multiplier), ``grad_norm`` (before clipping), ``loss_scale`` (null
without fp16), ``skipped_steps``, ``step_time`` and ``data_time`` (seconds per iteration),
``samples_per_s`` (frames over all ranks), ``peak_memory_mib`` (peak device memory since the previous
record; on the CPU the process's peak resident memory). Evaluation records (``"kind": "eval"``):
``iteration`` and the metric's numbers. A resumed run appends to the file.

For people watching: the log line's ETA comes from :class:`IterationPace` (averaged over about 100
iterations); :class:`ProgressBar` with :class:`ProgressAwareHandler` keeps log records off the bar's
line on a terminal and in-place redraws out of log files.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, TextIO

logger = logging.getLogger(__name__)

TENSORBOARD_HINT = "pip install 'streampetr-plugin[tensorboard]'"


def _plain(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats become strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and, optionally, TensorBoard scalars."""

    def __init__(self, path: Path, *, tensorboard_dir: Optional[Path] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning(
                    "runtime.tensorboard is on but TensorBoard is not installed (%s); continuing without it",
                    TENSORBOARD_HINT,
                )
            else:
                self._writer = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, record: Dict[str, Any]) -> None:
        """One line; scalar fields also go to TensorBoard under ``<kind>/<field>``."""
        self._file.write(json.dumps({key: _plain(value) for key, value in record.items()}) + "\n")
        self._file.flush()
        if self._writer is not None:
            step = int(record.get("iteration", 0))
            kind = record.get("kind", "train")
            for key, value in record.items():
                if key not in ("iteration", "kind") and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: Path) -> list:
    """Every record of a ``metrics.jsonl`` (for tools and tests)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours may exceed 24); ``?`` when not known (NaN)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class IterationPace:
    """Seconds per iteration for the ETA: the mean of every iteration until ``window`` of them were
    seen, then an exponential average with a time constant of ``window`` iterations (a few slow
    iterations, e.g. under a passing load, move it little)."""

    def __init__(self, window: int = 100) -> None:
        self.window = window
        self.seconds_per_iteration = float("nan")
        self._count = 0

    def add(self, seconds: float, iterations: int) -> None:
        """``iterations`` more iterations that took ``seconds`` in all."""
        if iterations <= 0:
            return
        mean = seconds / iterations
        self._count += iterations
        if self._count == iterations:
            self.seconds_per_iteration = mean
            return
        weight = max(iterations / self._count, 1.0 - (1.0 - 1.0 / self.window) ** iterations)
        self.seconds_per_iteration += weight * (mean - self.seconds_per_iteration)

    def remaining(self, iterations: int) -> float:
        """Seconds for ``iterations`` more (NaN before the first :meth:`add`)."""
        return iterations * self.seconds_per_iteration


# The bar being drawn, if any: ProgressAwareHandler lifts it off its line while a log record is written.
_active_bar: Optional["ProgressBar"] = None


class ProgressBar:
    """A one-line bar with rate and ETA (both averaged since the bar started).

    On a terminal it is redrawn in place and log records written through :class:`ProgressAwareHandler`
    appear above it, never glued to its line. Elsewhere (a log file, a pipe) there are no in-place
    redraws: a plain line every ``line_interval_s`` seconds and at the last iteration.
    """

    def __init__(
        self,
        *,
        total: int,
        initial: int = 0,
        stream: TextIO = sys.stderr,
        width: int = 30,
        line_interval_s: float = 30.0,
    ) -> None:
        self.total = total
        self.initial = initial
        self.stream = stream
        self.width = width
        self.line_interval_s = line_interval_s
        self.interactive = bool(getattr(stream, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._last_line_at = -math.inf
        self._drawn = ""

    def _line(self, iteration: int, postfix: str) -> str:
        elapsed = time.monotonic() - self._start
        rate = (iteration - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - iteration) / rate if rate > 0 else float("nan")
        filled = int(self.width * iteration / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        eta_text = format_duration(eta)
        return f"[{bar}] {iteration}/{self.total} {rate:.2f} it/s ETA {eta_text} {postfix}".rstrip()

    def update(self, iteration: int, postfix: str = "") -> None:
        global _active_bar
        line = self._line(iteration, postfix)
        if self.interactive:
            _active_bar = self
            # Never wider than the terminal: a wrapped line cannot be redrawn in place.
            line = line[: shutil.get_terminal_size().columns - 1]
            self.stream.write("\r" + line.ljust(len(self._drawn)))
            self.stream.flush()
            self._drawn = line
            return
        now = time.monotonic()
        if now - self._last_line_at >= self.line_interval_s or iteration >= self.total:
            self._last_line_at = now
            self.stream.write(line + "\n")
            self.stream.flush()

    def clear(self) -> None:
        """Blank the bar's line and return to its start (terminal only)."""
        if self._drawn:
            self.stream.write("\r" + " " * len(self._drawn) + "\r")
            self.stream.flush()

    def redraw(self) -> None:
        if self._drawn:
            self.stream.write("\r" + self._drawn)
            self.stream.flush()

    def close(self) -> None:
        """Leave the last state on its own line."""
        global _active_bar
        if _active_bar is self:
            _active_bar = None
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = ""


class ProgressAwareHandler(logging.StreamHandler):
    """A stream handler that clears the progress bar's line before writing a record and redraws the
    bar after it, so that records start on a line of their own above the bar. After an error record
    the bar waits for its next update: an error usually ends the run, and the bar should not outlive
    it as the last line on the screen."""

    def emit(self, record: logging.LogRecord) -> None:
        bar = _active_bar
        if bar is None:
            super().emit(record)
            return
        bar.clear()
        super().emit(record)
        if record.levelno < logging.ERROR:
            bar.redraw()
