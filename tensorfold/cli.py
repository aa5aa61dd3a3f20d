"""The `tensorfold` command: deploy, compress, passes, build, targets, measure, tasks, rpc."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

from tensorfold.ir.errors import TensorfoldError


TRAIN_HELP = ("labelled training data for finetune / musco steps: a task name (its training split) or an ImageFolder "
              "directory (default when MODEL is a task: its training split; the test set stays held out)")
METHODS_DOC = "docs/methods.md"  # one section per pass, headed by its name
CALIBRATION_HELP = ("calibration data for data-driven passes (int8): a .npy array, an ImageFolder directory or a "
                    "task name (default when MODEL is a task: its calibration split, from its training data)")


def _compress(args: argparse.Namespace) -> int:
    import tensorfold as tf
    from tensorfold.models import parse_shape, resolve, task_name

    out = os.path.abspath(args.output)
    if os.path.isfile(args.model) and os.path.exists(out) and os.path.samefile(args.model, out):
        raise TensorfoldError(f"refusing to write over the input file {args.model!r}; choose another -o")
    graph = resolve(args.model, parse_shape(args.input_shape), args.weights)
    evaluate = args.eval or task_name(args.model)
    compressed, report = tf.compress(graph, args.passes, calibration=_calibration(args), progress=not args.quiet,
                                     train_data=_train_data(args))
    if evaluate:
        _add_task_scores(report, evaluate, graph, compressed)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    compressed.save(out)
    if out.lower().endswith(".tfz"):
        from tensorfold.ir.tfz import sizes

        report.extra["file bytes"] = sizes(compressed)
    print(report.table())
    print(f"wrote {out}")
    if args.report:
        report.save(args.report)
        print(f"wrote {args.report}")
    return 0


def _first_task(args: argparse.Namespace) -> str | None:
    from tensorfold.models import task_name

    models = getattr(args, "models", None) or [args.model]
    return next((task_name(m) for m in models if task_name(m)), None)


def _calibration(args: argparse.Namespace):
    """--calibration, or when a model is a task its calibration split (training data: the test data stays held out)."""
    return args.calibration or _first_task(args)


def _train_data(args: argparse.Namespace):
    """--train-data, or when a model is a task its training split."""
    return args.train_data or _first_task(args)


def _add_task_scores(report, name: str, original, compressed) -> None:
    """The task's evaluator on its test set, before and after (e.g. "test accuracy before": 0.9972)."""
    from tensorfold.runtime.evaluate import predict
    from tensorfold.runtime.tasks import get_task

    task = get_task(name)
    inputs, labels = task.test_data()
    for when, graph in (("before", original), ("after", compressed)):
        scores = task.evaluate(predict(graph, inputs), labels)
        report.extra[f"test {task.metric_name} {when}"] = round(scores[task.metric], 4)
    report.extra["test images" if len(task.input_shape) == 4 else "test samples"] = int(len(labels))


def _passes(args: argparse.Namespace) -> int:
    from tensorfold.passes import load_all

    for name, info in sorted(load_all().items()):
        print(f"{name}: {info.doc.splitlines()[0] if info.doc else ''}")
        print(f"    docs: {METHODS_DOC}#{name}")
        for key, option in info.options.items():
            print(f"    {key}=<{option.type.__name__}> (default {option.default!r}): {option.help}")
    return 0


def _build(args: argparse.Namespace) -> int:
    import tensorfold as tf
    from tensorfold.models import parse_shape, resolve
    from tensorfold.targets import get_target
    from tensorfold.targets.rpc import placed

    target = placed(get_target(args.target), args.rpc_tracker, args.rpc_key)  # a bad name fails before loading
    graph = resolve(args.model, parse_shape(args.input_shape), args.weights)
    if args.passes:
        original = graph
        graph, report = tf.compress(graph, args.passes, calibration=_calibration(args), progress=not args.quiet,
                                    train_data=_train_data(args))
        if _first_task(args):  # the task's evaluator on its test set, before and after the passes
            _add_task_scores(report, _first_task(args), original, graph)
        print(report.table())
    artifact = tf.build(graph, target, args.output, tune_trials=args.tune_trials, tuning_db=args.tuning_db,
                        progress=not args.quiet, tune_further=args.tune_further, precision=args.precision)
    _print_artifact(artifact)
    print(f"wrote {artifact.path}")
    if args.report:
        import json

        with open(args.report, "w") as f:
            json.dump(artifact.manifest, f, indent=2)
        print(f"wrote {args.report}")
    return 0


