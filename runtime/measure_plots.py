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


def run_conditions(report: "MeasureReport") -> str:
    """What a reader needs to compare a plot with another: machine, threads, tuning budget, rounds."""
    s = report.settings
    trials = s.get("tune_trials") or 0
    tuning = f"TVM tuned with {trials} MetaSchedule trials" if trials else "TVM untuned (0 trials)"
    return (f"{s.get('machine', 'unknown CPU')}; {s.get('threads')} threads; {tuning}; "
            f"median of {s.get('rounds')} interleaved rounds")


def _titled(fig, ax, title: str, report: "MeasureReport") -> None:
    ax.set_title(title)
    fig.text(0.01, 0.01, run_conditions(report), fontsize=7, color="0.3", ha="left", va="bottom", wrap=True)


def plot_latency(report: "MeasureReport", path: str) -> str | None:
    fig = latency_figure(report)
    return _save(fig, path) if fig is not None else None


def latency_figure(report: "MeasureReport"):
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
    ax.legend()
    _titled(fig, ax, "latency per engine and target", report)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def plot_accuracy(report: "MeasureReport", path: str) -> str | None:
    fig = accuracy_figure(report)
    return _save(fig, path) if fig is not None else None


def accuracy_figure(report: "MeasureReport"):
    """Accuracy (top-1, or top-1 agreement with the original without labels) against latency.

    Points carry no text labels (they overlap when candidates are close): colour says the candidate,
    the marker the engine @ target (hollow: emulated times), and the legend beside the plot says both.
    """
    rows = [r for r in _timed(report) if (r.get("accuracy") or r.get("fidelity"))]
    labelled = any(r.get("accuracy") for r in rows)
    points = []
    for r in rows:
        y = (r.get("accuracy") or {}).get("top1") if labelled else (r.get("fidelity") or {}).get("top1_agreement")
        if y is not None:
            points.append((r, r["latency"]["median_ms"], 100 * y))
    if not points:
        return None
    plt = _pyplot()
    candidates = list(dict.fromkeys(r["candidate"] for r, _, _ in points))
    placements = list(dict.fromkeys(_label(r) for r, _, _ in points))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xh<>p"
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for r, x, y in points:
        colour = colours[candidates.index(r["candidate"]) % len(colours)]
        marker = markers[placements.index(_label(r)) % len(markers)]
        ax.scatter(x, y, s=50, marker=marker, edgecolors=colour, linewidths=1.5,
                   facecolors="none" if r.get("emulated") else colour,
                   label=f"{r['candidate']} | {_label(r)}: {x:.3g} ms, {y:.2f} %")
    ax.set_xscale("log")
    ax.set_xlabel("median latency (ms, log)")
    ax.set_ylabel("top-1 accuracy (%)" if labelled else "top-1 agreement with the original (%)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, title="candidate | engine @ target",
              title_fontsize=7, frameon=False)
    _titled(fig, ax, "accuracy vs latency", report)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
