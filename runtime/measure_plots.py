"""PNG plots of a measure report (matplotlib, Agg: no display needed)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .measure_report import MeasureReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _timed(report: "MeasureReport") -> list[dict]:
    return [r for r in report.rows if r["status"] == "ok" and r.get("latency")]


def _label(row: dict) -> str:
    return f"{row['engine']} @ {row['target']}" + (" (emulated)" if row.get("emulated") else "")


def plot_latency(report: "MeasureReport", path: str) -> str | None:
    """Median latency with IQR whiskers, grouped by engine @ target, one bar per candidate."""
    rows = _timed(report)
    if not rows:
        return None
    plt = _pyplot()
    groups = list(dict.fromkeys(_label(r) for r in rows))
    candidates = list(dict.fromkeys(r["candidate"] for r in rows))
    width = 0.8 / len(candidates)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(candidates) / 2)), 4.5))
    for i, candidate in enumerate(candidates):
        xs, heights, errs = [], [], []
        for g, group in enumerate(groups):
            for r in rows:
                if r["candidate"] == candidate and _label(r) == group:
                    xs.append(g + i * width)
                    heights.append(r["latency"]["median_ms"])
                    errs.append(r["latency"]["iqr_ms"] / 2)
        ax.bar(xs, heights, width, yerr=errs, label=candidate, capsize=3)
    ax.set_xticks([g + width * (len(candidates) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_ylabel("median latency (ms), whiskers: IQR")
    ax.set_title("latency per engine and target")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(report: "MeasureReport", path: str) -> str | None:
    """Accuracy (top-1, or top-1 agreement with the original without labels) against latency."""
    rows = [r for r in _timed(report) if (r.get("accuracy") or r.get("fidelity"))]
    if not rows:
        return None
    plt = _pyplot()
    labelled = any(r.get("accuracy") for r in rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        y = (r.get("accuracy") or {}).get("top1") if labelled else r["fidelity"]["top1_agreement"]
        if y is None:
            continue
        ax.scatter(r["latency"]["median_ms"], 100 * y, marker="x" if r.get("emulated") else "o")
        ax.annotate(f"{r['candidate']}\n{_label(r)}", (r["latency"]["median_ms"], 100 * y), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median latency (ms, log)")
    ax.set_ylabel("top-1 accuracy (%)" if labelled else "top-1 agreement with the original (%)")
    ax.set_title("accuracy vs latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
