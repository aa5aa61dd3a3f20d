"""Fine-tuning after compression on trained tasks: one-shot + fine-tune vs MUSCO, CP-ALS vs CPD-EPC,
with and without distillation, all at the same FLOPs target (default 3.2x fewer than the original): Tucker-2 and CP on the ResNet,
SVD on the MNIST-1D MLP (its 25-channel CNN cannot reach 3x at tucker2's minimum rank 8).

Per variant: test accuracy right after compression and after fine-tuning (the task's test split;
fine-tuning trains on its training split, one sample in ten held out), FLOPs and params against the
BN-folded original, compression and training time, and x86 latency measured side by side with the
original in one run (onnxruntime and TVM; TVM tuned with --tune-trials per candidate, 0 = untuned).
Every variant gets the same number of fine-tuning epochs in total (MUSCO spreads them over its stages).

    python benchmarks/finetune.py                                     # resnet18-digits, mnist1d-mlp
    python benchmarks/finetune.py --tasks mnist1d-mlp --latency off
    python benchmarks/finetune.py --tasks resnet18-digits --tune-trials 64 --report ft.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

import tensorfold as tf
from tensorfold.models import resolve
from tensorfold.passes import parse
from tensorfold.passes.ranks import policy as rp
from tensorfold.runtime.evaluate import predict
from tensorfold.runtime.tasks import get_task
from tensorfold.targets.registry import host_cpu


def method_for(graph) -> str:
    """tucker2 where the task has convs worth it (ResNet), svd for a Linear-only model (the MLP)."""
    convs = [l for l in graph.layers() if l.kind == "conv" and l.spec is not None and l.spec.weight.shape[1] >= 32]
    return "tucker2" if convs else "svd"


def budget_fraction(graph, method: str, target: float) -> float:
    """The budget (a fraction of the FLOPs of the layers `method` factors) that leaves `target` x the
    whole graph's FLOPs: the other layers keep theirs."""
    total = graph.layer_cost().flops
    factorable = sum(l.cost.flops for l in graph.layers() if l.kind in ("conv", "linear") and l.spec is not None
                     and rp.METHODS[method].check(l.spec) is None)
    return max(min(1 - (1 - target) * total / max(factorable, 1), 0.95), 0.02)


