"""`tensorfold deploy` against FLOP-based selection at the same FLOPs (issue 19's benchmark).

Per model: deploy at --speedup S on x86 with the onnxruntime latency engine (per-layer latencies
measured, knapsack on the summed layer error), then Tucker-2 with a global FLOPs budget
(`tucker2(budget=flops:b)`, Zhang et al.'s greedy, what FLOP-aware tools do) with b chosen so the
whole model has the FLOPs deploy's result has. All three (original, deploy, FLOP-based) are then
measured in one `tf.measure` run on onnxruntime (interleaved; accuracy on the task's test set for a
task). Printed: predicted vs measured latency (the latency model's error), measured speed-up,
FLOPs, accuracy, and the layers deploy refused (replacements with fewer FLOPs, not faster on the target).
With --train-data (tasks only) deploy fine-tunes on the task's training split (--finetune-epochs,
distilled from the original), and the FLOP-based model gets the same epochs, so accuracy compares
like for like.

    python benchmarks/deploy.py                                   # resnet18-digits at --speedup 2
    python benchmarks/deploy.py --models resnet18-digits torchvision:resnet18 --speedup 2 4
    python benchmarks/deploy.py --report out/deploy_bench.json
    python benchmarks/deploy.py --speedup 4 --train-data --finetune-epochs 3
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import tensorfold as tf
from tensorfold.deployment.recipe import FINETUNE_LR
from tensorfold.models import resolve, task_name
from tensorfold.passes.ranks import policy as rp
from tensorfold.targets.registry import host_cpu


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18-digits"],
                        help="tasks or model names (torchvision:resnet18 runs at 1x3x224x224; see --weights)")
    parser.add_argument("--speedup", nargs="+", type=float, default=[2.0], help="requested speed-ups")
    parser.add_argument("--weights", choices=("random", "planted"), default="planted",
                        help="torchvision models: planted low-rank weights (default) or random ones")
    parser.add_argument("--target", default="x86")
    parser.add_argument("--rounds", type=int, default=20, help="tf.measure rounds (default 20)")
    parser.add_argument("--train-data", action="store_true",
                        help="tasks: fine-tune deploy's model and the FLOP-based one on the task's training split")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="with --train-data (default 3)")
    parser.add_argument("--finetune-lr", type=float, default=FINETUNE_LR,
                        help=f"with --train-data: Adam's rate for both (default deploy's, {FINETUNE_LR:g})")
    parser.add_argument("--work-dir", help="deploy output folders (default: a temporary folder)")
    parser.add_argument("--report", help="write the rows as JSON here")
    return parser


def budget_fraction(graph, target: float) -> float:
    """The tucker2 budget (a fraction of the FLOPs of the layers it factors) that leaves `target` x the
    whole graph's FLOPs (the other layers keep theirs)."""
    total = graph.layer_cost().flops
    factorable = sum(l.cost.flops for l in graph.layers() if l.kind == "conv" and l.spec is not None
                     and rp.METHODS["tucker2"].check(l.spec) is None)
    return max(min(1 - (1 - target) * total / max(factorable, 1), 0.99), 0.01)


def load_model(model: str, weights: str):
    """What deploy gets: the name (a task, or torchvision:<arch> with its random weights), or for
    --weights planted a torchvision model whose convs and linears have Tucker-2 / matrix rank 1/4 + 1 %
    noise (benchmarks/decompose.py): the errors of compression then differ by layer and by rank as in a
    trained network, which random weights (flat spectra) do not."""
    if weights == "random" or not model.startswith("torchvision:"):
        return model, resolve(model)
    from decompose import planted_graph

    graph = planted_graph(model.split(":", 1)[1], 224)
    return graph, graph


