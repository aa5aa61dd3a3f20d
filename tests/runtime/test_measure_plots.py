"""The measure plots: no overlapping point labels (a legend names every point) and each plot states the
machine, threads and tuning budget it was measured with."""
from __future__ import annotations

import pytest

from tensorfold.runtime.measure_plots import accuracy_figure, latency_figure, plot_accuracy, plot_latency
from tensorfold.runtime.measure_report import OK, MeasureReport


def _report(labelled: bool = True) -> MeasureReport:
    report = MeasureReport(settings={"machine": "AMD EPYC 9R14 (family 25, model 17)", "threads": 2,
                                     "tune_trials": 64, "rounds": 20})
    for c, candidate in enumerate(["original", "tucker2"]):
        for e, engine in enumerate(["torch", "onnxruntime", "tvm"]):
            score = {"accuracy": {"top1": 0.99 - 0.001 * (c + e)}} if labelled else \
                {"fidelity": {"top1_agreement": 1.0 - 0.01 * c}}
            # nearly equal points: text labels would sit on top of each other
            report.add(candidate, engine, "x86", OK, latency={"median_ms": 1.0 + 0.01 * e, "iqr_ms": 0.01}, **score)
    emulated_score = {"accuracy": {"top1": 0.98}} if labelled else {"fidelity": {"top1_agreement": 0.98}}
    report.add("tucker2", "tvm-rpc", "arm64", OK, latency={"median_ms": 40.0, "iqr_ms": 1.0}, emulated=True,
               **emulated_score)
    report.add("original", "tvm", "cuda", "failed", reason="no GPU")
    return report


@pytest.mark.parametrize("labelled", [True, False])
def test_accuracy_plot_names_points_in_a_legend_not_on_the_axes(labelled):
    report = _report(labelled)
    fig = accuracy_figure(report)
    ax = fig.axes[0]
    assert len(ax.texts) == 0  # no annotations inside the axes
    entries = [t.get_text() for t in ax.get_legend().get_texts()]
    timed = [r for r in report.rows if r["status"] == OK]
    assert len(entries) == len(timed)
    if labelled:
        assert "tucker2 | tvm @ x86: 1.02 ms, 98.70 %" in entries
    assert len(set(entries)) == len(entries)
    # one colour per candidate, one marker per engine @ target
    collections = ax.collections
    colours = {tuple(c.get_edgecolor()[0]) for c in collections}
    assert len(colours) == 2
    emulated = [c for c in collections if c.get_label().startswith("tucker2 | tvm-rpc @ arm64 (emulated)")]
    assert len(emulated) == 1 and emulated[0].get_facecolor().size == 0  # hollow


def test_each_plot_states_machine_threads_and_tuning_budget(tmp_path):
    report = _report()
    for fig in (accuracy_figure(report), latency_figure(report)):
        footer = " ".join(t.get_text() for t in fig.texts)
        assert "AMD EPYC 9R14 (family 25, model 17)" in footer
        assert "2 threads" in footer and "64 MetaSchedule trials" in footer and "20 interleaved rounds" in footer
    untuned = _report()
    untuned.settings["tune_trials"] = 0
    assert "TVM untuned (0 trials)" in " ".join(t.get_text() for t in latency_figure(untuned).texts)
    for plot in (plot_accuracy, plot_latency):
        path = plot(report, str(tmp_path / f"{plot.__name__}.png"))
        assert path and (tmp_path / f"{plot.__name__}.png").stat().st_size > 10_000


def test_nothing_timed_gives_no_plot(tmp_path):
    report = MeasureReport(settings={"threads": 2})
    report.add("original", "tvm", "cuda", "failed", reason="no GPU")
    assert plot_accuracy(report, str(tmp_path / "a.png")) is None
    assert plot_latency(report, str(tmp_path / "l.png")) is None
