"""The deploy report: report.json (everything) and report.md (per-layer decisions, predicted vs
measured latency, accuracy before/after, met / not met, the measure plots)."""
from __future__ import annotations

import json
import os
from typing import Any

from tensorfold.targets.registry import host_cpu

from . import latency as lat
from .recipe import Recipe


def _row(measured: dict, candidate: str, engine: str) -> dict:
    for row in measured["rows"]:
        if row["candidate"] == candidate and row["engine"] == engine:
            return row
    return {}


def assemble(plan: dict, run, table: dict | None, selection: dict | None, recipe: Recipe, compress_report: dict,
             int8: dict, artifact: dict, measured: dict) -> dict[str, Any]:
    engine = run.engine_name
    before, after = _row(measured, "original", engine), _row(measured, "deployed", engine)
    before_ms = (before.get("latency") or {}).get("median_ms")
    after_ms = (after.get("latency") or {}).get("median_ms")
    goal = {"speedup": plan["speedup"], "latency_ms": plan["latency_ms"], "max_drop": plan["max_drop"]}
    speed = verdict_speed(plan["speedup"], plan["latency_ms"], before_ms, after_ms, measured.get("paired"))
    speedup, speed_met, speed_text = speed["speedup"], speed["met"], speed["text"]
    top1_before = (before.get("accuracy") or {}).get("top1")
    top1_after = (after.get("accuracy") or {}).get("top1")
    if top1_before is not None and top1_after is not None:
        drop = 100 * (top1_before - top1_after)
        drop_met = drop <= plan["max_drop"]
        drop_text = f"top-1 {100 * top1_before:.2f} % -> {100 * top1_after:.2f} % (drop {drop:.2f} points, " \
                    f"allowed {plan['max_drop']:g})"
    else:
        drop, drop_met = None, True
        agreement = (after.get("fidelity") or {}).get("top1_agreement")
        drop_text = "accuracy not checked: no labelled data (--data)" + (
            f"; top-1 agreement with the original {100 * agreement:.1f} %" if agreement is not None else "")
    emulated = bool(before.get("emulated") or after.get("emulated") or (table or {}).get("emulated")
                    or int8.get("emulated"))
    met = bool(speed_met and drop_met and not emulated)
    summary = f"{speed_text}; {drop_text}" + (
        "; the times are emulated (qemu), not device times, so the verdict is never met on them" if emulated else "")
    predicted = None
    if selection is not None:
        predicted_ms = selection["predicted_ms"]
        warm = measured.get("warm") or {}
        # the prediction is for the fp32 model: with int8 kept, its fp32 figure is the int8 decision's
        # (timed as tf.measure times it), not the delivered int8 model's
        fp32_ms = int8.get("fp32_ms") if int8.get("int8") else after_ms
        predicted = {"predicted_ms": predicted_ms, "measured_ms": fp32_ms,
                     "error": (predicted_ms - fp32_ms) / fp32_ms if fp32_ms else None,
                     "steady_state_ms": {k: v["median_ms"] for k, v in warm.items()},
                     "applies_to": "the fp32 factorized model" + (", measured at the int8 decision (the delivered "
                                                                  "model is int8)" if int8.get("int8") else "")}
    return {
        "format": "tensorfold-deploy/1", "model": str(plan["model"]), "target": run.target.name,
        "machine": host_cpu() if run.target.placement.kind == "local" else run.target.name, "engine": engine, "threads": run.threads, "goal": goal,
        "verdict": {"met": met, "speed_met": bool(speed_met), "accuracy_met": bool(drop_met), "emulated": emulated,
                    "speedup": speedup, "speedup_interval": speed["interval"],
                    "speedup_of_medians": speed["of_medians"],
                    "original_ms": before_ms, "deployed_ms": after_ms, "drop_points": drop,
                    "top1_before": top1_before, "top1_after": top1_after, "summary": summary,
                    "selection_reached_goal": None if selection is None else selection["met"]},
        "prediction": predicted, "latency_table": table, "selection": selection,
        "pipeline": recipe.pipeline_text(), "int8": int8, "int8_first": run.first,
        "factor_goal_ms": None if selection is None else run.factor_goal_ms(table), "finetune_epochs": recipe.finetune_epochs,
        "finetune": run.finetune,
        "compress": {k: compress_report.get(k) for k in ("params_before", "params_after", "flops_before",
                                                          "flops_after", "params_ratio", "flops_ratio")},
        "artifact": artifact, "measure": measured, "data": plan["data_name"],
        "calibration": plan["calibration_name"], "stages_reused": list(run.stages.reused),
        "recipe": None if plan["recipe_path"] is None else os.path.abspath(plan["recipe_path"]),
    }


