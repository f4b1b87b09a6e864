import inspect
import re
from pathlib import Path

from streampetr_plugin import hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs"


def hook_signatures():
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("streampetr_"):
            parameters = ", ".join(inspect.signature(function).parameters)
            yield name, f"{name}({parameters})"


def test_every_hook_is_documented_with_its_exact_signature():
    text = (DOCS / "plugins.md").read_text()
    signatures = dict(hook_signatures())
    assert len(signatures) >= 14
    for signature in signatures.values():
        assert f"`{signature}`" in text, f"docs/plugins.md lacks `{signature}`"
    documented = set(re.findall(r"`(streampetr_\w+)\(", text))
    assert documented == set(signatures), documented ^ set(signatures)
