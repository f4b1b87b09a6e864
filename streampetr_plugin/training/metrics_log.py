"""What the trainer reports while it runs (rank 0 only): JSON lines, TensorBoard, a progress bar.

``metrics.jsonl`` in the run directory gets one JSON object per line. Training records (``"kind":
"train"``), averaged over the iterations since the previous record: ``iteration``, ``epoch``, every
entry of the detector's loss dict (means over ranks), ``loss`` (the sum of the ``*loss*`` entries),
``lr`` (of the parameters without a multiplier), ``grad_norm`` (before clipping), ``loss_scale`` (null
without fp16), ``skipped_steps``, ``step_time`` and ``data_time`` (seconds per iteration),
``samples_per_s`` (frames over all ranks), ``peak_memory_mib`` (peak device memory since the previous
record; on the CPU the process's peak resident memory). Evaluation records (``"kind": "eval"``):
``iteration`` and the metric's numbers. A resumed run appends to the file.
"""
from __future__ import annotations

import json
import logging
import math
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
    """``H:MM:SS`` (hours may exceed 24)."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class ProgressBar:
    """A one-line bar with rate and ETA, redrawn in place (for a terminal)."""

    def __init__(self, *, total: int, initial: int = 0, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total = total
        self.initial = initial
        self.stream = stream
        self.width = width
        self._start = time.monotonic()

    def update(self, iteration: int, postfix: str = "") -> None:
        done = iteration - self.initial
        elapsed = time.monotonic() - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - iteration) / rate if rate > 0 else float("nan")
        filled = int(self.width * iteration / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        eta_text = format_duration(eta) if math.isfinite(eta) else "?"
        line = f"\r[{bar}] {iteration}/{self.total} {rate:.2f} it/s ETA {eta_text} {postfix}"
        self.stream.write(line.ljust(100))
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
