"""Recipe files: YAML with ``_base_`` inheritance, command-line overrides, and validation.

Every problem is reported at once, one line each, as ``<file>:<line>: <dotted.key>: <message>``.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import yaml
from pydantic import BaseModel, ValidationError

from streampetr_plugin.config.schema import DEFAULT_TRACKER, ComponentOptions, Recipe
from streampetr_plugin.errors import InputError

if TYPE_CHECKING:
    from streampetr_plugin.plugins import PluginHost, Registries

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
OVERRIDE_SOURCE = "<command line>"

KeyPath = Tuple[str, ...]


class RecipeError(InputError, ValueError):
    """One or more problems in a recipe; ``errors`` holds one formatted line per problem."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass
class _Located:
    """A merged recipe tree and where each key was last set."""

    data: Dict[str, Any]
    lines: Dict[KeyPath, Tuple[str, Optional[int]]] = field(default_factory=dict)
    files: List[str] = field(default_factory=list)


def shipped_recipes() -> List[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe_path(path_or_name: Union[str, Path]) -> Path:
    path = Path(path_or_name)
    if path.is_file():
        return path.resolve()
    shipped = RECIPE_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise RecipeError(
        [f"{path_or_name}: recipe file not found (shipped recipes: {', '.join(shipped_recipes())})"]
    )


def _key_lines(node: yaml.Node, source: str, prefix: KeyPath, out: Dict[KeyPath, Tuple[str, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            out[key] = (source, key_node.start_mark.line + 1)
            _key_lines(value_node, source, key, out)


def _read_yaml(path: Path) -> Tuple[Dict[str, Any], Dict[KeyPath, Tuple[str, int]]]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        lines: Dict[KeyPath, Tuple[str, int]] = {}
        _key_lines(yaml.compose(text, Loader=yaml.SafeLoader), source, (), lines)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"{mark.line + 1}" if mark is not None else "?"
        problem = getattr(error, "problem", None) or str(error)
        raise RecipeError([f"{source}:{line}: <yaml>: {problem}"]) from None
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        byte = error.object[error.start]
        raise RecipeError(
            [f"{source}:{line}: <encoding>: not UTF-8 text (byte 0x{byte:02x}; save the file as UTF-8)"]
        ) from None
    except OSError as error:
        raise RecipeError([f"{source}: cannot read: {error.strerror}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{source}:1: <root>: a recipe must be a mapping, got {type(data).__name__}"])
    return data, lines


def _merge(base: Dict[str, Any], child: Dict[str, Any]) -> Dict[str, Any]:
    """Deep merge; a child mapping with ``_delete_: true`` replaces the base's instead."""
    merged = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict):
            value = dict(value)
            replace = value.pop("_delete_", False)
            if not replace and isinstance(merged.get(key), dict):
                merged[key] = _merge(merged[key], value)
                continue
            merged[key] = _merge({}, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _drop_replaced_lines(lines: Dict[KeyPath, Any], child: Dict[str, Any], prefix: KeyPath = ()) -> None:
    for key, value in child.items():
        path = (*prefix, key)
        if isinstance(value, dict):
            if value.get("_delete_"):
                for stale in [p for p in lines if p[: len(path)] == path and len(p) > len(path)]:
                    del lines[stale]
            _drop_replaced_lines(lines, value, path)


def _load_tree(path: Path, stack: Tuple[Path, ...] = ()) -> _Located:
    if path in stack:
        cycle = " -> ".join(str(p) for p in (*stack, path))
        raise RecipeError([f"{stack[-1]}: _base_: inheritance cycle: {cycle}"])
    data, lines = _read_yaml(path)
    bases = data.pop("_base_", [])
    base_line = lines.pop(("_base_",), (str(path), None))
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError([f"{path}:{base_line[1]}: _base_: must be a file name or a list of file names"])
    merged = _Located(data={})
    for base in bases:
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise RecipeError([f"{path}:{base_line[1]}: _base_: base recipe {base!r} not found (looked at {base_path})"])
        located = _load_tree(base_path, (*stack, path))
        merged.data = _merge(merged.data, located.data)
        merged.lines.update(located.lines)
        merged.files.extend(located.files)
    _drop_replaced_lines(merged.lines, data)
    merged.data = _merge(merged.data, data)
    merged.lines.update({k: v for k, v in lines.items() if k[-1] != "_delete_"})
    merged.files.append(str(path))
    return merged


def _apply_overrides(located: _Located, overrides: Iterable[str]) -> List[str]:
    """Apply ``a.b=value`` / ``~a.b`` in order; returns one error line per override that cannot apply.

    Every key an override creates is attributed to the command line, so that a typo in it is too."""
    errors = []
    for override in overrides:
        delete = override.startswith("~")
        if not delete and "=" not in override:
            errors.append(f"{OVERRIDE_SOURCE}: {override}: overrides look like a.b=value or ~a.b")
            continue
        dotted = override[1:] if delete else override.split("=", 1)[0].strip()
        if not all(dotted.split(".")):
            errors.append(f"{OVERRIDE_SOURCE}: {dotted}: empty key name (write keys as a.b.c, without "
                          "leading, trailing or doubled dots)")
            continue
        keys = _override_keys(located.data, dotted)
        if delete:
            parent = _walk(located.data, keys[:-1])
            if not isinstance(parent, dict) or keys[-1] not in parent:
                errors.append(f"{OVERRIDE_SOURCE}: {dotted}: cannot delete, the key does not exist")
                continue
            del parent[keys[-1]]
            continue
        text = override.split("=", 1)[1]
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = located.data
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
        for depth in range(1, len(keys)):
            located.lines.setdefault(keys[:depth], (OVERRIDE_SOURCE, None))
        located.lines[keys] = (OVERRIDE_SOURCE, None)
    return errors


def _override_keys(data: Dict[str, Any], dotted: str) -> KeyPath:
    """Split ``dotted`` at its dots, except where the rest names an existing key that contains dots
    (``optimization.lr_multipliers.attentions.1.attn.in_proj``: the last key is one name)."""
    parts = dotted.split(".")
    node: Any = data
    for index, part in enumerate(parts):
        rest = ".".join(parts[index:])
        if isinstance(node, dict) and index < len(parts) - 1 and rest in node:
            return tuple(parts[:index]) + (rest,)
        node = node.get(part) if isinstance(node, dict) else None
    return tuple(parts)


def _walk(data: Any, keys: KeyPath) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _where(lines: Dict[KeyPath, Tuple[str, Optional[int]]], path: KeyPath, fallback: str) -> str:
    """``file:line`` of the deepest known key on ``path``."""
    for depth in range(len(path), 0, -1):
        if path[:depth] in lines:
            source, line = lines[path[:depth]]
            return f"{source}:{line}" if line is not None else source
    return fallback


def _format_errors(
    error: ValidationError,
    prefix: KeyPath,
    located: _Located,
    fallback: str,
    model: type,
    extra_allowed: Sequence[str] = (),
) -> List[str]:
    """One line per problem; ``model`` is what the error's locations are relative to (at ``prefix``)."""
    lines = []
    for item in error.errors():
        loc = tuple(str(p) for p in item["loc"])
        path = (*prefix, *loc)
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1]) + (list(extra_allowed) if len(loc) == 1 else [])
            message = "unknown key" + _unknown_key_hint(loc[-1], allowed)
        elif item["type"] == "literal_error":
            message = item["msg"].replace("Input should be", "must be")
        lines.append(f"{_where(located.lines, path, fallback)}: {'.'.join(path) or '<root>'}: {message}")
    return lines


def _unknown_key_hint(key: str, allowed: Sequence[str]) -> str:
    """`` (did you mean 'x'? allowed: ...)`` for an unknown ``key``; empty when nothing is known."""
    if not allowed:
        return ""
    close = difflib.get_close_matches(key, list(allowed), n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f" ({guess}allowed: {', '.join(allowed)})"


def _section_model(annotation: Any) -> Optional[type]:
    """The pydantic model among a field's annotation (``X``, ``Optional[X]``), if any."""
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _allowed_keys(model: Optional[type], path: Sequence[str]) -> List[str]:
    """The keys of the fixed section at ``path`` inside ``model`` ([] where the section takes any key)."""
    for key in path:
        info = model.model_fields.get(key) if model is not None else None
        model = _section_model(info.annotation) if info is not None else None
    if model is None or model.model_config.get("extra") == "allow":
        return []
    return list(model.model_fields)


_COMPONENT_SECTIONS: Tuple[Tuple[KeyPath, str, str], ...] = (
    # (path, registry kind, default type)
    (("model",), "detectors", "streampetr"),
    (("model", "backbone"), "backbones", ""),
    (("model", "neck"), "necks", ""),
    (("model", "roi_head"), "heads", ""),
    (("model", "head"), "heads", ""),
    (("data", "train"), "datasets", ""),
    (("data", "val"), "datasets", ""),
    (("optimization", "optimizer"), "optimizers", ""),
    (("optimization", "lr_scheduler"), "lr_schedulers", ""),
    (("tracking",), "trackers", DEFAULT_TRACKER),
)
# keys of a component section that are not the component's options
_NOT_OPTIONS = {
    ("model",): {"type", "backbone", "neck", "roi_head", "head"},
    ("tracking",): {"type", "evaluate"},
}


def _component_sections(data: Dict[str, Any]) -> List[Tuple[KeyPath, str, str, Dict[str, Any]]]:
    """(path, registry kind, component name, options) of every registered-component section present."""
    sections = []
    for path, kind, default_type in _COMPONENT_SECTIONS:
        section = _walk(data, path)
        if not isinstance(section, dict):
            continue
        name = section.get("type", default_type)
        if not isinstance(name, str) or not name:
            continue  # the structural validation reports a missing or malformed type
        skip = _NOT_OPTIONS.get(path, {"type"})
        sections.append((path, kind, name, {k: v for k, v in section.items() if k not in skip}))
    adapters = _walk(data, ("accelerator", "adapters"))
    if isinstance(adapters, dict):
        for name, switch in adapters.items():
            if isinstance(switch, dict):
                options = {k: v for k, v in switch.items() if k != "enabled"}
                sections.append((("accelerator", "adapters", name), "adapters", name, options))
    return sections


def _validate_components(
    located: _Located, fallback: str, registries: "Registries"
) -> Tuple[List[str], List[Tuple[KeyPath, str, BaseModel]]]:
    """Check every component section against its registered params; returns errors and the params
    instances (``(path, kind, params)``; none for components registered without a params model)."""
    errors: List[str] = []
    validated = []
    for path, kind, name, options in _component_sections(located.data):
        registry = registries.kind(kind)
        type_path = path if kind == "adapters" else (*path, "type")
        if name not in registry:
            errors.append(f"{_where(located.lines, type_path, fallback)}: {'.'.join(type_path)}: "
                          f"{registry.unknown_message(name)}")
            continue
        try:
            params = registry.validate(name, options)
        except ValidationError as error:
            sub_components = sorted(_NOT_OPTIONS.get(path, {"type"}))
            errors.extend(_format_errors(error, path, located, fallback, registry.get(name).params,
                                         sub_components))
            continue
        if params is not None:
            validated.append((path, kind, params))
    return errors, validated


def _section(recipe: Recipe, path: KeyPath, kind: str) -> ComponentOptions:
    """The section of ``recipe`` at ``path`` (an adapter's switch for ``accelerator.adapters.<name>``)."""
    if kind == "adapters":
        return recipe.accelerator.adapters[path[-1]]
    section: Any = recipe
    for key in path:
        section = getattr(section, key)
    return section


def load_recipe(
    path_or_name: Union[str, Path], overrides: Sequence[str] = (), *, host: "PluginHost"
) -> Recipe:
    """Load, merge, override and validate a recipe against the components of ``host``, then run its
    ``streampetr_configure`` hook; raises :class:`RecipeError` listing every problem."""
    path = resolve_recipe_path(path_or_name)
    located = _load_tree(path)
    errors = _apply_overrides(located, overrides)
    located.data.setdefault("name", path.stem)
    fallback = str(path)
    component_errors, validated = _validate_components(located, fallback, host.registries)
    errors += component_errors
    try:
        recipe = Recipe.model_validate(located.data)
    except ValidationError as error:
        raise RecipeError(_format_errors(error, (), located, fallback, Recipe) + errors) from None
    if errors:
        raise RecipeError(errors)
    for path_, kind, params in validated:
        _section(recipe, path_, kind).use_params(params)
    recipe._source = str(path)
    host.hooks.configure(recipe=recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    """The resolved recipe as plain data (what `streampetr show` prints and runs save)."""
    return recipe.model_dump(mode="json")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None)
