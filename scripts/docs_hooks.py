"""mkdocs hook: give the API pages the installed package layout.

pyproject.toml maps `tensorfold.ir` to `ir/`, `tensorfold.passes` to `passes/` and so on, while
mkdocstrings reads sources statically (griffe), where a package is a folder of that name. So before
the build this copies the sources into `build/docs-api/tensorfold/` as they are installed, and
mkdocs.yml points mkdocstrings there. A copy, not links: griffe resolves links back to the source
folders and would find `ir` as a top-level package again.
"""
from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from mkdocs.plugins import event_priority


@event_priority(100)  # before mkdocstrings sets up its handler, which drops search paths that do not exist yet
def on_config(config):
    root = Path(config.config_file_path).parent
    package_dir = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    tree = root / "build" / "docs-api"
    shutil.rmtree(tree, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    # parents before children; a nested package (runtime.tasks) comes with its parent's folder
    for package, folder in sorted(package_dir.items(), key=lambda item: item[0].count(".")):
        destination = tree.joinpath(*package.split("."))
        if not destination.exists():
            shutil.copytree(root / folder, destination, ignore=ignore)
    return config