def run_one(model: str, speedup: float, args, work: str) -> dict:
    out = os.path.join(work, f"{model.replace(':', '_')}_{args.weights}_x{speedup:g}")
    given, original = load_model(model, args.weights)
    task = task_name(model)
    if args.train_data and task is None:
        raise SystemExit(f"--train-data: {model} is not a task, so it has no training split")
    training = ({"train_data": task, "finetune_epochs": args.finetune_epochs, "finetune_lr": args.finetune_lr}
                if args.train_data else {})
    deployed = tf.deploy(given, args.target, out, speedup=speedup, rounds=args.rounds, progress=True, **training)
    report = deployed.report
    folded, _ = tf.compress(original, "fold_bn")
    ratio = report["compress"]["flops_after"] / report["compress"]["flops_before"]
    b = budget_fraction(folded, ratio)
    flops_based, flops_report = tf.compress(original, f"fold_bn, tucker2(budget=flops:{b:.4f})")
    if training:  # the same epochs, distilled from the same teacher as deploy's
        flops_based, _ = tf.finetune(flops_based, task, epochs=args.finetune_epochs, lr=args.finetune_lr,
                                     teacher=folded, progress=True)
    candidates = [("original", original), ("deploy", deployed.graph), ("flops-based", flops_based)]
    if report["int8"].get("int8"):  # deploy's fp32 model too: the same FLOPs as flops-based, before int8
        stages = os.path.join(out, "stages")
        fp32 = "finetuned.onnx" if report.get("finetune_epochs") else "compressed.onnx"
        candidates.insert(2, ("deploy fp32", tf.load(os.path.join(stages, fp32))))
        # and flops-based with int8 on the same calibration data (the task's: deploy keeps int8 only with
        # calibration data), the like-for-like of what deploy delivered
        flops_int8, _ = tf.compress(flops_based, "int8", calibration=task)
        candidates.append(("flops-based + int8", flops_int8))
    measured = tf.measure(candidates,
                          args.target, data=task, rounds=args.rounds, engines=[report["engine"]], progress=True)
    rows = {r["candidate"]: r for r in measured.rows}

    def ms(name):
        return rows[name]["latency"]["median_ms"]

    def top1(name):
        return (rows[name].get("accuracy") or {}).get("top1")
    refused = report["selection"]["refused"]
    checks = report["selection"].get("checks") or []
    return {"model": model, "weights": args.weights if model.startswith("torchvision:") else "trained",
            "speedup_asked": speedup, "checks": checks, "machine": host_cpu(), "engine": report["engine"],
            "threads": report["threads"], "deploy_verdict": report["verdict"], "int8": report["int8"],
            "int8_first": report["int8_first"], "predicted_ms":
            report["prediction"]["predicted_ms"], "deploy_measured_ms": report["verdict"]["deployed_ms"],
            "prediction_measured_ms": report["prediction"]["measured_ms"],  # the fp32 model the prediction is for
            "prediction_error": report["prediction"]["error"], "pipeline": report["pipeline"],
            "flops_ratio": ratio, "finetune_epochs": args.finetune_epochs if training else 0,
            "finetune_lr": args.finetune_lr if training else None, "deploy_finetune": report.get("finetune"),
            "flops_based_pipeline": f"fold_bn, tucker2(budget=flops:{b:.4f})"
                                    + (f", finetune(epochs={args.finetune_epochs}, lr={args.finetune_lr:g})"
                                       if training else ""),
            "flops_based_flops_ratio": flops_report.flops_after / flops_report.flops_before,
            "same_run": {"original_ms": ms("original"), "deploy_ms": ms("deploy"), "flops_based_ms": ms("flops-based"),
                         "deploy_speedup": ms("original") / ms("deploy"),
                         "deploy_fp32_ms": ms("deploy fp32") if "deploy fp32" in rows else None,
                         "flops_based_int8_ms": ms("flops-based + int8") if "flops-based + int8" in rows else None,
                         "flops_based_speedup": ms("original") / ms("flops-based"),
                         "top1": {n: top1(n) for n in rows}},
            "refused": refused, "layers_replaced": sum(1 for k in report["selection"]["choices"].values()
                                                       if k != "original"),
            "layers": len(report["selection"]["choices"])}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="tensorfold-deploy-bench-")
    rows = []
    for model in args.models:
        for speedup in args.speedup:
            row = run_one(model, speedup, args, work)
            rows.append(row)
            same = row["same_run"]
            top1 = {k: ("" if v is None else f"{100 * v:.2f} %") for k, v in same["top1"].items()}
            print(f"\n{model} ({row['weights']} weights) --speedup {speedup:g} on {row['machine']}, {row['engine']} "
                  f"{row['threads']} threads" + (f", both fine-tuned {row['finetune_epochs']} epoch(s)"
                                                 if row["finetune_epochs"] else "") + ":")
            print(f"  deploy: {'met' if row['deploy_verdict']['met'] else 'NOT met'} "
                  f"({row['deploy_verdict']['summary']})")
            print(f"  fp32 factorized model: predicted {row['predicted_ms']:.3f} ms, measured "
                  f"{row['prediction_measured_ms']:.3f} ms "
                  f"(error {100 * row['prediction_error']:+.1f} %); whole-model checks (measured / predicted ratio): "
                  + ", ".join(f"{c['measured_ratio']:.3f} / {c['predicted_ratio']:.3f}" for c in row["checks"]))
            print(f"  same run: original {same['original_ms']:.3f} ms {top1.get('original')}; deploy "
                  f"{same['deploy_ms']:.3f} ms ({same['deploy_speedup']:.2f}x, {1 / row['flops_ratio']:.2f}x fewer "
                  f"FLOPs) {top1.get('deploy')}; flops-based {same['flops_based_ms']:.3f} ms "
                  f"({same['flops_based_speedup']:.2f}x, {1 / row['flops_based_flops_ratio']:.2f}x fewer FLOPs) "
                  f"{top1.get('flops-based')}"
                  + (f"; deploy before int8 {same['deploy_fp32_ms']:.3f} ms {top1.get('deploy fp32')}"
                     if same["deploy_fp32_ms"] else "")
                  + (f"; flops-based + int8 {same['flops_based_int8_ms']:.3f} ms "
                     f"({same['original_ms'] / same['flops_based_int8_ms']:.2f}x) {top1.get('flops-based + int8')}"
                     if same["flops_based_int8_ms"] else ""))
            first = row["int8_first"] or {}
            print(f"  int8 on the original: " + (f"{first['gain']:.2f}x, {first.get('accuracy')}; factors asked for "
                                                 f"{row['speedup_asked'] / first['gain']:.2f}x"
                                                 if first.get("int8") else f"not kept ({first.get('reason')})")
                  + (f"; on the factorized model int8 gave {first['shortfall']['realized_gain']:.2f}x: selected again"
                     if first.get("shortfall") else ""))
            print(f"  deploy replaced {row['layers_replaced']} of {row['layers']} layers; refused (not faster "
                  f"than the layer): " + (", ".join(f"{k}: {', '.join(v)}" for k, v in row["refused"].items())
                                          or "none"))
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w") as f:
            json.dump(rows, f, indent=2, default=float)
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
