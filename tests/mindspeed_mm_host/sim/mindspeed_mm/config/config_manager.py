"""SIMULATION of ``mindspeed_mm/config/config_manager.py`` (#1, #2).

``sys.argv[1]`` is the YAML only if it ends in ``.yaml``/``.yml`` and exists; every later
``dotted.key=value`` overrides it, auto-typed (bool words, digit strings, floats, comma lists, else
the string: ``null`` stays the string ``"null"``). Any failure is re-raised as ``ConfigValidationError``.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml


class ConfigValidationError(Exception):
    pass


def parse_string_value(text: str) -> Any:
    if not text:
        return text
    if text.lower() in ("true", "false", "yes", "no", "on", "off"):
        return text.lower() in ("true", "yes", "on")
    if text.isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        pass
    if "," in text:
        return [parse_string_value(part.strip()) for part in text.split(",")]
    return text


def _merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class ConfigManager:
    def __init__(self, config_class: type, argv: Optional[List[str]] = None) -> None:
        self.config_class = config_class
        self.argv = list(sys.argv if argv is None else argv)

    def _config_path(self) -> Optional[str]:
        if len(self.argv) >= 2 and self.argv[1].endswith((".yaml", ".yml")) and Path(self.argv[1]).exists():
            return self.argv[1]
        return None

    def _cli_overrides(self) -> Dict[str, Any]:
        overrides: Dict[str, Any] = {}
        for argument in self.argv[1:]:
            if argument.endswith((".yaml", ".yml")) or "=" not in argument or argument.startswith("-"):
                continue
            key, text = argument.split("=", 1)
            node = overrides
            *parents, leaf = key.strip().split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = parse_string_value(text.strip())
        return overrides

    def load_and_parse(self):
        try:
            path = self._config_path()
            data: Dict[str, Any] = {}
            if path is not None:
                data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            return self.config_class(**_merge(data, self._cli_overrides()))
        except ConfigValidationError:
            raise
        except Exception as error:
            raise ConfigValidationError("Configuration loading failed") from error
