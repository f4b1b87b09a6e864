"""Helpers shared by the command-line entry points."""
from __future__ import annotations

import logging
import sys
from typing import Callable, TypeVar

from streampetr_plugin.config.loader import RecipeError

T = TypeVar("T")

EXIT_USAGE = 2


# The metric report is printed bare, so that lines start with "mAP:" / "NDS:" as Ascend training
# harnesses grep for them.
PLAIN_LOGGERS = ("streampetr_plugin.evaluation.nuscenes_metric",)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for name in PLAIN_LOGGERS:
        plain = logging.getLogger(name)
        if not plain.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            plain.addHandler(handler)
            plain.propagate = False


def exit_on_recipe_error(action: Callable[[], T]) -> T:
    """Run ``action``; a recipe problem prints its one-line errors (no traceback) and exits 2."""
    try:
        return action()
    except RecipeError as error:
        for line in error.errors:
            print(line, file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None

