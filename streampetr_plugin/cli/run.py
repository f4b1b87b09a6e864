"""``streampetr-run RECIPE [overrides]``: validate, build and train, in one process or under torchrun.

One process (the device comes from ``accelerator.device``, ``auto`` by default)::

    streampetr-run recipes/demo_cpu.yaml runtime.max_iters=200

Several processes, one per device (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)::

    torchrun --nproc-per-node 8 -m streampetr_plugin.cli.run recipes/vov_8p.yaml
    torchrun --nproc-per-node 2 -m streampetr_plugin.cli.run recipes/demo_cpu.yaml accelerator.device=cpu

Exit status: 0 done, 1 training stopped (non-finite loss, unusable device or launcher environment,
unreadable checkpoint, missing data or weights), 2 recipe error (one line per problem).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import List, Optional

from streampetr_plugin.cli.common import exit_on_recipe_error, setup_logging

logger = logging.getLogger("streampetr.run")

EXIT_TRAINING_STOPPED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streampetr-run",
        description="Validate, build and train a recipe, in one process or in each of a torchrun job.",
        epilog="Under torchrun: torchrun --nproc-per-node N -m streampetr_plugin.cli.run RECIPE [overrides]",
    )
    parser.add_argument("recipe", help="recipe file or shipped recipe name")
    parser.add_argument("overrides", nargs="*", help="a.b=value to set, ~a.b to delete")
    parser.add_argument("--build-only", action="store_true", help="build the model, report its size and stop")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if os.environ.get("RANK", "0") not in ("", "0"):
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 narrates; the others speak up on problems
    from streampetr_plugin.config.loader import load_recipe

    recipe = exit_on_recipe_error(lambda: load_recipe(args.recipe, args.overrides))
    if args.build_only:
        from streampetr_plugin.models.build import build_model

        model = build_model(recipe)
        logger.info("built %s: %s parameters", recipe.name, f"{sum(p.numel() for p in model.parameters()):,}")
        return 0

    from streampetr_plugin.adapters.device import DeviceError
    from streampetr_plugin.data.dataset import ImageReadError
    from streampetr_plugin.data.infos import UnsafePickleError
    from streampetr_plugin.errors import StreamPETRError
    from streampetr_plugin.interop.checkpoint import UnsafeCheckpointError
    from streampetr_plugin.training.checkpointing import CheckpointError
    from streampetr_plugin.training.distributed import DistributedSetupError
    from streampetr_plugin.training.trainer import NonFiniteLossError, train

    try:
        result = train(recipe)
    except StreamPETRError as error:
        logger.error("%s", error)  # one line naming the file or key and the fix
        return error.exit_status
    except (NonFiniteLossError, DeviceError, DistributedSetupError, CheckpointError) as error:
        logger.error("%s", error)
        return EXIT_TRAINING_STOPPED
    except (FileNotFoundError, ImageReadError, UnsafePickleError, UnsafeCheckpointError) as error:
        logger.error("%s", error)  # missing or unsafe inputs: the message names the file and the fix
        return EXIT_TRAINING_STOPPED
    logger.info(
        "finished %s at iteration %d; last checkpoint %s",
        recipe.name, result.iteration, result.last_checkpoint,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
