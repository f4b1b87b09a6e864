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


# ------------------------------------------------------------------------ references to files

REPO = DOCS.parent
USER_DOCS = sorted([REPO / "README.md", *DOCS.glob("*.md"), *REPO.glob("examples/*/README.md")])
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# a path inside the repository named in the text: docs/x.md, streampetr_plugin/..., recipes/..., ...
REPOSITORY_PATH = re.compile(r"(?<![\w./-])((?:docs|streampetr_plugin|recipes|tests|examples)/[\w./-]*[\w/])")
# files that lie outside the repository (a user cannot open them)
OUTSIDE_FILES = re.compile(r"STREAMPETR_SPEC|(?<![\w.-])shared/|fidelity/README")


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_markdown_links_point_at_files_in_the_repository():
    broken = []
    for doc in USER_DOCS:
        for target in MARKDOWN_LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            resolved = (doc.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(REPO.resolve()) or not resolved.exists():
                broken.append(f"{_relative(doc)}: ({target})")
    assert not broken, broken


def test_paths_named_in_the_docs_exist():
    missing = []
    for doc in USER_DOCS:
        for reference in REPOSITORY_PATH.findall(doc.read_text(encoding="utf-8")):
            if not (REPO / reference).exists():
                missing.append(f"{_relative(doc)}: {reference}")
    assert not missing, missing


def test_docs_name_no_file_outside_the_repository():
    found = []
    for doc in USER_DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
            if OUTSIDE_FILES.search(line):
                found.append(f"{_relative(doc)}:{number}: {line.strip()}")
    assert not found, found


def test_reference_checks_catch_what_they_are_for():
    text = "See [a](docs/none.md), [b](../../x.md), `streampetr_plugin/none.py` and STREAMPETR_SPEC.md."
    assert MARKDOWN_LINK.findall(text) == ["docs/none.md", "../../x.md"]
    assert REPOSITORY_PATH.findall(text) == ["docs/none.md", "streampetr_plugin/none.py"]
    assert OUTSIDE_FILES.search(text)
    assert not REPOSITORY_PATH.findall("https://example.org/docs/page and my_tests/x.py")


# ------------------------------------------------------------------------ words a user cannot follow

# How the project was worked on, which means nothing to a reader: "issue 7", "this session", "the
# sixth round", "four other engineers".
INTERNAL_WORDS = re.compile(
    r"\bissue\s*#?\d+|\bsessions?\b|\bother engineers\b"
    r"|\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|previous|this) round\b",
    re.IGNORECASE,
)
SOURCES = sorted(
    path for pattern in ("*.py", "*.yaml") for path in (REPO / "streampetr_plugin").rglob(pattern)
)


def test_docs_and_sources_use_no_internal_vocabulary():
    found = []
    for path in USER_DOCS + SOURCES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if INTERNAL_WORDS.search(line) or (path.suffix != ".md" and OUTSIDE_FILES.search(line)):
                found.append(f"{_relative(path)}:{number}: {line.strip()}")
    assert not found, found
