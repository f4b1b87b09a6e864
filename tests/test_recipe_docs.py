"""docs/recipes.md is generated from the schema and the built-in registries, and kept current."""
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import pytest
from pydantic import BaseModel, ConfigDict, Field

from streampetr_plugin import hookimpl
from streampetr_plugin.config.docs import REGENERATE_COMMAND, _type_name, recipe_reference_markdown
from streampetr_plugin.config.schema import ComponentSpec, Recipe
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.plugins import REGISTRY_KINDS, PluginHost

DOCS = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"


@pytest.fixture(scope="module")
def generated() -> str:
    return recipe_reference_markdown(create_plugin_host(entry_points=False).registries)


def test_docs_recipes_md_is_current(generated):
    assert DOCS.read_text(encoding="utf-8") == generated, (
        f"docs/recipes.md is out of date with the recipe schema or the built-in components; "
        f"regenerate it with: {REGENERATE_COMMAND}"
    )


def _section_rows(text: str, heading: str) -> List[str]:
    """Keys of the first table after ``heading``."""
    lines = text.split(f"\n{heading}\n", 1)[1].splitlines()
    start = lines.index("| key | type | default | description |") + 2
    keys = []
    for line in lines[start:]:
        if not line.startswith("| `"):
            break
        keys.append(line.split("|")[1].strip().strip("`"))
    return keys


def _sections(model, path):
    for name, info in model.model_fields.items():
        annotation = info.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for candidate in candidates:
            is_model = isinstance(candidate, type) and issubclass(candidate, BaseModel)
            if is_model and not issubclass(candidate, ComponentSpec):
                key = f"{name}.<name>" if getattr(annotation, "__origin__", None) is dict else name
                yield f"{path}.{key}" if path else key, candidate


def test_every_section_and_field_of_the_schema_is_documented(generated):
    assert _section_rows(generated, "## Sections") == list(Recipe.model_fields)
    seen = 0
    stack = list(_sections(Recipe, ""))
    while stack:
        path, model = stack.pop()
        assert _section_rows(generated, f"### `{path}`") == list(model.model_fields), path
        stack.extend(_sections(model, path))
        seen += 1
    assert seen >= 8  # model, data, optimization (+ grad_clip, amp), runtime, accelerator (+ adapters.<name>)


def test_every_builtin_component_is_documented_with_its_options(generated):
    host = create_plugin_host(entry_points=False)
    for kind in REGISTRY_KINDS:
        for entry in host.registries.kind(kind).entries():
            heading = f"#### {kind}: `{entry.name}`"
            assert heading in generated
            if entry.params is not None and entry.params.model_fields:
                assert _section_rows(generated, heading) == list(entry.params.model_fields)


def test_a_plugin_component_appears_with_type_default_range_and_description():
    class WidthParams(BaseModel):
        """Options of the test backbone."""

        model_config = ConfigDict(extra="forbid")
        width: int = Field(16, ge=8, description="channels | of both outputs")
        mode: Literal["fast", "exact"] = Field("fast", description="how")

    class Extra:
        @hookimpl
        def streampetr_register_backbones(self, register):
            register("doc_test_backbone", lambda params: params, params=WidthParams)

    host = PluginHost()
    host.register_plugin(Extra(), name="extra")
    text = recipe_reference_markdown(host.registries)
    component = text.split("#### backbones: `doc_test_backbone`", 1)[1]
    assert "Options of the test backbone." in component
    assert "| `width` | int, >= 8 | `16` | channels \\| of both outputs |" in component
    assert '| `mode` | one of "fast", "exact" | `"fast"` | how |' in component


@pytest.mark.parametrize(
    "annotation, text",
    [
        (Optional[int], "int or null"),
        (List[str], "list of str"),
        (Tuple[int, int], "[int, int]"),
        (Dict[str, float], "mapping str -> float"),
        (Literal["a", 1], 'one of "a", 1'),
    ],
)
def test_type_names_read_like_yaml(annotation, text):
    assert _type_name(annotation) == text
