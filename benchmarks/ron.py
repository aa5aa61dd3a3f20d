"""Reduced-order networks (`ron`, Gusak et al. 2021) on trained tasks: test accuracy against FLOPs at several
ranks, beside svd and tucker2 (both with data=true) brought to the same FLOPs, with and without fine-tuning.

For each task (default: mnist1d-mlp, mnist1d-cnn, digits) and each rank R: `ron(rank=R, max_error=inf)`
after fold_bn (the limit is off so the whole curve is traced; each row gives the held-out output error
`ron` measured), then `svd(budget=flops:f, data=true)` and `tucker2(budget=flops:f, data=true)` with the
fraction f bisected until the whole graph's FLOPs are as close as the method gets to RON's (svd and
tucker2 keep ranks >= 8, so at strong reductions they stop short: the table shows the FLOPs each reached).
With --finetune N every variant is also fine-tuned for N epochs on the task's training split, distilled
from the original (`tf.finetune`, what a pipeline's `..., finetune(epochs=N)` step runs). Per row: test accuracy, FLOPs and params against
the BN-folded original, time; with --latency on, x86 latency of the original and of every RON variant in
one run (onnxruntime, and TVM: untuned, or tuned with --tune-trials per candidate). One PNG: accuracy
against the FLOPs reduction, a panel per task.

    python benchmarks/ron.py                                            # the three tasks, latency untuned
    python benchmarks/ron.py --tasks mnist1d-mlp --ranks 20,40 --latency off
    python benchmarks/ron.py --finetune 3 --tune-trials 64 --report ron.json --plot ron.png

Calibration: the task's calibration split (training signals / images; the test split stays held out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import tensorfold as tf
from tensorfold.models import resolve
from tensorfold.runtime.evaluate import predict
from tensorfold.runtime.tasks import get_task
from tensorfold.targets.registry import host_cpu

# ranks per task: up to the narrowest sampled activation (the MLPs' 100 and digits' fc1 128 units)
RANKS = {"mnist1d-mlp": [10, 20, 40, 60, 80], "mnist1d-cnn": [10, 20, 40, 60, 80], "digits": [16, 32, 64, 100]}
BASELINES = ("svd", "tucker2")
BISECTION_STEPS = 7
NOT_APPLICABLE = "no layer it applies to"


class Task:
    """A trained task's BN-folded graph, its calibration and test data, and its scorer."""

    def __init__(self, name: str):
        self.name = name
        self.task = get_task(name)
        self.graph, _ = tf.compress(resolve(name), "fold_bn")
        self.calibration = self.task.calibration_data()
        self.images, self.labels = self.task.test_data()
        self.flops, self.params = self.graph.layer_cost().flops, self.graph.total_params()

    def score(self, graph) -> float:
        return float(self.task.evaluate(predict(graph, self.images), self.labels)[self.task.metric])

    def compress(self, pipeline: str):
        return tf.compress(self.graph, pipeline, calibration=self.calibration, progress=sys.stderr.isatty())

    def finetuned(self, graph, epochs: int, lr: float) -> float:
        """Test accuracy after `epochs` on the training split, distilled from the original (the pipeline's
        `finetune` step, as `..., finetune(epochs=N)` runs it)."""
        tuned, _ = tf.finetune(graph, self.name, epochs=epochs, lr=lr, teacher=self.graph,
                               progress=sys.stderr.isatty())
        return self.score(tuned)

    def row(self, variant: str, pipeline: str, graph, seconds: float, **extra) -> dict:
        return {"task": self.name, "variant": variant, "pipeline": pipeline, "accuracy": self.score(graph),
                "flops": graph.layer_cost().flops, "flops_x": self.flops / max(graph.layer_cost().flops, 1),
                "params_x": self.params / max(graph.total_params(), 1), "seconds": round(seconds, 2), **extra}


