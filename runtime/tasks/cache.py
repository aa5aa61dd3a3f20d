"""Where trained weights live: one file per task and recipe, written atomically, its baseline beside it."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def cache_root() -> Path:
    """$TENSORFOLD_CACHE, else $XDG_CACHE_HOME/tensorfold, else ~/.cache/tensorfold."""
    if os.environ.get("TENSORFOLD_CACHE"):
        return Path(os.environ["TENSORFOLD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tensorfold"


def recipe_key(recipe: dict[str, Any]) -> str:
    # repr of the sorted items: the key the digits example has always used, so its cached weights stay valid
    return hashlib.sha256(repr(sorted(recipe.items())).encode()).hexdigest()[:12]


def weights_path(stem: str, recipe: dict[str, Any]) -> Path:
    return cache_root() / f"{stem}_{recipe_key(recipe)}.pt"


def baseline_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """write(tmp_name) then rename: a concurrent reader sees the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the cache is as shared as any file here
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: Path, record: dict[str, Any]) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)

    write_atomic(path, dump)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
