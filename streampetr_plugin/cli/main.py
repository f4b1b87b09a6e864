"""``streampetr``: the toolbox (validate, show, schema, recipes, cp, plugins, data and evaluation tools)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
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


def _cmd_validate(args: argparse.Namespace, host: PluginHost) -> int:
    from streampetr_plugin.config.loader import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, host=host)
    print(f"{recipe.source}: OK ({recipe.name})")
    return 0


def _cmd_show(args: argparse.Namespace, host: PluginHost) -> int:
    from streampetr_plugin.config.loader import dump_recipe, load_recipe

    sys.stdout.write(dump_recipe(load_recipe(args.recipe, args.overrides, host=host)))
    return 0


def _cmd_schema(args: argparse.Namespace, host: PluginHost) -> int:
    from streampetr_plugin.config.schema import Recipe
    from streampetr_plugin.plugins import REGISTRY_KINDS

    schema = Recipe.model_json_schema()
    registries = host.registries
    schema["x-components"] = {
        kind: {
            entry.name: entry.params.model_json_schema() if entry.params is not None else {}
            for entry in registries.kind(kind).entries()
        }
        for kind in REGISTRY_KINDS
    }
    print(json.dumps(schema, indent=2))
    return 0


def _cmd_recipes(args: argparse.Namespace, host: PluginHost) -> int:
    import yaml

    from streampetr_plugin.config.loader import RECIPE_DIR, shipped_recipes

    for name in shipped_recipes():
        data = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text(encoding="utf-8")) or {}
        print(f"{name:<16} {data.get('description', '')}")
    return 0


def _cmd_cp(args: argparse.Namespace, host: PluginHost) -> int:
    from streampetr_plugin.config.loader import dump_recipe, load_recipe

    recipe = load_recipe(args.name, host=host)
    source_name = recipe.name
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / f"{recipe.name}.yaml"
    else:
        recipe.name = dest.stem  # the copy runs in its own work dir (work_dirs/{recipe})
    if dest.exists() and not args.force:
        raise InputError(describe(str(dest), "exists", "use --force to overwrite it"))
    dest.write_text(f"# self-contained copy of the shipped recipe {source_name!r}\n" + dump_recipe(recipe),
                    encoding="utf-8")
    print(dest)
    return 0


def _cmd_plugins(args: argparse.Namespace, host: PluginHost) -> int:
    infos = host.infos()
    if args.json:
        payload = {"plugins": [asdict(info) for info in infos], "failures": [asdict(f) for f in host.failures]}
        print(json.dumps(payload, indent=2))
        return 0
    for info in infos:
        print(f"{info.name} ({info.distribution} {info.version})")
        print(f"  hooks: {', '.join(info.hooks) or '-'}")
        for kind, names in info.components.items():
            if args.all or len(names) <= 8:
                print(f"  {kind}: {', '.join(names)}")
            else:
                print(f"  {kind}: {', '.join(names[:8])}, ... ({len(names)}; --all lists every one)")
    for failure in host.failures:
        print(f"FAILED {failure.entry_point} ({failure.distribution}): {failure.error}")
    return 0


def _cmd_make_synthetic(args: argparse.Namespace, host: PluginHost) -> int:
    from streampetr_plugin.data.commands import make_synthetic_command

    dataset = make_synthetic_command(args.dir, scenes=args.scenes, seed=args.seed)
    print(dataset.root)
    return 0


def _cmd_create_data(args: argparse.Namespace, host: PluginHost) -> int:
    from streampetr_plugin.data.commands import create_data_command

    for path in create_data_command(args.root, version=args.version, out_dir=args.out_dir).values():
        print(path)
    return 0


def _cmd_eval(args: argparse.Namespace, host: PluginHost) -> int:
    from streampetr_plugin.config.loader import load_recipe
    from streampetr_plugin.training.evaluation import evaluate_checkpoint

    device = [f"accelerator.device={args.device}"] if args.device else []
    recipe = load_recipe(args.recipe, [*args.overrides, *device], host=host)
    out = Path(args.out) if args.out is not None else None
    # logs mAP: / NDS: for detection, AMOTA: for tracking
    evaluation = evaluate_checkpoint(recipe, Path(args.checkpoint), host=host, output_dir=out,
                                     tasks=args.tasks)
    print(evaluation.outputs.directory)
    return 0


def _cmd_visualize(args: argparse.Namespace, host: PluginHost) -> int:
    from streampetr_plugin.visualization.command import visualize_command

    print(visualize_command(args.run_dir, sample=args.sample, out=args.out, host=host,
                            trajectories=args.trajectories))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="streampetr", description=__doc__)
    add_version_argument(parser)
    add_output_arguments(parser)
    # Each command's function is stored as ``handler``; no option may use that name.
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check a recipe (exit 2 with one line per problem)")
    add_recipe_arguments(validate)
    validate.set_defaults(handler=_cmd_validate)

    show = commands.add_parser("show", help="print the resolved recipe as YAML")
    add_recipe_arguments(show)
    show.set_defaults(handler=_cmd_show)

    schema = commands.add_parser("schema", help="print the recipe JSON schema (for editors)")
    schema.set_defaults(handler=_cmd_schema)

    recipes = commands.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(handler=_cmd_recipes)

    cp = commands.add_parser("cp", help="copy a recipe, self-contained, to DEST (named after DEST's stem)")
    cp.add_argument("name", help="shipped recipe name or recipe file")
    cp.add_argument("dest", help="new recipe file (its stem becomes the recipe's name) or a directory")
    cp.add_argument("--force", action="store_true", help="overwrite DEST")
    cp.set_defaults(handler=_cmd_cp)

    plugins = commands.add_parser("plugins", help="list plugins, their hooks and components")
    plugins.add_argument("--all", action="store_true", help="list every component")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(handler=_cmd_plugins)

    synthetic = commands.add_parser("make-synthetic", help="write the built-in synthetic nuScenes to DIR")
    synthetic.add_argument("dir", metavar="DIR", help="output directory: the dataset root (created)")
    synthetic.add_argument(
        "--scenes", type=int, default=10,
        help="number of scenes, >= 2 (up to 10: v1.0-mini scene names, more: v1.0-trainval); default 10",
    )
    synthetic.add_argument("--seed", type=int, default=0,
                           help="random seed of the generated world (same seed, same dataset); default 0")
    synthetic.set_defaults(handler=_cmd_make_synthetic)

    create = commands.add_parser("create-data", help="build the info files of a nuScenes root with nuscenes-devkit")
    create.add_argument("--root", required=True, help="nuScenes root (holds samples/ and the version folder)")
    create.add_argument("--version", default="v1.0-trainval", help="v1.0-trainval, v1.0-mini, ...")
    create.add_argument("--out-dir", default=None, help="where to write the infos (default: the root)")
    create.set_defaults(handler=_cmd_create_data)

    evaluate = commands.add_parser("eval", help="score a checkpoint on the recipe's val set (nuScenes metric)")
    add_recipe_arguments(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="our checkpoint or a reference .pth")
    evaluate.add_argument(
        "--out", default=None,
        help="directory for the results (default: a new <work_dir>/eval_<checkpoint>_<date-time>/)",
    )
    evaluate.add_argument("--device", choices=("auto", "npu", "cuda", "cpu"), default=None,
                          help="device kind; default: the recipe's accelerator.device")
    evaluate.add_argument("--tasks", nargs="+", choices=("detection", "tracking"), default=["detection"],
                          help="what to score: the detection metric (mAP, NDS) and/or tracking with the "
                          "recipe's tracker (AMOTA); default: detection")
    evaluate.set_defaults(handler=_cmd_eval)

    from streampetr_plugin.cli.bench import add_bench_arguments, run_bench

    bench = commands.add_parser("bench", help="time training / inference steps at a recipe's real shapes")
    add_bench_arguments(bench)
    bench.set_defaults(handler=run_bench)

    from streampetr_plugin.cli.deploy import add_export_arguments, add_infer_arguments

    add_export_arguments(
        commands.add_parser("export", help="write a checkpoint as an ONNX graph of one streaming frame")
    )
    add_infer_arguments(
        commands.add_parser("infer", help="run a checkpoint over a split in stream order (nuScenes results)")
    )

    visualize = commands.add_parser("visualize", help="draw a run's predictions and ground truth as a PNG")
    visualize.add_argument("--run", dest="run_dir", metavar="RUN_DIR", required=True,
                           help="run directory (holds recipe.yaml and eval/)")
    visualize.add_argument("--sample", default=None, help="sample token (default: the first val sample)")
    visualize.add_argument("--out", default=None, help="PNG path (default: next to the predictions)")
    visualize.add_argument("--trajectories", action="store_true",
                           help="draw the bird's-eye paths of the tracks of the sample's scene (needs an "
                           "evaluation that tracked)")
    visualize.set_defaults(handler=_cmd_visualize)

    for command in commands.choices.values():
        add_output_arguments(command, default=argparse.SUPPRESS)
    return parser


def main(argv: Optional[List[str]] = None, host: Optional[PluginHost] = None) -> int:
    """Run one command; ``host``: the plugins it uses (default: a new host, see
    :func:`~streampetr_plugin.host.create_plugin_host`)."""
    from streampetr_plugin.host import create_plugin_host

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_command(lambda: args.handler(args, host if host is not None else create_plugin_host()),
                       debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
