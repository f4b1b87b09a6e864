"""``python -m streampetr_plugin.cli.recipe_docs > docs/recipes.md``: the recipe reference of the built-in
plugin (:mod:`streampetr_plugin.config.docs`)."""
from __future__ import annotations

import sys

from streampetr_plugin.config.docs import recipe_reference_markdown
from streampetr_plugin.host import create_plugin_host

if __name__ == "__main__":
    sys.stdout.write(recipe_reference_markdown(create_plugin_host(entry_points=False).registries))
