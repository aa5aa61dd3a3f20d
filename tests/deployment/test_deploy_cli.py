"""`tensorfold deploy digits --target x86 --speedup 1.5 -o OUT` end to end: every output written, the TVM
artifact built, the report's plots linked."""
from __future__ import annotations

import json

from tensorfold.cli import main


def test_cli_end_to_end_writes_every_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TENSORFOLD_LATENCY_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["deploy", "digits", "--target", "x86", "--speedup", "1.5", "-o", str(out), "--rounds", "5",
                 "-q"]) == 0
    printed = capsys.readouterr().out
    assert "MET" in printed and "pipeline: fold_bn" in printed
    for name in ("model.onnx", "report.json", "report.md", "recipe.toml", "artifact/manifest.json",
                 "stages/latency_table.json", "stages/selection.json", "stages/compressed.onnx", "stages/int8.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["artifact"]["tasks"] > 0 and report["verdict"]["speedup"] > 0
    text = (out / "report.md").read_text()
    pngs = [line.split("(")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert pngs and all((out / p).is_file() for p in pngs)
