"""What a pass and a pipeline report: per-layer records, totals, a table and JSON."""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerRecord:
    layer: str
    action: str                       # "replaced", "folded", "skipped"
    reason: str = ""
    method: str = ""
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    error_random: float | None = None       # relative output error of the layer alone, random inputs
    error_calibration: float | None = None  # same, on calibration inputs
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class PassReport:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    records: list[LayerRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    output_error_random: float | None = None
    output_error_calibration: float | None = None
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)  # pass-wide figures, e.g. file sizes

    def add(self, record: LayerRecord) -> LayerRecord:
        self.records.append(record)
        return record

    def skip(self, layer: str, reason: str, **fields: Any) -> LayerRecord:
        return self.add(LayerRecord(layer, "skipped", reason, **fields))

    @property
    def changed(self) -> list[LayerRecord]:
        return [r for r in self.records if r.action != "skipped"]


@dataclass
class Report:
    model: str
    passes: list[PassReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    output_error_random: float | None = None
    output_error_calibration: float | None = None
    unknown_ops: list[tuple[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        return [w for p in self.passes for w in p.warnings]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["params_ratio"] = _ratio(self.params_before, self.params_after)
        data["flops_ratio"] = _ratio(self.flops_before, self.flops_after)
        return data

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, default=_json_default)
            f.write("\n")

    def table(self, width: int = 140) -> str:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"tensorfold: {self.model}", show_lines=False)
        for column in ("pass", "layer", "action", "reason / method", "params", "FLOPs", "rel. error"):
            table.add_column(column, overflow="fold")
        for p in self.passes:
            for r in p.records:
                unchanged = r.action == "skipped"
                # names and reasons are plain text: "[...]" in them must not be read as rich markup
                table.add_row(p.name, escape(r.layer), r.action, escape(r.reason or r.method),
                              _human(r.params_before) if unchanged and r.params_before else _arrow(r.params_before, r.params_after),
                              _human(r.flops_before) if unchanged and r.flops_before else _arrow(r.flops_before, r.flops_after),
                              _err(r.error_random, r.error_calibration))
        table.add_section()
        table.add_row("total", "", "", "", _arrow(self.params_before, self.params_after),
                      _arrow(self.flops_before, self.flops_after),
                      _err(self.output_error_random, self.output_error_calibration))
        buffer = io.StringIO()
        console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
        console.print(table)
        notes = [f"warning: {w}" for w in self.warnings]
        notes += [f"left unchanged (op unknown to tensorfold): {node} [{op}]" for node, op in self.unknown_ops]
        notes += [f"{p.name}: {key}: {value}" for p in self.passes for key, value in p.summary.items()]
        notes += [f"{key}: {value}" for key, value in self.extra.items()]
        for note in notes:
            console.print(note, markup=False)
        return buffer.getvalue()


def _ratio(before: int, after: int) -> float | None:
    return before / after if after else None


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _arrow(before: int, after: int) -> str:
    if not before and not after:
        return ""
    ratio = f" ({before / after:.2f}x)" if after and before != after else ""
    return f"{_human(before)} -> {_human(after)}{ratio}"


def _err(random: float | None, calibration: float | None) -> str:
    parts = []
    if random is not None:
        parts.append(f"{random:.2e}")
    if calibration is not None:
        parts.append(f"calib {calibration:.2e}")
    return " / ".join(parts)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