def verdict_speed(speedup_goal: float | None, latency_goal: float | None, before_ms: float | None,
                  after_ms: float | None, paired: dict | None) -> dict:
    """The speed half of the verdict. A speed-up goal is checked on `paired` when it was timed (the
    original and the deployed model interleaved until the median of per-round ratios is precise, as the
    decisions were), else on the ratio of tf.measure's medians; a 95 % interval that spans the goal is
    said. A latency goal is checked on tf.measure's median of the deployed model."""
    of_medians = before_ms / after_ms if before_ms and after_ms else None
    if latency_goal is not None:
        return {"speedup": of_medians, "of_medians": of_medians, "interval": None,
                "met": after_ms is not None and after_ms <= latency_goal,
                "text": f"latency {after_ms:.3f} ms against the requested {latency_goal:g} ms"}
    if paired is None:
        return {"speedup": of_medians, "of_medians": of_medians, "interval": None,
                "met": of_medians is not None and of_medians >= speedup_goal,
                "text": (f"speed-up {of_medians:.2f}x against the requested {speedup_goal:g}x"
                         if of_medians is not None else "speed-up not measured")}
    speedup, interval = 1.0 / paired["median"], [1.0 / paired["high"], 1.0 / paired["low"]]
    text = (f"speed-up {speedup:.2f}x (95 % {interval[0]:.2f}-{interval[1]:.2f}x, median of per-round ratios over "
            f"{paired['rounds']} rounds) against the requested {speedup_goal:g}x")
    if interval[0] < speedup_goal <= interval[1]:
        text += ", the goal within that interval: the verdict is within this machine's noise"
    return {"speedup": speedup, "of_medians": of_medians, "interval": interval, "met": speedup >= speedup_goal,
            "text": text}


def write(out: str, report: dict, recipe: Recipe) -> None:
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    with open(os.path.join(out, "recipe.toml"), "w") as f:
        f.write(recipe.to_toml())
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(report, out))


