"""Write docs/cli.md from the `tensorfold` parser and the pass registry (tests/test_docs.py checks it is current).

    python scripts/cli_docs.py          # rewrite docs/cli.md
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
from pathlib import Path

WIDTH = "100"  # argparse wraps help at $COLUMNS: fixed, so the page does not depend on the terminal

HEADER = """# Command line

Generated from the parser by `python scripts/cli_docs.py`; the test suite fails when this page and the
code differ. A MODEL is an `.onnx` file, `torchvision:<arch>` (with `--weights FILE` for a state dict), a
Python factory `package.module:function`, or a trained task (`tensorfold tasks`). The math behind each
pass is in [Methods](methods.md).
"""


def render() -> str:
    from tensorfold.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = build_parser()
        parts = [HEADER, "## tensorfold\n", _block(parser.format_help())]
        for name, command in _subcommands(parser).items():
            parts += [f"## tensorfold {name}\n", _block(command.format_help())]
            if name == "passes":
                parts.append(_passes())
        return "\n".join(parts)
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _passes() -> str:
    from tensorfold.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["passes"])
    return "Its output:\n\n" + _block(out.getvalue())


def _block(text: str) -> str:
    return "```text\n" + text.rstrip() + "\n```\n"


if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
    path.write_text(render())
    print(f"wrote {path}")
