"""``streampetr-run RECIPE [overrides]``: validate, build and train, in one process or under torchrun.

One process (the device comes from ``accelerator.device``, ``auto`` by default)::

    streampetr-run recipes/demo_cpu.yaml runtime.max_iters=200

Several processes, one per device (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)::

    torchrun --nproc-per-node 8 -m streampetr_plugin.cli.run recipes/vov_8p.yaml
    torchrun --nproc-per-node 2 -m streampetr_plugin.cli.run recipes/demo_cpu.yaml accelerator.device=cpu

Exit status: 0 done; 2 bad input (recipe, data, checkpoint, work dir: one ``error:`` line per problem);
1 the run failed (non-finite loss, unusable device or launcher environment, a full disk); 130
interrupted. ``--debug`` (or ``STREAMPETR_DEBUG=1``) adds the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import List, Optional

from streampetr_plugin.cli.common import (
    CommandParser,
    add_output_arguments,
    add_recipe_arguments,
    add_version_argument,
    run_command,
    setup_logging,
)
from streampetr_plugin.errors import InputError, describe
from streampetr_plugin.plugins import PluginHost

logger = logging.getLogger("streampetr.run")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="streampetr-run",
        description="Validate, build and train a recipe, in one process or in each of a torchrun job.",
        epilog="Under torchrun: torchrun --nproc-per-node N -m streampetr_plugin.cli.run RECIPE [overrides]",
    )
    add_recipe_arguments(parser)
    parser.add_argument("--build-only", action="store_true", help="build the model, report its size and stop")
    add_version_argument(parser)
    add_output_arguments(parser)
    return parser


def check_writable_directory(directory: Path, key: str) -> None:
    """Create ``directory`` if needed and check a file can be written in it, before hours of work depend
    on it; :class:`InputError` naming ``key`` otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise InputError(describe(
            key, f"{directory} is not a writable directory ({error.strerror or error})",
            f"make it writable or set {key}=DIR",
        )) from None


def _train(args: argparse.Namespace, host: PluginHost) -> int:
    from streampetr_plugin.config.loader import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, host=host)
    if args.build_only:
        from streampetr_plugin import build_model

        model = build_model(recipe, host)
        logger.info("built %s: %s parameters", recipe.name, f"{sum(p.numel() for p in model.parameters()):,}")
        return 0

    from streampetr_plugin.training.trainer import train

    check_writable_directory(Path(recipe.work_dir()), "runtime.work_dir")
    result = train(recipe, host=host)
    evaluation = result.evaluation
    where = {
        "run dir": result.work_dir,
        "metrics": result.metrics_file,
        "last checkpoint": result.last_checkpoint,
        "evaluation": evaluation.directory if evaluation is not None else None,
        "picture": evaluation.picture if evaluation is not None else None,
    }
    lines = [f"  {what + ':':<17}{path}" for what, path in where.items() if path is not None]
    logger.info("finished %s at iteration %d\n%s", recipe.name, result.iteration, "\n".join(lines))
    return 0


def main(argv: Optional[List[str]] = None, host: Optional[PluginHost] = None) -> int:
    """Train one recipe; ``host``: the plugins it uses (default: a new host, see
    :func:`~streampetr_plugin.host.create_plugin_host`)."""
    from streampetr_plugin.host import create_plugin_host

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if os.environ.get("RANK", "0") not in ("", "0"):
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 narrates; the others speak up on problems
    return run_command(lambda: _train(args, host if host is not None else create_plugin_host()),
                       debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
