"""The measure report: one row per candidate x engine x target; JSON, a rich table, PNG plots."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

OK, UNAVAILABLE, FAILED = "ok", "not available", "failed"


@dataclass
class MeasureReport:
    settings: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def add(self, candidate: str, engine: str, target: str, status: str, **fields: Any) -> dict[str, Any]:
        row = {"candidate": candidate, "engine": engine, "target": target, "status": status, **fields}
        self.rows.append(row)
        return row

    def row(self, candidate: str, engine: str, target: str) -> dict[str, Any]:
        for row in self.rows:
            if (row["candidate"], row["engine"], row["target"]) == (candidate, engine, target):
                return row
        raise KeyError(f"no row for {candidate} / {engine} / {target}")

    def best_engines(self) -> list[dict[str, Any]]:
        """Per candidate x target, the engine with the lowest median latency, and how far each other is.

        Emulated times (qemu) are not device times and never count. Deployment picks by this
        figure: it is reported, so the choice of engine is never a hidden one.
        """
        best = []
        keys = dict.fromkeys((r["candidate"], r["target"]) for r in self.rows)
        for candidate, target in keys:
            timed = {r["engine"]: r["latency"]["median_ms"] for r in self.rows
                     if (r["candidate"], r["target"]) == (candidate, target) and r["status"] == OK
                     and r.get("latency") and not r.get("emulated")}
            if not timed:
                continue
            engine = min(timed, key=timed.get)
            best.append({"candidate": candidate, "target": target, "engine": engine, "median_ms": timed[engine],
                         "others_vs_best": {e: round(ms / timed[engine], 3) for e, ms in timed.items() if e != engine}})
        return best

    def to_json(self) -> dict[str, Any]:
        return {"format": "tensorfold-measure/1", "settings": self.settings, "rows": self.rows,
                "best_engine": self.best_engines(), "errors": self.errors, "files": self.files}

    def save(self, path: str, plots: bool = True) -> list[str]:
        """Write the JSON at `path` and, beside it, `<stem>_latency.png` and `<stem>_accuracy.png`."""
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        written = [path]
        if plots:
            from .measure_plots import plot_accuracy, plot_latency

            stem = os.path.splitext(path)[0]
            written += [p for p in (plot_latency(self, stem + "_latency.png"),
                                    plot_accuracy(self, stem + "_accuracy.png")) if p]
        self.files = written
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2, default=float)
        return written

    def table(self):
        from rich.table import Table

        s = self.settings
        table = Table(title=f"tensorfold measure on {s.get('machine', 'this CPU')}: {s.get('rounds')} interleaved "
                            f"rounds after {s.get('warmup')} warm-up, {s.get('threads')} threads; accuracy on "
                            f"{s.get('data')}")
        for column in ("candidate", "target", "engine", "latency median (ms)", "IQR (ms)", "top-1", "top-5",
                       "agree", "max rel err", "note"):
            table.add_column(column, justify="right" if column[0] in "lIta" and column not in ("target",) else "left")
        for row in self.rows:
            latency, accuracy, fid = row.get("latency") or {}, row.get("accuracy") or {}, row.get("fidelity") or {}
            note = row.get("reason") or ""
            if row.get("precision"):  # OpenVINO: the precision it chose, and the layers that run int8
                note = f"{row['precision']}" + (f", {row['int8_layers']} of {row['compute_layers']} conv/matmul int8"
                                                if row.get("int8_layers") else "") + (f"; {note}" if note else "")
            if row.get("emulated"):
                note = "emulated (qemu): times are not device times" + (f"; {note}" if note else "")
            if row["status"] != OK:
                note = f"{row['status']}: {note}"
            table.add_row(row["candidate"], row["target"], row["engine"], _num(latency.get("median_ms")),
                          _num(latency.get("iqr_ms")), _pct(accuracy.get("top1")), _pct(accuracy.get("top5")),
                          _pct(fid.get("top1_agreement")), _sci(fid.get("max_rel_error")), note)
        return table

    def print(self) -> None:
        from rich.console import Console

        console = Console(soft_wrap=False, width=max(160, Console().width))
        console.print(self.table())
        for best in self.best_engines():
            others = ", ".join(f"{e} {ratio:.2f}x" for e, ratio in best["others_vs_best"].items())
            console.print(f"fastest for {best['candidate']} on {best['target']}: {best['engine']} "
                          f"{best['median_ms']:.3f} ms" + (f" (others: {others})" if others else ""))
        for error in self.errors:
            console.print(f"[red]error on {error['target']}[/red]: {error['message']} (completed: {error['completed']})")


def _num(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _sci(value: Any) -> str:
    return "" if value is None else f"{value:.1e}"