def _ms(value) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown(report: dict, out: str) -> str:
    v, goal = report["verdict"], report["goal"]
    asked = f"{goal['speedup']:g}x faster" if goal["latency_ms"] is None else f"at most {goal['latency_ms']:g} ms"
    lines = [f"# tensorfold deploy: {report['model']} on {report['target']}", "",
             f"**{'MET' if v['met'] else 'NOT MET'}**: asked {asked} with at most {goal['max_drop']:g} points of "
             f"accuracy lost; measured {v['summary']}.", "",
             f"Machine: {report['machine']}; latency engine: {report['engine']}, "
             + (f"{report['threads']} threads" if report["threads"] else "the device's threads")
             + (" (**emulated under qemu: every time below is emulated, not a device time**)" if v["emulated"] else "")
             + ". "
             f"Pipeline: `{report['pipeline']}`" + ("; int8" if report["int8"].get("int8") else "") + ".", ""]
    first = report.get("int8_first")
    if first is not None:
        lines += ["## int8 first", "", _int8_first_text(first, report), ""]
    if report.get("finetune"):
        lines += ["## Fine-tuning", "", _finetune_text(report["finetune"]), ""]
    table = report["latency_table"]
    if table is not None:
        sel = report["selection"]
        cache = table["cache"]
        noisy = sum(bool(c.get("noisy")) for layer in table["layers"] for c in layer["candidates"])
        lines += ["## Latency model", "",
                  f"Each candidate layer (and each replacement's factor chain) ran alone at its real input shape, "
                  f"batch 1, on {table['engine']}: median of {table['rounds']} interleaved rounds, each sample the "
                  f"median of back-to-back runs lasting about {table['sample_ms']:g} ms"
                  + (" (emulated under qemu: not device times)" if table["emulated"] else "") + ". "
                  f"Original end to end (as tf.measure times it: single calls after a 0.2 s pause): "
                  f"{_ms(table['original_ms']['median_ms'])} ms"
                  + (f" (the least loaded of blocks with medians "
                     f"{', '.join(_ms(b) for b in table['original_ms']['blocks_median_ms'])} ms)"
                     if table["original_ms"].get("blocks_median_ms") else "")
                  + f"; its candidate layers sum to {_ms(table['layers_ms'])} ms. Predicted latency: "
                  + sel.get("latency_model", f"overhead {_ms(table['overhead_ms'])} ms + the chosen layers")
                  + (f". {noisy} latencies stayed noisy after retries (IQR above a quarter of the median)"
                     if noisy else "") + ".",
                  "", f"Latency cache {cache['path']}: " + (
                      "stage reused from OUT/stages (nothing measured)" if cache.get("stage_reused") else
                      f"{cache['hits']} hits, {cache['misses']} measured") + ".", "",
                  f"Selection: exact multiple-choice knapsack (dynamic programming over latency in steps of "
                  + (f"{sel['resolution_ms']:.2g} ms, rounded up" if sel["resolution_ms"] else "(not run: unreachable)")
                  + f") minimising the summed layer error ({table['error_measure']}) "
                  f"with predicted latency <= {_ms(sel['goal_ms'])} ms. A replacement not measured faster than its "
                  f"layer is never chosen. " + ("The goal was reachable in the model."
                                               if sel["met"] else "The goal is NOT reachable in the model: the "
                                               f"fastest choices are taken (predicted {_ms(sel['predicted_ms'])} ms)."),
                  ""]
        checks = sel.get("checks") or []
        if checks:
            lines += ["Checked on the whole model (the compressed fp32 model timed against the original in one "
                      "interleaved run; the measured ratio is the median of the per-round ratios, with its 95 % "
                      "interval and the rounds it took); when it missed the goal, or beat it by more than a tenth, "
                      "the goal was scaled by the prediction's error and the selection run again. Delivered: the "
                      "least summed error among the attempts that met the goal as measured, else the fastest:", "",
                      "| attempt | goal correction | predicted ratio | measured ratio (95 %, rounds) | goal ratio | "
                      "summed error | delivered |", "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
            lines += [f"| {i + 1} | {c['correction']:.3f} | {c['predicted_ratio']:.3f} | {c['measured_ratio']:.3f}"
                      + (f" ({c['ratio_interval'][0]:.3f}-{c['ratio_interval'][1]:.3f}, {c['rounds']})"
                         if "ratio_interval" in c else "")
                      + f" | {c['goal_ratio']:.3f} | {c.get('total_error', float('nan')):.4f} | "
                      f"{'**yes**' if c.get('delivered') else ''} |" for i, c in enumerate(checks)]
            lines.append("")
        lines += ["## Per-layer decisions", "",
                  "| layer | input | candidate | MFLOPs | latency ms (IQR)" + (", emulated" if table["emulated"] else "")
                  + " | error | decision |",
                  "| --- | --- | --- | ---: | ---: | ---: | --- |"]
        for layer in table["layers"]:
            chosen = sel["choices"][layer["layer"]]
            original_ms = layer["candidates"][0]["latency_ms"]
            for c in layer["candidates"]:
                decision = "**chosen**" if c["key"] == chosen else (
                    "refused: not faster than the original" if c["key"] != "original" and c["latency_ms"] >= original_ms
                    else "")
                lines.append(f"| {layer['layer']} | {'x'.join(map(str, layer['in_shape']))} | {c['key']} | "
                             f"{c['flops'] / 1e6:.2f} | {_ms(c['latency_ms'])} ({_ms(c['iqr_ms'])}) | "
                             f"{c['error']:.4f} | {decision} |")
        lines.append("")
    p = report["prediction"]
    lines += ["## End to end, measured", ""]
    if p is not None:
        error = f"{100 * p['error']:+.1f} %" if p["error"] is not None else "n/a"
        steady = p["steady_state_ms"]
        lines += [f"Predicted {_ms(p['predicted_ms'])} ms, measured {_ms(p['measured_ms'])} ms: "
                  f"prediction error {error} ({p['applies_to']})" + (" (emulated)" if v["emulated"] else "") + "."
                  + (f" Steady state (back-to-back calls, like the layers in the table): original "
                     f"{_ms(steady.get('original'))} ms, deployed {_ms(steady.get('deployed'))} ms"
                     f" ({steady['original'] / steady['deployed']:.2f}x)." if steady.get("deployed") else ""), ""]
    int8 = report["int8"]
    lines += [f"int8: {'kept' if int8.get('int8') else 'not kept'} ({int8.get('reason')})"
              + (f"; fp32 {_ms(int8['fp32_ms'])} ms vs int8 {_ms(int8['int8_ms'])} ms" + _ratio_text(int8)
                 + (" (emulated)" if int8.get("emulated") else "") + f", {int8.get('accuracy')}"
                 if "fp32_ms" in int8 else "") + ".", "",
              "| model | engine | median ms | top-1 |", "| --- | --- | ---: | ---: |"]
    for row in report["measure"]["rows"]:
        top1 = (row.get("accuracy") or {}).get("top1")
        lines.append(f"| {row['candidate']} | {row['engine']} | {_ms((row.get('latency') or {}).get('median_ms'))}"
                     f"{' (emulated)' if row.get('emulated') else ''} | "
                     f"{'' if top1 is None else f'{100 * top1:.2f} %'} |")
    if v.get("speedup_interval"):
        low, high = v["speedup_interval"]
        lines += ["", f"The verdict's speed-up, {v['speedup']:.2f}x (95 % {low:.2f}-{high:.2f}x), is the median of "
                  f"per-round ratios of the original and the deployed model timed interleaved after this table "
                  f"until that interval was within {100 * lat.RATIO_PRECISION:g} % (or four times the table's "
                  f"rounds); the table's medians give "
                  + (f"{v['speedup_of_medians']:.2f}x." if v.get("speedup_of_medians") else "no ratio.")]
    lines += ["", f"Accuracy data: {report['data']}. Artifact: `artifact/` ({report['artifact']['tasks']} TVM tasks, "
              f"{report['artifact']['trials']} tuning trials).", ""]
    for path in report["measure"].get("files", []):
        if path.endswith(".png"):
            rel = os.path.relpath(path, out)
            lines.append(f"![{os.path.basename(path)}]({rel})")
    if report["stages_reused"]:
        lines += ["", f"Stages reused from OUT/stages: {', '.join(report['stages_reused'])}."]
    return "\n".join(lines) + "\n"


def _int8_first_text(first: dict, report: dict) -> str:
    """int8 on the original was decided before the factors: what it gave and what the factors were asked for."""
    if not first.get("int8"):
        return f"int8 on the original: not kept ({first.get('reason')}); the factors are asked for the whole goal."
    text = (f"int8 on the original: {_ms(first['fp32_ms'])} ms -> {_ms(first['int8_ms'])} ms, {first['gain']:.2f}x"
            + _ratio_text(first)
            + (" (emulated)" if first.get("emulated") else "") + f", {first.get('accuracy')}. The factors are asked "
            f"for the rest: the fp32 factorized model's goal is {_ms(report['factor_goal_ms'])} ms.")
    shortfall = first.get("shortfall")
    if shortfall:
        text += (f" On the factorized model int8 gave {shortfall['realized_gain']:.2f}x, not "
                 f"{shortfall['expected_gain']:.2f}x, so the factors were selected again for that.")
    return text


def _finetune_text(summary: dict) -> str:
    """The fine-tune's held-out scores, the weights it kept and the rates it gave up."""
    metric = "accuracy" if "held-out accuracy before" in summary else "MSE"
    epochs = summary.get("epochs") or []
    text = (f"{len(epochs)} epoch(s) on {summary.get('training samples')} training samples, teacher "
            f"{summary.get('teacher')}: held-out {metric} {summary.get(f'held-out {metric} before')} -> "
            f"{summary.get(f'held-out {metric} after')}")
    if summary.get("kept"):
        text += f"; kept: {summary['kept']}"
    offs = summary.get("lr back-offs") or []
    if offs:
        text += "; rates given up: " + "; ".join(f"lr {b['lr']:g} ({b['why']})" for b in offs)
    return text + "."


def _ratio_text(decision: dict) -> str:
    """The paired int8 / fp32 ratio a decision rests on (decisions stored before it existed have none)."""
    if "int8_ratio" not in decision:
        return ""
    low, high = decision["ratio_interval"]
    return (f" (int8 / fp32: median of per-round ratios {decision['int8_ratio']:.3f}, 95 % {low:.3f}-{high:.3f}, "
            f"{decision['rounds']} rounds)")