def _instruction_line(census: dict | None) -> str:
    if not census:
        return ""
    if "unavailable" in census:
        return f"\n  machine code: {census['unavailable']}"
    found = ", ".join(f"{name} x{count}" for name, count in census["instructions"].items()) or "none found"
    return f"\n  int8 multiply instructions in the library: {found}"


def _untuned_line(tuning: dict) -> str:
    untuned, total = tuning["untuned"], len(tuning["tasks"])
    if not untuned:
        return f"0 of {total} tasks ran untuned"
    return f"{len(untuned)} of {total} tasks ran untuned (slow, unscheduled code): {', '.join(untuned)}"


def _print_artifact(artifact) -> None:
    from rich.console import Console
    from rich.table import Table

    from tensorfold.targets.tuning.profile import top_tasks

    manifest, tuning = artifact.manifest, artifact.manifest["tuning"]
    table = Table(title=f"built {manifest['source']} for {manifest['target']['name']}", show_header=False)
    rows = [
        ("artifact", artifact.path),
        ("library", ", ".join(str(v) for k, v in manifest["files"].items() if k in ("library", "cuda_source", "linked")
                              and v)),
        ("inputs", ", ".join(f"{i['name']} {tuple(i['shape'])} {i['dtype']}" for i in manifest["inputs"])),
        ("outputs", ", ".join(f"{o['name']} {tuple(o['shape'] or ())} {o['dtype']}" for o in manifest["outputs"])),
        ("target", str(manifest["target"]["tvm"])),
        ("tuning database", tuning["database"] + ("" if tuning["database_found"]
                                                  else " (new)" if tuning["trials_spent"] else " (absent: nothing reused)")),
        ("tasks", f"{len(tuning['tasks'])}: {len(tuning['tuned_before'])} reused, {len(tuning['tuned_now'])} tuned now, "
                  f"{len(tuning['untuned'])} untuned"),
        ("untuned", _untuned_line(tuning)),
        ("trials spent", f"{tuning['trials_spent']} of {tuning['budget']} ({tuning['seconds']} s)"),
        ("prepacked weights", str(manifest["prepacked_weights"])),
        ("build time", f"{manifest['build_seconds']} s"),
    ]
    if tuning.get("database_repairs"):
        rows.append(("database repaired", "\n".join(tuning["database_repairs"])))
    if tuning.get("lock_wait_seconds", 0) >= 1:
        rows.append(("waited for database", f"{tuning['lock_wait_seconds']:.0f} s (another build was using it)"))
    slowest = top_tasks(tuning.get("task_profile", []))
    if slowest:
        rows.append(("largest tasks", "\n".join(slowest)))
    if manifest.get("int8"):
        int8 = manifest["int8"]
        rows.append(("int8", f"{len(int8['int8_ops'])} conv/matmul ops on 8-bit integers "
                              f"({len(int8['int8_kernels'])} compiled int8 kernels); {len(int8['float_ops'])} left in float"
                     + "".join(f"\n  float: {op}" for op in int8["float_ops"])
                     + _instruction_line(int8.get("machine_instructions"))))
    if manifest.get("bf16"):
        bf16, error = manifest["bf16"], manifest["bf16"]["error"] or {}
        counts = (bf16.get("instructions") or {}).get("instructions")
        rows.append(("bf16", f"{bf16['convs']} convs in bf16 ({bf16['instruction']}"
                             + (f", {counts.get(bf16['instruction'], 0)} in the library" if counts is not None else "")
                             + f"), {bf16['fp32_convs']} left fp32; "
                             + (f"outputs vs fp32 on {error['inputs']}: max |diff| {error['max_abs']:.3g} "
                                f"({100 * error['relative']:.2f} % of the largest output)" if error.get("measured")
                                else error.get("reason", "error not measured"))
                             + (f"\n  warning: {bf16['warning']}" if bf16.get("warning") else "")))
    if manifest["files"].get("link_instructions"):
        rows.append(("to link", manifest["files"]["link_instructions"]))
    for key, value in rows:
        table.add_row(key, value)
    Console(soft_wrap=False).print(table)