def variants(method: str, b: float, target: float, epochs: int, stages: int, lr: float,
             cp_lr: float) -> list[tuple[str, str, str]]:
    """(label, compression pipeline after fold_bn, finetune options) — musco fine-tunes inside its pass.
    CP takes ratio= (no spectrum for a budget): 1/b over the same convs is the same FLOPs target."""
    ft = f"epochs={epochs}, lr={lr}"
    cp_ft = f"epochs={epochs}, lr={cp_lr}"
    per_stage = max(epochs // stages, 1)
    rows = [
        (f"{method} + ft (distil)", f"{method}(budget=flops:{b:.4f})", ft),
        (f"{method} + ft (labels only)", f"{method}(budget=flops:{b:.4f})", f"{ft}, distill=false"),
        (f"{method}+data + ft (distil)", f"{method}(budget=flops:{b:.4f}, data=true)", ft),
        (f"{method}+data + ft (labels only)", f"{method}(budget=flops:{b:.4f}, data=true)", f"{ft}, distill=false"),
        (f"musco {method} ({stages} stages)",
         f"musco(method={method}, ratio=1.5, stages={stages}, until=flops:{target:.4f}, "
         f"finetune=(epochs={per_stage}, lr={lr}))", ""),
    ]
    if method == "tucker2":
        rows += [("cp-als + ft (distil)", f"cp(ratio={1 / b:.3f})", cp_ft),
                 ("cp-epc + ft (distil)", f"cp(ratio={1 / b:.3f}, method=epc)", cp_ft)]
    return rows


DEFAULT_EPOCHS = {"resnet18-digits": 3}


def run_task(name: str, args: argparse.Namespace, work: str) -> list[dict]:
    task = get_task(name)
    epochs = args.epochs or DEFAULT_EPOCHS.get(name, 30)
    original, _ = tf.compress(resolve(name), "fold_bn")
    images, labels = task.test_data()

    def score(g) -> float:
        return float(task.evaluate(predict(g, images), labels)[task.metric])

    base_flops, base_params = original.layer_cost().flops, original.total_params()
    method = method_for(original)
    b = budget_fraction(original, method, 1 / args.flops)
    rows = [{"task": name, "variant": "original", "compressed": score(original), "finetuned": score(original),
             "flops_x": 1.0, "params_x": 1.0, "compress_s": 0.0, "train_s": 0.0}]
    candidates = {"original": original}
    if args.save_models:
        os.makedirs(args.save_models, exist_ok=True)
        original.save(os.path.join(args.save_models, f"{name}-original.onnx"))
    for label, pipeline, ft in variants(method, b, 1 / args.flops, epochs, args.stages, args.lr, args.cp_lr):
        if args.variants and not any(label.startswith(p.strip()) for p in args.variants.split(",")):
            continue
        started = time.perf_counter()
        try:
            compressed, report = tf.compress(original, pipeline, calibration=task.calibration_data(),
                                             train_data=name, progress=sys.stderr.isatty())
        except tf.TensorfoldError as e:
            rows.append({"task": name, "variant": label, "error": str(e)})
            print(f"  {name} {label}: {e}", file=sys.stderr)
            continue
        compress_s = time.perf_counter() - started
        row = {"task": name, "variant": label, "pipeline": pipeline, "finetune": ft, "epochs": epochs,
               "flops_x": base_flops / max(compressed.layer_cost().flops, 1),
               "params_x": base_params / max(compressed.total_params(), 1)}
        if ft:
            row["compressed"] = score(compressed)
            tuned, ft_report = tf.finetune(compressed, name, teacher=original, progress=sys.stderr.isatty(),
                                           **parse(f"finetune({ft})")[0][1])
            row["compress_s"], row["train_s"] = round(compress_s, 1), ft_report.summary["training seconds"]
        else:  # musco: compression and training interleave; its stages say what each gave
            stages = report.passes[-1].summary["stages"]
            row["compressed"] = None
            row["stages"] = stages
            row["train_s"] = round(sum(s["finetune seconds"] for s in stages), 1)
            row["compress_s"] = round(compress_s - row["train_s"], 1)
            tuned = compressed
        row["finetuned"] = score(tuned)
        rows.append(row)
        candidates[label] = tuned
        if args.save_models:  # measured again later (e.g. a longer TVM tuning) without training again
            os.makedirs(args.save_models, exist_ok=True)
            row["saved"] = os.path.join(args.save_models, f"{name}-{_slug(label)}.onnx")
            tuned.save(row["saved"])
        print(f"  {name:16s} {label:30s} {task.metric} {row['compressed'] if row['compressed'] is not None else '-'} "
              f"-> {row['finetuned']:.4f}  FLOPs {row['flops_x']:.2f}x  ({row['compress_s']} s + {row['train_s']} s)",
              file=sys.stderr)
    if args.latency == "on":
        measured = tf.measure(candidates, "x86", data=(images, labels), tune_trials=args.tune_trials,
                              rounds=args.rounds, work_dir=os.path.join(work, name), progress=sys.stderr.isatty(),
                              strict=False)
        medians = {(r["candidate"], r["engine"]): r["latency"]["median_ms"] for r in measured.rows if r.get("latency")}
        for row in rows:
            for engine in ("onnxruntime", "tvm"):
                ms, base = medians.get((row["variant"], engine)), medians.get(("original", engine))
                if ms is not None and base:
                    row[f"{engine}_ms"], row[f"{engine}_speedup"] = round(ms, 4), round(base / ms, 3)
    return rows


def _slug(label: str) -> str:
    return "-".join("".join(c if c.isalnum() or c == "+" else " " for c in label).split())


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    head = ["task", "variant", "after compression", "after fine-tuning", "FLOPs", "params", "compress s", "train s",
            "ort x", "tvm x"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        if "error" in row:
            print(f"| {row['task']} | {row['variant']} | skipped: {row['error'][:100]} |")
            continue
        compressed = "-" if row.get("compressed") is None else f"{row['compressed']:.4f}"
        cells = [row["task"], row["variant"], compressed, f"{row['finetuned']:.4f}", f"{row['flops_x']:.2f}x",
                 f"{row['params_x']:.2f}x", f"{row['compress_s']}", f"{row['train_s']}",
                 f"{row.get('onnxruntime_speedup', float('nan')):.2f}", f"{row.get('tvm_speedup', float('nan')):.2f}"]
        print("| " + " | ".join(cells) + " |")
    for row in rows:
        for stage in row.get("stages", []):
            print(f"  {row['task']} {row['variant']} stage {stage['stage']}: FLOPs {stage['flops_x']}x, held-out "
                  f"{stage['heldout before finetune']} -> {stage['heldout after finetune']} "
                  f"({stage['finetune seconds']} s"
                  f"{', lr backed off to ' + format(stage['finetune lr'], 'g') if 'finetune lr' in stage else ''})")
    print(f"\nCPU: {host_cpu()}; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}; FLOPs target "
          f"{args.flops}x; fine-tuning epochs per variant: {args.epochs or 'resnet18-digits 3, MNIST-1D 30'} (Adam, cosine; lr {args.lr}, CP {args.cp_lr}); "
          f"TVM: {args.tune_trials} MetaSchedule trials per candidate ({'untuned' if not args.tune_trials else 'tuned'}).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="resnet18-digits,mnist1d-mlp")
    parser.add_argument("--flops", type=float, default=3.2, help="FLOPs reduction every variant aims at (x)")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs per variant, in total (default: 3 on "
                        "resnet18-digits; 30 on the MNIST-1D tasks, trained for 150)")
    parser.add_argument("--stages", type=int, default=3, help="MUSCO stages (epochs are split over them)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cp-lr", type=float, default=3e-4, help="CP layers fine-tune badly at high rates")
    parser.add_argument("--variants", help="only variants whose label starts with one of these, e.g. tucker2,musco or \"tucker2 + ft (labels\"")
    parser.add_argument("--latency", choices=("on", "off"), default="on")
    parser.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per TVM build (0: untuned)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--report", help="write the rows as JSON here")
    parser.add_argument("--save-models", metavar="DIR", help="write each fine-tuned model (and the original) as ONNX here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    work = tempfile.mkdtemp(prefix="tensorfold-finetune-")
    rows = []
    for name in [t for t in args.tasks.split(",") if t]:
        rows += run_task(name, args, work)
    print_table(rows, args)
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"cpu": host_cpu(), "args": vars(args), "rows": rows}, f, indent=2, default=float)
        print(f"wrote {args.report}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
