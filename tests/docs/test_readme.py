"""The README stays true: its Python blocks run (top to bottom, one session), its fast `tensorfold` commands
run, and every command, option and pass it names exists. A block preceded by `<!-- test: parse-only (why) -->`
(benchmarks, tuning, files the reader brings) is checked against its parser only."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!--\s*test:\s*(?P<mark>[^>]*?)\s*-->\s*\n)?^```(?P<lang>\w*)\n(?P<body>.*?)^```",
                   re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


@dataclass
class Block:
    lang: str
    body: str
    mark: str
    line: int

    @property
    def parse_only(self) -> bool:
        return self.mark.startswith("parse-only")


def readme_blocks() -> list[Block]:
    text = README.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        mark = (match.group("mark") or "").strip()
        if mark and not mark.startswith("parse-only"):
            raise AssertionError(f"README.md: unknown test marker {mark!r} (known: parse-only (why))")
        blocks.append(Block(match.group("lang"), match.group("body"), mark, text.count("\n", 0, match.start()) + 1))
    return blocks


def commands(body: str) -> list[list[str]]:
    """Shell lines as argv lists: continuations joined, comments and leading VAR=value dropped."""
    argvs = []
    for line in body.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
            argv = argv[1:]
        if argv:
            argvs.append(argv)
    return argvs


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def _benchmark_parser(script: str) -> argparse.ArgumentParser:
    path = ROOT / script
    assert path.is_file(), f"README names {script}, which does not exist"
    sys.path.insert(0, str(path.parent))  # benchmarks import each other as plain modules
    try:
        spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module.build_parser()


def _strict_parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{where}: {shlex.join(argv)!r} does not parse: {err.getvalue().strip()}") from None


def _check_pipeline(text: str, where: str) -> None:
    from tensorfold.passes import load_all
    from tensorfold.passes.pipeline import normalize
    from tensorfold.passes.registry import get

    load_all()
    for name, options in normalize(text):
        get(name).resolve(options)  # unknown pass / option / bad type raise, naming what exists


def _check_named_options(argv: list[str], where: str) -> None:
    """For synopses and inline mentions (placeholders allowed): the subcommand and each --option exist."""
    from tensorfold.cli import build_parser

    commands_ = _subparsers(build_parser())
    words = [w for w in argv[1:] if not w.startswith("[")] or [""]
    assert words[0] in commands_, f"{where}: `tensorfold {words[0]}` is not a command ({', '.join(commands_)})"
    known = _options(commands_[words[0]])
    for word in argv:
        flag = word.strip("[]").split("=")[0]
        if flag.startswith("--"):
            assert flag in known, f"{where}: `tensorfold {words[0]}` has no option {flag}"


def _cli_lines():
    for block in readme_blocks():
        for argv in commands(block.body) if block.lang == "bash" else []:
            if argv[0] == "tensorfold" or (argv[0] == "python" and argv[1:2] and argv[1].startswith("benchmarks/")):
                yield pytest.param(argv, block.parse_only, id=f"L{block.line}:{' '.join(argv)[:60]}")


@pytest.mark.parametrize(("argv", "parse_only"), list(_cli_lines()))
def test_readme_command(argv, parse_only, tmp_path, monkeypatch, capsys):
    where = f"README.md ({shlex.join(argv)[:80]})"
    if argv[0] == "python":
        _strict_parse(_benchmark_parser(argv[1]), argv[2:], where)
        assert parse_only, f"{where}: a benchmark in a block without the parse-only marker"
        return
    from tensorfold.cli import build_parser, main

    args = _strict_parse(build_parser(), argv[1:], where)
    if getattr(args, "passes", None):
        _check_pipeline(args.passes, where)
    if parse_only:
        return
    monkeypatch.chdir(tmp_path)
    code = main(argv[1:])
    out = capsys.readouterr()
    assert code == 0, f"{where} exited {code}:\n{out.out[-2000:]}\n{out.err[-2000:]}"
    if "-o" in argv:  # what it says it writes, it writes
        assert (tmp_path / argv[argv.index("-o") + 1]).exists()


def test_every_tensorfold_mention_names_real_commands_and_options():
    text = README.read_text()
    mentions = [shlex.split(m.replace("...", ""), comments=True) for m in INLINE.findall(text)
                if m.startswith("tensorfold ")]
    for block in readme_blocks():
        if block.lang in ("bash", "text"):
            mentions += [argv for argv in commands(block.body) if argv[0] == "tensorfold"]
    assert len(mentions) > 20
    for argv in mentions:
        _check_named_options(argv, f"README.md (`{' '.join(argv)[:80]}`)")


def test_every_pass_option_named_in_the_readme_exists():
    """`int8(calibrate=..., keep_first)` in the prose: the pass exists and has each option named."""
    from tensorfold.passes import load_all
    from tensorfold.passes.pipeline import _split_top_level

    passes = load_all()
    checked = 0
    for span in INLINE.findall(README.read_text()):
        match = re.fullmatch(r"(\w+)\((.*)\)", span.strip())
        if not match or match.group(1) not in passes:
            continue
        options = passes[match.group(1)].options
        for item in _split_top_level(match.group(2), span):
            key = item.split("=")[0].strip()
            if key and key != "...":
                assert key in options, f"README.md: `{span}` names option {key!r}; {match.group(1)} has {sorted(options)}"
        checked += 1
    assert checked > 5


def test_inline_benchmark_commands_parse():
    for span in INLINE.findall(README.read_text()):
        argv = shlex.split(span) if span.startswith("python benchmarks/") else []
        if argv:
            _strict_parse(_benchmark_parser(argv[1]), argv[2:], f"README.md (`{span}`)")


@pytest.mark.timeout(900)
def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    namespace: dict = {"__name__": "readme"}
    monkeypatch.chdir(tmp_path)
    ran = 0
    for block in readme_blocks():
        if block.lang != "python":
            continue
        code = compile(block.body, f"README.md:{block.line}", "exec")
        if block.parse_only:
            continue
        exec(code, namespace)  # noqa: S102 - the README's own snippets, in order, as a reader runs them
        ran += 1
    assert ran >= 4
    assert (tmp_path / "resnet18_folded.onnx").exists() and (tmp_path / "model.tfz").exists()
