"""``streampetr-run RECIPE [overrides]``: validate, build and train (single process or under torchrun)."""
from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from streampetr_plugin.cli.common import exit_on_recipe_error, setup_logging

logger = logging.getLogger("streampetr.run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streampetr-run", description=__doc__)
    parser.add_argument("recipe", help="recipe file or shipped recipe name")
    parser.add_argument("overrides", nargs="*", help="a.b=value to set, ~a.b to delete")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from streampetr_plugin import build_model, load_recipe

    recipe = exit_on_recipe_error(lambda: load_recipe(args.recipe, args.overrides))
    model = build_model(recipe)
    count = sum(p.numel() for p in model.parameters())
    logger.info("built %s: %s parameters", recipe.name, f"{count:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