def _targets(args: argparse.Namespace) -> int:
    from tensorfold.targets import list_targets
    from tensorfold.targets.registry import KNOWN_NAMES

    for target in list_targets():
        print(f"{target.name}: {target.description}")
        print(f"    tvm target: {target.tvm_target}")
        print(f"    runs on: {target.placement.describe(target.device)}; links with: {target.link}"
              + (f" ({target.cross_compiler})" if target.cross_compiler else ""))
    print(f"names: {', '.join(KNOWN_NAMES)}")
    return 0


def _measure(args: argparse.Namespace) -> int:
    from tensorfold.measure import MeasureError, measure
    from tensorfold.targets import get_target

    for name in args.target:
        get_target(name)  # a bad target name fails before any model is loaded
    data = args.data or _first_task(args)
    try:
        report = measure(args.models, args.target, data=data, rounds=args.rounds, warmup=args.warmup,
                         tune_trials=args.tune_trials, report=args.report, passes=args.passes,
                         rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, rpc_timeout=args.rpc_timeout,
                         work_dir=args.work_dir, threads=args.threads, limit=args.limit, progress=not args.quiet,
                         calibration=_calibration(args), train_data=_train_data(args),
                         engines=_engine_list(args.engines))
    except MeasureError as e:
        e.report.print()
        if args.report:
            print(f"wrote {', '.join(e.report.files)}")
        raise
    report.print()
    if args.report:
        print(f"wrote {', '.join(report.files)}")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from tensorfold.deployment import deploy

    result = deploy(args.model, args.target, args.output, speedup=args.speedup, latency_ms=args.latency,
                    max_drop=args.max_drop, data=args.data, calibration=args.calibration, train_data=args.train_data,
                    engine=args.engine, tune_trials=args.tune_trials, recipe=args.recipe,
                    finetune_epochs=args.finetune_epochs, threads=args.threads, rpc_tracker=args.rpc_tracker,
                    rpc_key=args.rpc_key, input_shape=args.input_shape, weights=args.weights, rounds=args.rounds,
                    progress=not args.quiet,
                    **({} if args.finetune_lr is None else {"finetune_lr": args.finetune_lr}))
    verdict = result.report["verdict"]
    print(f"{'MET' if verdict['met'] else 'NOT MET'}: {verdict['summary']}")
    print(f"pipeline: {result.report['pipeline']}" + ("; int8" if result.report["int8"].get("int8") else ""))
    print(f"wrote {result.out}: model.onnx, artifact/, report.md, report.json, recipe.toml")
    return 0


def _engine_list(text: str | None) -> list[str] | None:
    return None if text is None else [e.strip() for e in text.split(",") if e.strip()]


def _tasks(args: argparse.Namespace) -> int:
    from tensorfold.runtime.tasks import list_tasks

    for task in list_tasks():
        n_train, n_test = task.sizes()
        baseline = task.baseline()
        if baseline is None:
            trained = "not trained yet (trains on first use)"
        else:
            seconds = baseline.get("train_seconds")
            trained = (f"test {task.metric_name} {baseline[task.metric]:.4f} on {baseline['test_samples']}"
                       + (f" (trained in {seconds} s)" if seconds is not None else ""))
        print(f"{task.name}: {task.description}")
        print(f"    model: {task.factory.__name__}, input {tuple(task.input_shape)}; data: {n_train} train "
              f"({min(task.calibration_count, n_train)} of them for calibration) / {n_test} test")
        print(f"    baseline: {trained}")
        print(f"    why: {task.why}")
    return 0


