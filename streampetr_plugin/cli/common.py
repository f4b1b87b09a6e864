"""Helpers shared by the command-line entry points."""
from __future__ import annotations

import logging
import sys
from typing import Callable, TypeVar

from streampetr_plugin.config.loader import RecipeError
from streampetr_plugin.training.metrics_log import ProgressAwareHandler

T = TypeVar("T")

EXIT_USAGE = 2


# The metric report is logged bare, so that its lines start with "mAP:" / "NDS:" as Ascend training
# harnesses grep for them.
PLAIN_LOGGERS = ("streampetr_plugin.evaluation.nuscenes_metric",)


class _Formatter(logging.Formatter):
    """Timestamped lines, except the bare metric report."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name in PLAIN_LOGGERS:
            return record.getMessage()
        return super().format(record)


# The loggers ``-v`` turns to DEBUG; every other library (matplotlib, PIL, ...) stays at INFO.
PROJECT_LOGGERS = ("streampetr_plugin", "streampetr")


def setup_logging(verbose: bool = False) -> None:
    """Timestamped records on stderr, above the training progress bar; ``verbose``: this project's
    debug records too."""
    handler = ProgressAwareHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.NOTSET)


def exit_on_recipe_error(action: Callable[[], T]) -> T:
    """Run ``action``; a recipe problem prints its one-line errors (no traceback) and exits 2."""
    try:
        return action()
    except RecipeError as error:
        for line in error.errors:
            print(line, file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None