def ron_rows(task: Task, ranks: list[int], finetune: int, lr: float) -> tuple[list[dict], dict]:
    rows, candidates = [], {}
    for rank in ranks:
        pipeline = f"ron(rank={rank}, max_error=inf)"
        started = time.perf_counter()
        try:
            graph, report = task.compress(pipeline)
        except tf.TensorfoldError as e:
            rows.append({"task": task.name, "variant": "ron", "pipeline": pipeline, "error": str(e)})
            continue
        ron_report = report.passes[-1]
        if not ron_report.changed:
            rows.append({"task": task.name, "variant": "ron", "pipeline": pipeline,
                         "error": "; ".join(sorted({r.reason for r in ron_report.records}))})
            continue
        error = next(r.error_calibration for r in reversed(ron_report.records) if r.action == "replaced")
        row = task.row("ron", pipeline, graph, time.perf_counter() - started, rank=rank, held_out_error=error,
                       layers=len([r for r in ron_report.records if r.action == "replaced"]))
        if finetune:
            started = time.perf_counter()
            row["finetuned"] = task.finetuned(graph, finetune, lr)
            row["finetune_seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
        candidates[f"ron rank {rank}"] = graph
        _progress(row)
    return rows, candidates


def matched_rows(task: Task, method: str, target_flops: int, finetune: int, lr: float) -> dict:
    """`method(budget=flops:f, data=true)` with f bisected (on a log scale) to the FLOPs nearest the target."""
    low, high, best = math.log(0.01), 0.0, None
    started = time.perf_counter()
    for _ in range(BISECTION_STEPS):
        fraction = math.exp((low + high) / 2)
        pipeline = f"{method}(budget=flops:{fraction:.4f}, data=true)"
        try:
            graph, report = task.compress(pipeline)
        except tf.TensorfoldError as e:
            if "cannot be met" not in str(e):
                return {"task": task.name, "variant": method, "pipeline": pipeline, "error": str(e)}
            low, failure = math.log(fraction), str(e)  # below the method's minimum ranks: ask for more
            continue
        if not report.passes[-1].changed:
            return {"task": task.name, "variant": method, "pipeline": pipeline, "error": NOT_APPLICABLE}
        flops = graph.layer_cost().flops
        if best is None or abs(flops - target_flops) < abs(best[2] - target_flops):
            best = (pipeline, graph, flops)
        low, high = (low, math.log(fraction)) if flops > target_flops else (math.log(fraction), high)
    if best is None:
        return {"task": task.name, "variant": method, "pipeline": pipeline, "error": failure}
    pipeline, graph, _ = best
    row = task.row(method, pipeline, graph, time.perf_counter() - started, target_flops_x=task.flops / target_flops)
    if finetune:
        row["finetuned"] = task.finetuned(graph, finetune, lr)
    _progress(row)
    return row


def _progress(row: dict) -> None:
    tuned = f" -> {row['finetuned']:.4f} fine-tuned" if "finetuned" in row else ""
    print(f"  {row['task']:12s} {row['pipeline']:42s} accuracy {row['accuracy']:.4f}{tuned}  "
          f"FLOPs {row['flops_x']:.2f}x  {row['seconds']:.1f} s", file=sys.stderr)


def run_task(name: str, ranks: list[int] | None, finetune: int, lr: float, latency: bool, tune_trials: int,
             rounds: int, work: str) -> list[dict]:
    task = Task(name)
    rows = [task.row("original", "fold_bn", task.graph, 0.0)]
    found, candidates = ron_rows(task, ranks or RANKS.get(name, [16, 32, 64]), finetune, lr)
    rows += found
    inapplicable: set[str] = set()  # tucker2 on the MLP: said once
    for row in [r for r in found if "error" not in r]:
        for method in [m for m in BASELINES if m not in inapplicable]:
            matched = matched_rows(task, method, row["flops"], finetune, lr)
            matched["beside_rank"] = row["rank"]
            rows.append(matched)
            if matched.get("error") == NOT_APPLICABLE:
                inapplicable.add(method)
    if latency and candidates:
        measured = tf.measure({"original": task.graph, **candidates}, "x86", data=(task.images, task.labels),
                              tune_trials=tune_trials, rounds=rounds, work_dir=os.path.join(work, name),
                              progress=sys.stderr.isatty(), strict=False)
        medians = {(r["candidate"], r["engine"]): r["latency"]["median_ms"] for r in measured.rows if r.get("latency")}
        for row in rows:
            key = "original" if row["variant"] == "original" else f"ron rank {row.get('rank')}"
            if row["variant"] not in ("original", "ron"):
                continue
            for engine in ("onnxruntime", "tvm"):
                ms, base = medians.get((key, engine)), medians.get(("original", engine))
                if ms is not None and base:
                    row[f"{engine}_ms"], row[f"{engine}_speedup"] = round(ms, 4), round(base / ms, 3)
    return rows


def print_table(rows: list[dict], finetune: int, tune_trials: int) -> None:
    head = ["task", "variant", "pipeline", "accuracy"] + (["fine-tuned"] if finetune else []) + \
           ["FLOPs", "params", "held-out error", "time s", "ort ms", "ort x", "tvm ms", "tvm x"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        if "error" in row:
            print(f"| {row['task']} | {row['variant']} | {row['pipeline']} | not run: {row['error'][:100]} |")
            continue
        cells = [row["task"], row["variant"], f"`{row['pipeline']}`", f"{row['accuracy']:.4f}"]
        if finetune:
            cells.append(f"{row['finetuned']:.4f}" if "finetuned" in row else "")
        cells += [f"{row['flops_x']:.2f}x", f"{row['params_x']:.2f}x",
                  f"{row['held_out_error']:.3f}" if "held_out_error" in row else "", f"{row['seconds']:.1f}"]
        for engine in ("onnxruntime", "tvm"):
            cells += [f"{row[f'{engine}_ms']:.3f}" if f"{engine}_ms" in row else "",
                      f"{row[f'{engine}_speedup']:.2f}" if f"{engine}_speedup" in row else ""]
        print("| " + " | ".join(cells) + " |")
    print(f"\nCPU: {host_cpu()}; TVM: {'untuned' if not tune_trials else f'MetaSchedule, {tune_trials} trials'} per "
          f"candidate; fine-tuning: {f'{finetune} epoch(s)' if finetune else 'none'}; svd / tucker2 with data=true.")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, name in zip(axes[0], tasks):
        done = [r for r in rows if r["task"] == name and "error" not in r]
        original = next((r for r in done if r["variant"] == "original"), None)
        for variant, marker, color in (("ron", "o", "C0"), ("svd", "s", "C1"), ("tucker2", "^", "C2")):
            points = sorted((r["flops_x"], r["accuracy"], r.get("finetuned")) for r in done if r["variant"] == variant)
            if not points:
                continue
            axis.plot([p[0] for p in points], [p[1] for p in points], marker + "-", color=color, label=variant)
            tuned = [(p[0], p[2]) for p in points if p[2] is not None]
            if tuned:  # the same method fine-tuned: same colour, open markers, dotted
                axis.plot(*zip(*tuned), marker + ":", color=color, markerfacecolor="none",
                          label=f"{variant} + fine-tune")
        if original is not None:
            axis.axhline(original["accuracy"], color="grey", linewidth=0.8, label="original")
        axis.set_xscale("log")
        label = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x")
        axis.xaxis.set_major_formatter(label)
        # minor ticks at 2, 5, 20, 50 ...: every minor tick labelled overlaps on a narrow panel
        axis.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda value, _: f"{value:g}x" if f"{value:g}"[0] in "25" else ""))
        axis.set_xlabel("fewer FLOPs than the BN-folded original")
        axis.set_ylabel("test accuracy")
        axis.set_title(name)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="mnist1d-mlp,mnist1d-cnn,digits")
    parser.add_argument("--ranks", help="comma-separated ranks for every task (default: per task)")
    parser.add_argument("--finetune", type=int, default=0, help="fine-tuning epochs after each variant (0: none)")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--latency", choices=("on", "off"), default="on")
    parser.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per TVM build (0: untuned)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--plot", default="ron.png", help="the accuracy-vs-FLOPs PNG")
    parser.add_argument("--report", help="write the rows as JSON here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else None
    work = tempfile.mkdtemp(prefix="tensorfold-ron-")
    rows = [row for name in args.tasks.split(",") if name
            for row in run_task(name, ranks, args.finetune, args.lr, args.latency == "on", args.tune_trials,
                                args.rounds, work)]
    print_table(rows, args.finetune, args.tune_trials)
    plot(rows, args.plot)
    if args.report:
        Path(args.report).write_text(json.dumps({"cpu": host_cpu(), "args": vars(args), "rows": rows}, indent=2,
                                                default=float) + "\n")
        print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
