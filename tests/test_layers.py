"""The package's layering (``[tool.importlinter]`` in pyproject.toml): the command line on top, the registries
and errors at the bottom, no module importing a layer above its own, no import cycles."""
from pathlib import Path

from importlinter import configuration
from importlinter.application.use_cases import lint_imports

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_the_import_contracts_hold(capsys):
    # Reads the package the tests import; a broken contract prints the offending import chains.
    configuration.configure()
    kept = lint_imports(config_filename=str(PYPROJECT), cache_dir=None, no_logo=True)
    assert kept, capsys.readouterr().out[-4000:]
