"""The documentation stands alone and matches the code: no references to notes outside the repository,
every `docs/<page>.md#anchor` cited anywhere resolves, every registered pass has its section in
docs/methods.md, docs/cli.md is what the parser prints, and the site builds with no warning."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# notes that lived beside the repository once; a clone has none of them
OUTSIDE = re.compile(r"\.\./shared|shared/(?:algorithms|design|toolchain|style)\.md|\balgorithms\.md|\bdesign\.md"
                     r"|(?<!docs/)(?<![\w/])toolchain\.md|§\s?\d")
# inside the docs site a bare `toolchain.md` is our own page
OUTSIDE_IN_DOCS = re.compile(OUTSIDE.pattern.replace(r"|(?<!docs/)(?<![\w/])toolchain\.md", ""))
STANDARD_SECTIONS = re.compile(r"RFC \d+ §")  # a section of a public standard is not a note of ours
CITATION = re.compile(r"docs/([\w-]+\.md)#([\w-]+)")


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = []
    for name in names:
        path = ROOT / name
        if path == Path(__file__).resolve():  # its own examples of what is caught
            continue
        if path.suffix in {".png", ".npz", ".npy", ".onnx", ".tfz", ".pt"} or not path.is_file():
            continue
        try:
            path.read_text()
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def slug(heading: str) -> str:
    """The anchor GitHub and mkdocs (toc's default slugify) give a heading."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # '#' lines inside code are not headings
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def test_nothing_cites_notes_outside_the_repository():
    offenders = []
    for path in _tracked_text_files():
        in_docs = path.parent == DOCS or path.name == "mkdocs.yml"
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if (OUTSIDE_IN_DOCS if in_docs else OUTSIDE).search(STANDARD_SECTIONS.sub("", line)):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "references to notes outside the repository:\n" + "\n".join(offenders)


def test_the_outside_check_catches_each_kind():
    for line in ["see ../shared/design.md", "(algorithms.md §4)", "rank (§6.1)", "the pins (toolchain.md)"]:
        assert OUTSIDE.search(line), line
    for line in ["docs/toolchain.md#tvm", "docs/methods.md#tucker2", "DEFLATE (RFC 1951 §3.2.2)"]:
        assert not OUTSIDE.search(STANDARD_SECTIONS.sub("", line)), line


def test_every_cited_docs_anchor_exists():
    known = {page.name: anchors(page) for page in DOCS.glob("*.md")}
    broken = []
    for path in _tracked_text_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for page, anchor in CITATION.findall(line):
                if anchor not in known.get(page, set()):
                    broken.append(f"{path.relative_to(ROOT)}:{number}: docs/{page}#{anchor}")
    assert not broken, "citations of missing docs sections:\n" + "\n".join(broken)


def test_every_registered_pass_has_a_methods_section():
    from tensorfold.passes import load_all

    sections = anchors(DOCS / "methods.md")
    missing = sorted(name for name in load_all() if slug(name) not in sections)
    assert not missing, f"docs/methods.md has no '## <name>' section for: {', '.join(missing)}"


def test_passes_command_links_each_pass_to_its_section(capsys):
    from tensorfold.cli import main
    from tensorfold.passes import load_all

    assert main(["passes"]) == 0
    listed = capsys.readouterr().out
    sections = anchors(DOCS / "methods.md")
    for name in load_all():
        assert f"docs: docs/methods.md#{name}" in listed
        assert name in sections


def _cli_docs():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_page_is_what_the_parser_prints():
    expected = _cli_docs().render()
    assert (DOCS / "cli.md").read_text() == expected, "docs/cli.md is stale: run `python scripts/cli_docs.py`"


@pytest.mark.timeout(600)
def test_docs_site_builds_without_warnings(tmp_path):
    if shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None:
        pytest.fail('mkdocs is missing: pip install -e ".[dev]" -c constraints.txt installs it')
    site = tmp_path / "site"
    # as on a fresh clone: the API sources are copied during the build (scripts/docs_hooks.py), not before
    shutil.rmtree(ROOT / "build" / "docs-api", ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    api = (site / "python-api" / "index.html").read_text()
    # the API page carries the docstrings themselves, not just the headings
    assert "Run a pipeline" in api and "PassContext" in api
    methods = (site / "methods" / "index.html").read_text()
    assert 'id="tucker2"' in methods