def _rpc(args: argparse.Namespace) -> int:
    from tensorfold.targets import rpc

    if args.action == "start":
        tracker = rpc.start_tracker(args.host, args.port)
        print(f"RPC tracker on {args.host}:{args.port} (pid {tracker.process.pid}, log {tracker.log}); "
              f"stop it with `tensorfold rpc stop`")
        return 0
    if args.action == "status":
        print(rpc.connect_tracker(args.host, args.port).text_summary())
        return 0
    stopped = 0
    for record in rpc.recorded_processes():
        if not args.all and not rpc.started_for_tracker(record, args.port):
            continue
        if rpc.stop_group(record["pid"]):
            stopped += 1
            print(f"stopped {record['kind']} on {record['host']}:{record['port']} (pid {record['pid']})")
        os.remove(record["pid_file"])
    if not stopped:
        print("nothing to stop")
    return 0


def _rpc_server(args: argparse.Namespace) -> int:
    import time

    from tensorfold.targets import qemu, rpc

    if not args.qemu_arm64:
        raise TensorfoldError("rpc-server: only --qemu-arm64 is provided here; a real device runs TVM's RPC app "
                              "or `python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY` itself")
    host, port = rpc.parse_address(args.tracker)
    server = qemu.start_arm64_server(host, port, args.key, args.port)
    print(f"arm64 RPC server under qemu on 127.0.0.1:{server.info['port']} (pid {server.process.pid}), "
          f"registered at {host}:{port} under key {args.key!r}; log {server.log}")
    if args.background:
        print("stop it with `tensorfold rpc stop`")
        return 0
    try:
        while server.alive():
            time.sleep(1.0)
        print(f"the server exited (code {server.process.returncode}); log {server.log}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def build_parser() -> argparse.ArgumentParser:
    from tensorfold.runtime.tasks import task_names

    parser = argparse.ArgumentParser(prog="tensorfold", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    deploy = sub.add_parser("deploy", help="compress for a target to a measured speed-up: choose layers and ranks "
                            "from latencies measured on the target, build, measure, report met / not met")
    deploy.add_argument("model", help="an .onnx file, torchvision:<arch>, package.module:function, or a task")
    deploy.add_argument("--target", "-t", required=True, help="x86, x86:<mcpu>, arm64[:<mcpu>] (TVM over RPC), ... "
                        "(see `tensorfold targets`)")
    deploy.add_argument("--speedup", type=float, help="requested end-to-end speed-up over the original, > 1 "
                      "(default 2 when --latency is not given)")
    deploy.add_argument("--latency", type=float, metavar="MS", help="requested end-to-end latency in ms (instead "
                        "of --speedup)")
    deploy.add_argument("--max-drop", type=float, default=1.0, help="accuracy points the result may lose "
                        "(default 1.0), checked on --data")
    deploy.add_argument("--data", help="labelled data for accuracy: a task name (its test set) or an ImageFolder "
                        "(default when MODEL is a task: its test set; else random inputs, fidelity only)")
    deploy.add_argument("--calibration", help=CALIBRATION_HELP + "; also what layer errors are measured on")
    deploy.add_argument("--train-data", help="labelled data to fine-tune the result on, distilled from the original "
                        "(a task name or an ImageFolder; no fine-tuning without it)")
    deploy.add_argument("--finetune-epochs", type=int, default=1, help="epochs of fine-tuning with --train-data "
                        "(default 1)")
    deploy.add_argument("--finetune-lr", type=float, help="Adam's learning rate for that fine-tuning (default "
                        "1e-4; backs off to a tenth when a run only hurts; docs/deploy.md)")
    deploy.add_argument("--engine", help="the engine latencies are measured on: onnxruntime (default on x86) or tvm "
                        "(TVM over RPC on remote targets)")
    deploy.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials for the artifact (default 0)")
    deploy.add_argument("--recipe", help="a recipe.toml from an earlier deploy: repeat its choices (no latency "
                        "table, no selection)")
    deploy.add_argument("-o", "--output", required=True, help="output folder: model.onnx, artifact/, report.md, "
                        "report.json, recipe.toml, stages/ (a deploy into the same folder resumes)")
    deploy.add_argument("--threads", type=int, help="threads for the engines (default: physical cores)")
    deploy.add_argument("--rounds", type=int, default=20, help="timed rounds of the end-to-end measure (default 20)")
    deploy.add_argument("--rpc-tracker", help="HOST:PORT of the RPC tracker for remote targets, or direct:HOST:PORT")
    deploy.add_argument("--rpc-key", help="device key at the tracker (default: the target's, e.g. arm64)")
    deploy.add_argument("--input-shape", help="input shape, e.g. 1,3,224,224 (torch models; ONNX with free dims)")
    deploy.add_argument("--weights", help="a state-dict file for a torchvision/factory model")
    deploy.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    deploy.set_defaults(func=_deploy)

    compress = sub.add_parser("compress", help="run a pass pipeline on a model and write the result")
    compress.add_argument("model", help="an .onnx file, torchvision:<arch>, package.module:function, or a task "
                          "(`tensorfold tasks`)")
    compress.add_argument("-p", "--passes", required=True, help='pipeline, e.g. "fold_bn, svd(rank=8)"')
    compress.add_argument("-o", "--output", required=True,
                          help="output file: .onnx (any model), .pt2 or .pt (torch), .tfz (after kmeans)")
    compress.add_argument("--input-shape", help="input shape, e.g. 1,3,224,224 (torch models; ONNX with free dims)")
    compress.add_argument("--weights", help="a state-dict file for a torchvision/factory model")
    compress.add_argument("--report", help="write the JSON report here")
    compress.add_argument("--eval", choices=task_names(), metavar="TASK",
                          help="also report the task's test score before/after (default when MODEL is a task); "
                          f"one of {', '.join(task_names())}")
    compress.add_argument("--calibration", help=CALIBRATION_HELP)
    compress.add_argument("--train-data", help=TRAIN_HELP)
    compress.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    compress.set_defaults(func=_compress)

    passes = sub.add_parser("passes", help="list the registered passes and their options")
    passes.set_defaults(func=_passes)

    build = sub.add_parser("build", help="compile a model with TVM for a target into an artifact folder")
    build.add_argument("model", help="an .onnx file, torchvision:<arch>, package.module:function, or a task")
    build.add_argument("--target", "-t", required=True, help="x86, x86:<mcpu>, cuda[:sm_XX], arm64[:<mcpu>], "
                       "android-arm64 (see `tensorfold targets`)")
    build.add_argument("-o", "--output", required=True, help="artifact folder to write")
    build.add_argument("-p", "--passes", help='compress first with this pipeline, e.g. "fold_bn, svd(rank=8)"')
    build.add_argument("--tune-trials", type=int, default=0,
                       help="MetaSchedule trial budget for workloads the tuning database lacks (default 0)")
    build.add_argument("--tuning-db", help="tuning database folder (default ~/.cache/tensorfold/tuning/<target>)")
    build.add_argument("--tune-further", action="store_true",
                       help="spend the budget on tuned workloads too, starting from their best records")
    build.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                       help="bf16: convs multiply bfloat16, summing in fp32: on Intel AMX tiles (Xeon Sapphire Rapids "
                       "or later), else with AVX512-BF16 (AMD Zen 4 or later; give --tune-trials, tuning "
                       "tensorizes them); the output error against fp32 is reported (docs/architecture.md)")
    build.add_argument("--rpc-tracker", help="HOST:PORT of the RPC tracker where an arm64/android device tunes "
                       "(default 127.0.0.1:9190)")
    build.add_argument("--rpc-key", help="device key at the tracker (default: the target's, e.g. arm64)")
    build.add_argument("--input-shape", help="input shape, e.g. 1,3,224,224 (torch models; ONNX with free dims)")
    build.add_argument("--weights", help="a state-dict file for a torchvision/factory model")
    build.add_argument("--report", help="also write the manifest (with the tuning summary) here")
    build.add_argument("--calibration", help=CALIBRATION_HELP)
    build.add_argument("--train-data", help=TRAIN_HELP)
    build.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    build.set_defaults(func=_build)

    targets = sub.add_parser("targets", help="list the build targets, their TVM target dicts and where they run")
    targets.set_defaults(func=_targets)

    measure = sub.add_parser("measure", help="latency and accuracy per candidate x engine x target, side by side")
    measure.add_argument("models", nargs="+", metavar="MODEL",
                         help="what compress takes (.onnx, torchvision:<arch>, pkg.mod:fn, a task) or an artifact folder")
    measure.add_argument("--target", "-t", action="append", required=True, help="a target; repeat for more")
    measure.add_argument("-p", "--passes", help="also measure each model compressed with this pipeline")
    measure.add_argument("--data", help="a task name (its test set) or an ImageFolder directory (default: the "
                         "task's test set when a model is a task, else random inputs, fidelity only)")
    measure.add_argument("--limit", type=int, help="evaluate on the first N images only")
    measure.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials for builds (0: untuned)")
    measure.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    measure.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds (default 3)")
    measure.add_argument("--engines", metavar="LIST",
                         help="comma-separated engines to measure where a target offers them: torch, onnxruntime, "
                              "tvm, openvino-fp32, openvino (its default precision), tvm-rpc (default: every engine "
                              "each target offers; OpenVINO's on x86 when installed: pip install -e \".[openvino]\")")
    measure.add_argument("--threads", type=int, help="threads for every host engine (default: physical cores)")
    measure.add_argument("--rpc-tracker", help="HOST:PORT of the RPC tracker for remote targets "
                         "(default 127.0.0.1:9190), or direct:HOST:PORT for one RPC server")
    measure.add_argument("--rpc-key", help="device key at the tracker (default: the target's, e.g. arm64)")
    measure.add_argument("--rpc-timeout", type=float, default=5.0, help="seconds to reach the tracker (default 5)")
    measure.add_argument("--work-dir", help="where to build artifacts (default: a temporary folder)")
    measure.add_argument("--report", help="write report.json here, and PNG plots beside it")
    measure.add_argument("--calibration", help=CALIBRATION_HELP)
    measure.add_argument("--train-data", help=TRAIN_HELP)
    measure.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    measure.set_defaults(func=_measure)

    tasks = sub.add_parser("tasks", help="list the trained tasks (usable as MODEL, --data, --calibration)")
    tasks.set_defaults(func=_tasks)

    rpc = sub.add_parser("rpc", help="start or stop a local TVM RPC tracker (127.0.0.1)")
    rpc.add_argument("action", choices=["start", "stop", "status"])
    rpc.add_argument("--host", default="127.0.0.1", help="tracker host (start: loopback only)")
    rpc.add_argument("--port", type=int, default=9190, help="tracker port (default 9190)")
    rpc.add_argument("--all", action="store_true", help="stop: every tracker and server started here (without it: "
                     "the tracker on --port and the servers registered at it)")
    rpc.set_defaults(func=_rpc)

    server = sub.add_parser("rpc-server", help="run an aarch64 TVM RPC server under qemu, registered at a tracker")
    server.add_argument("--qemu-arm64", action="store_true", required=True,
                        help="emulate aarch64 (runtime from scripts/prepare-arm64-runtime.sh)")
    server.add_argument("--tracker", default="127.0.0.1:9190", help="tracker HOST:PORT (default 127.0.0.1:9190)")
    server.add_argument("--key", default="arm64", help="device key to register under (default arm64)")
    server.add_argument("--port", type=int, help="server port on 127.0.0.1 (default: a free one)")
    server.add_argument("--background", action="store_true", help="return at once; `tensorfold rpc stop` stops it")
    server.set_defaults(func=_rpc_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return args.func(args)
    except TensorfoldError as e:
        print(f"tensorfold: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
