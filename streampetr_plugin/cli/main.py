"""``streampetr``: the toolbox (validate, show, schema, recipes, cp, plugins, data and evaluation tools)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from streampetr_plugin.cli.common import exit_on_recipe_error, setup_logging


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe file or shipped recipe name (see `streampetr recipes`)")
    parser.add_argument("overrides", nargs="*", help="a.b=value to set, ~a.b to delete")


def _cmd_validate(args: argparse.Namespace) -> int:
    from streampetr_plugin.config.loader import load_recipe

    recipe = exit_on_recipe_error(lambda: load_recipe(args.recipe, args.overrides))
    print(f"{recipe.source}: OK ({recipe.name})")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from streampetr_plugin.config.loader import dump_recipe, load_recipe

    recipe = exit_on_recipe_error(lambda: load_recipe(args.recipe, args.overrides))
    sys.stdout.write(dump_recipe(recipe))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from streampetr_plugin.config.schema import Recipe
    from streampetr_plugin.plugins import REGISTRY_KINDS, get_registries

    schema = Recipe.model_json_schema()
    registries = get_registries()
    schema["x-components"] = {
        kind: {
            entry.name: entry.params.model_json_schema() if entry.params is not None else {}
            for entry in registries.kind(kind).entries()
        }
        for kind in REGISTRY_KINDS
    }
    print(json.dumps(schema, indent=2))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    import yaml

    from streampetr_plugin.config.loader import RECIPE_DIR, shipped_recipes

    for name in shipped_recipes():
        data = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text(encoding="utf-8")) or {}
        print(f"{name:<16} {data.get('description', '')}")
    return 0


def _cmd_cp(args: argparse.Namespace) -> int:
    from streampetr_plugin.config.loader import dump_recipe, load_recipe

    recipe = exit_on_recipe_error(lambda: load_recipe(args.name))
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / f"{recipe.name}.yaml"
    if dest.exists() and not args.force:
        print(f"{dest}: exists (use --force to overwrite)", file=sys.stderr)
        return 1
    dest.write_text(f"# self-contained copy of the shipped recipe {recipe.name!r}\n" + dump_recipe(recipe))
    print(dest)
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from streampetr_plugin.plugins import get_plugin_host

    host = get_plugin_host()
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


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from streampetr_plugin.data.commands import make_synthetic_command

    dataset = make_synthetic_command(args.dir, scenes=args.scenes, seed=args.seed)
    print(dataset.root)
    return 0


def _cmd_create_data(args: argparse.Namespace) -> int:
    from streampetr_plugin.data.commands import create_data_command

    for path in create_data_command(args.root, version=args.version, out_dir=args.out_dir).values():
        print(path)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from streampetr_plugin.config.loader import load_recipe
    from streampetr_plugin.training.evaluation import evaluate_checkpoint

    recipe = exit_on_recipe_error(lambda: load_recipe(args.recipe, args.overrides))
    evaluate_checkpoint(recipe, args.checkpoint, device=args.device)  # logs the mAP: / NDS: report
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from streampetr_plugin.visualization.command import VisualizationError, visualize_command

    try:
        print(visualize_command(args.run, sample=args.sample, out=args.out))
    except VisualizationError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streampetr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check a recipe (exit 2 with one line per problem)")
    _add_recipe_arguments(validate)
    validate.set_defaults(run=_cmd_validate)

    show = commands.add_parser("show", help="print the resolved recipe as YAML")
    _add_recipe_arguments(show)
    show.set_defaults(run=_cmd_show)

    schema = commands.add_parser("schema", help="print the recipe JSON schema (for editors)")
    schema.set_defaults(run=_cmd_schema)

    recipes = commands.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(run=_cmd_recipes)

    cp = commands.add_parser("cp", help="copy a shipped recipe, self-contained, to DEST")
    cp.add_argument("name")
    cp.add_argument("dest")
    cp.add_argument("--force", action="store_true", help="overwrite DEST")
    cp.set_defaults(run=_cmd_cp)

    plugins = commands.add_parser("plugins", help="list plugins, their hooks and components")
    plugins.add_argument("--all", action="store_true", help="list every component")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(run=_cmd_plugins)

    synthetic = commands.add_parser("make-synthetic", help="write the built-in synthetic nuScenes to DIR")
    synthetic.add_argument("dir")
    synthetic.add_argument("--scenes", type=int, default=10, help="number of scenes (<= 10: v1.0-mini split)")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.set_defaults(run=_cmd_make_synthetic)

    create = commands.add_parser("create-data", help="build the info files of a nuScenes root with nuscenes-devkit")
    create.add_argument("--root", required=True, help="nuScenes root (holds samples/ and the version folder)")
    create.add_argument("--version", default="v1.0-trainval", help="v1.0-trainval, v1.0-mini, ...")
    create.add_argument("--out-dir", default=None, help="where to write the infos (default: the root)")
    create.set_defaults(run=_cmd_create_data)

    evaluate = commands.add_parser("eval", help="score a checkpoint on the recipe's val set (nuScenes metric)")
    _add_recipe_arguments(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="our checkpoint or a reference .pth")
    evaluate.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda:0, npu:0")
    evaluate.set_defaults(run=_cmd_eval)

    from streampetr_plugin.bench.command import add_bench_arguments

    add_bench_arguments(
        commands.add_parser("bench", help="time training / inference steps at a recipe's real shapes (JSON)")
    )

    from streampetr_plugin.deploy.commands import add_export_arguments, add_infer_arguments

    add_export_arguments(
        commands.add_parser("export", help="write a checkpoint as an ONNX graph of one streaming frame")
    )
    add_infer_arguments(
        commands.add_parser("infer", help="run a checkpoint over a split in stream order (nuScenes results)")
    )

    visualize = commands.add_parser("visualize", help="draw a run's predictions and ground truth as a PNG")
    visualize.add_argument("--run", required=True, help="run directory (holds recipe.yaml and eval/)")
    visualize.add_argument("--sample", default=None, help="sample token (default: the first val sample)")
    visualize.add_argument("--out", default=None, help="PNG path (default: next to the predictions)")
    visualize.set_defaults(run=_cmd_visualize)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
