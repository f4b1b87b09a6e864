"""The ``streampetr bench`` command line (:func:`add_bench_arguments` sets ``run`` to :func:`run_bench`);
the benchmark itself is :func:`streampetr_plugin.bench.command.bench_command`, imported when it runs so
that building the parser stays light."""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence

from streampetr_plugin.bench import VARIANT_GROUPS
from streampetr_plugin.bench.command import DEVICE_CHOICES
from streampetr_plugin.cli.common import (
    add_output_arguments,
    add_recipe_arguments,
    exit_on_recipe_error,
    run_command,
    setup_logging,
)
from streampetr_plugin.plugins import PluginHost


def _time_backends(recipe: Any, host: PluginHost, *, backend: str, steps: int, warmup: int) -> Dict[str, Any]:
    from streampetr_plugin.deploy.bench import bench_backends, bench_cpu_levers

    bench = bench_backends if backend == "onnxruntime" else bench_cpu_levers
    return bench(recipe, host, steps=steps, warmup=warmup).to_dict()


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``streampetr bench``'s arguments to ``parser`` and set ``run`` to :func:`run_bench`."""
    add_recipe_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (batches with --data); default 10")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first; default 2")
    parser.add_argument("--inference", action="store_true", help="also time streaming inference")
    parser.add_argument(
        "--data", action="store_true", help="time the training input pipeline instead of the model"
    )
    parser.add_argument(
        "--variants", nargs="+", default=[], metavar="GROUP", choices=(*VARIANT_GROUPS, "all"),
        help=f"compare variants of: {', '.join(VARIANT_GROUPS)}, or all",
    )
    parser.add_argument("--json", dest="as_json", action="store_true", help="machine-readable report")
    parser.add_argument(
        "--device", choices=DEVICE_CHOICES, default=None,
        help="device kind; default: the recipe's accelerator.device",
    )
    parser.add_argument(
        "--backend", choices=("torch", "onnxruntime", "torch-cpu-levers"), default="torch",
        help="with --inference: onnxruntime times the exported graph against PyTorch, torch-cpu-levers "
        "PyTorch with BatchNorm folding, a channels-last backbone and inductor with frozen weights (CPU, "
        "inference only)",
    )
    parser.add_argument(
        "--precision", nargs="+", default=[], metavar="DTYPE", choices=("bf16", "fp16"),
        help="compare one training frame's features, losses and gradients under autocast in DTYPE with fp32 "
        "(the recipe's autocast scope) instead of timing",
    )
    parser.set_defaults(run=run_bench)
    return parser


def run_bench(args: argparse.Namespace, host: Optional[PluginHost] = None) -> int:
    """The ``streampetr bench`` command on parsed arguments; exit status 0, 2 on a recipe error."""
    from streampetr_plugin.bench.command import bench_command

    exit_on_recipe_error(
        lambda: bench_command(
            args.recipe,
            args.overrides,
            steps=args.steps,
            warmup=args.warmup,
            inference=args.inference,
            data=args.data,
            variants=args.variants,
            as_json=args.as_json,
            device=args.device,
            backend=args.backend,
            precision=args.precision,
            host=host,
            time_backends=_time_backends,
        )
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m streampetr_plugin.cli.bench RECIPE ...`` (the same as ``streampetr bench``)."""
    parser = add_bench_arguments(argparse.ArgumentParser(prog="streampetr bench"))
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_command(lambda: run_bench(args), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
