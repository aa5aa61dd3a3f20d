"""Graph + target -> artifact folder: import into Relax, tune (or reuse tuning), compile, link.

The pipeline is the one `relax.get_pipeline("static_shape_tuning")` runs, spelled out so
that tuning can skip tasks the database already holds and use our builder and runner
(that pipeline takes neither and stalled here, docs/toolchain.md#tvm). On CPU the weights are
prepacked: tuned schedules may rewrite a weight's layout, and with the weights bound as
constants FoldConstant does the rewrite once at build time, so the library keeps the
plain `main(inputs...)` interface (no `main_transform_params` step at load).
"""
from __future__ import annotations

import os
import platform
import time
from typing import Any

import numpy as np

from tensorfold.ir.errors import BuildError

from .artifact import FORMAT, MANIFEST, Artifact, plain_tvm_instructions
from .bf16 import bf16_convs, route_for as bf16_route
from .float_layout import block_convs, lanes_for
from .frontend import to_relax
from .int8.amx import AMX, amx_kernels, target_has_amx
from .int8.instructions import BF16_INSTRUCTIONS, census
from .int8.layout import VNNI, dot_layout_for, tensorized_kernels
from .int8.relax import has_qdq, int8_kernels, lower_qdq
from .legalize import legalize as legalize_layouts
from .linking import check_toolchain, export
from .registry import Target, get_target
from .tuning.tune import TuningSummary, default_database_dir, tune


INT8_NETWORKS = ("auto", "per-conv", "blocked", "nchw")
FLOAT_NETWORKS = ("auto", "blocked", "nchw")
PRECISIONS = ("fp32", "bf16")
BF16_ERROR_INPUTS = 4  # random inputs the bf16 build's output error is measured on


def build(graph, target: str | Target, out_dir: str, tune_trials: int = 0, tuning_db: str | None = None,
          progress: bool = True, tune_further: bool = False, int8_network: str = "auto",
          float_network: str = "auto", precision: str = "fp32") -> Artifact:
    """Compile `graph` for `target` into the folder `out_dir` (see artifact.py for its layout).

    tune_trials: MetaSchedule trial budget for the tasks the tuning database lacks (0: no
    tuning, but records already in the database are applied). tuning_db: the database
    folder (default: one per target under the user cache, see tuning.default_database_dir).
    tune_further: spend tune_trials on every task, tuned ones included (tuning.tune).
    int8_network (QDQ graphs): "per-conv" converts each blocked conv's input and output layout and
    requantizes in float; "blocked" requantizes in fixed point and keeps activations in the blocked
    layout between convs (one layout change in, one out). "auto" (default): "blocked" where the target
    has VNNI or AMX, "per-conv" elsewhere (AVX2's s16 pairs, AArch64's sdot: not measured better there).
    Measured on ResNet-18 at 150 trials (README, int8): on a Zen 4 (VNNI), once the data-movement
    kernels got their fixed schedule (tuning/injective.py), "blocked" ran 6.70 ms against per-conv's
    7.43 back to back (7.49 against 8.00 ms single calls), its kernels between the convs 0.8 ms against
    2.4; on a Xeon with AMX, whose conv kernel is fixed, "per-conv" spends twice the blocked network's
    time in the transposes around the convs. "nchw" uses no blocked layout
    (what a CPU without a dot product gets: LLVM's vectoriser widens the bytes), to measure what the
    layout buys (benchmarks/int8_layouts.py).
    float_network (fp32 convs of a graph without QDQ): "blocked" runs groups=1 and depthwise convs in
    NCHW{lanes}c with the layout kept between them (float_layout.py); "nchw" leaves them as imported.
    "auto" (default): "blocked" on x86 (16 lanes with AVX-512, 8 with AVX2), "nchw" elsewhere. Measured
    at 200 trials on a Xeon (README, performance): ResNet-18 1.63x and MobileNet-v2 1.19x the NCHW build.
    precision (graphs without QDQ): "fp32" (default), or "bf16" on an x86 CPU with AMX-BF16 or AVX512-BF16:
    the blocked convs whose input channels fill whole blocks multiply bfloat16-rounded activations and
    weights, summing in fp32 (bf16.py: AMX tiles with 32-channel blocks, a fixed kernel; else `vdpbf16ps`
    with 16-channel blocks, tensorized by tuning, so give it tune_trials); the manifest's `bf16` gives
    their count, the bf16 instructions in the library and the output error measured against fp32 on
    random inputs (where the target is this host).
    """
    if int8_network not in INT8_NETWORKS:
        raise BuildError(f"int8_network={int8_network!r}; expected one of {', '.join(INT8_NETWORKS)}")
    if float_network not in FLOAT_NETWORKS:
        raise BuildError(f"float_network={float_network!r}; expected one of {', '.join(FLOAT_NETWORKS)}")
    if precision not in PRECISIONS:
        raise BuildError(f"precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    target = get_target(target)
    if tune_trials < 0:
        raise BuildError(f"tune_trials must be >= 0, got {tune_trials}")
    route = _check_bf16(target, float_network) if precision == "bf16" else None
    check_toolchain(target)  # before minutes of compiling, not after
    started = time.perf_counter()
    mod, frontend = to_relax(graph)
    if precision == "bf16" and has_qdq(mod):
        raise BuildError(f"precision='bf16' is for fp32 graphs; {graph.source} is quantized (QDQ), so its convs "
                         "already run in int8: build it with the default precision")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _remove_previous_artifact(out_dir)

    outputs = _output_infos(mod, list(graph.output_names))
    int8, dot_layout = None, None
    if has_qdq(mod):  # a quantized (QDQ) graph: run its convs and matmuls on the integers
        dot_layout = dot_layout_for(target.tvm_target) if int8_network != "nchw" else None
        tiles = AMX if dot_layout is not None and target_has_amx(target.tvm_target) else None
        if int8_network == "auto":
            int8_network = "blocked" if tiles is not None or dot_layout is VNNI else "per-conv"
        mod, int8 = lower_qdq(mod, dot_layout, fixed_point=int8_network == "blocked", tiles=tiles)
        int8.network = int8_network
    float_blocked, float_fallback = 0, None
    lanes = lanes_for(target.tvm_target) if float_network != "nchw" and int8 is None else None
    if route is not None:
        lanes = route.block  # whole bf16 input blocks from conv to conv (bf16.py)
    if lanes is not None:
        mod, float_blocked, float_fallback = _block_float_convs(mod, lanes, target)
    bf16 = None
    if route is not None:
        with target.tvm():
            mod, bf16_count = bf16_convs(mod, route)
        bf16 = {"convs": bf16_count, "route": route.name, "instruction": route.instruction, "kernel": route.kernel,
                "fp32_convs": float_blocked - bf16_count, "instructions": None, "error": None}
    prepack = target.tvm_target["kind"] == "llvm"
    mod = _prepare(mod, target, prepack)
    if int8 is not None:
        # the AMX kernel multiplies in tile instructions, not in a TIR reduction int8_kernels can read
        int8.kernels = int8_kernels(mod) + [f"{name}: uint8 x int8 -> int32" for name in amx_kernels(mod)]
    database_dir = os.path.abspath(tuning_db) if tuning_db else default_database_dir(target)
    mod, tuning = tune(mod, target, database_dir, tune_trials, out_dir, progress, further=tune_further)
    if dot_layout is not None:
        int8.tensorized = tensorized_kernels(mod, dot_layout) + amx_kernels(mod)
    prepacked = _prepack(mod, target) if prepack else None
    if prepacked is not None:
        mod = prepacked
    executable = _compile(mod, target)
    files = export(executable, target, out_dir)
    if int8 is not None and target.tvm_target["kind"] == "llvm" and target.link != "tar":
        int8.instructions = census(os.path.join(out_dir, files["library"]), target.tvm_target.get("mtriple"))
    if bf16 is not None and target.link != "tar":
        bf16["instructions"] = census(os.path.join(out_dir, files["library"]), target.tvm_target.get("mtriple"),
                                      BF16_INSTRUCTIONS)
        counts = bf16["instructions"].get("instructions")  # None where objdump is missing
        if route.tuned and bf16["convs"] and counts is not None and not counts.get(route.instruction):
            bf16["warning"] = (f"no {route.instruction} in the library: its bf16 convs are tensorized by tuning, and "
                               "they were not tuned (give tune_trials, or a tuning database that has them)")

    manifest = {
        "format": FORMAT,
        "source": str(graph.source),
        "frontend": frontend,
        "inputs": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype} for i in graph.inputs],
        "outputs": outputs,
        "target": target.to_json(),
        "files": files,
        "weights": "embedded in the library as constants",
        "prepacked_weights": prepacked is not None and _has_prepacked_kernels(mod),
        "int8": int8.to_json() if int8 is not None else None,
        "float_convs_blocked": ({"lanes": lanes, "convs": float_blocked} if float_blocked else
                                {"lanes": lanes, "convs": 0, "kept_nchw": float_fallback} if float_fallback else None),
        "precision": precision,
        "bf16": bf16,
        "tuning": {**tuning.to_json(), "log_dir": _relative(tuning.log_dir, out_dir)},
        "versions": _versions(),
        "build_seconds": round(time.perf_counter() - started, 2),
        "load": {
            "tensorfold": f"tensorfold.targets.artifact.load_artifact('{out_dir}')",
            "plain_tvm": plain_tvm_instructions(files["library"], target.device),
        },
    }
    if target.link == "tar":
        manifest["load"]["android"] = files.get("link_instructions") or "model.so was linked with the NDK"
    artifact = Artifact(out_dir, manifest)
    artifact.save_manifest()
    if bf16 is not None:  # the artifact, as saved, against the fp32 graph
        bf16["error"] = _bf16_error(artifact, graph, target)
        artifact.save_manifest()
    return artifact


def _check_bf16(target: Target, float_network: str):
    """The bf16 route (bf16.py) for `target`, or a BuildError saying why there is none."""
    if float_network == "nchw":
        raise BuildError("precision='bf16' runs the convs in the blocked layout; float_network='nchw' keeps NCHW")
    route = bf16_route(target.tvm_target)
    if route is None:
        cpu = target.tvm_target.get("mcpu", "generic")
        raise BuildError(f"precision='bf16' needs an x86 CPU with AVX512-BF16 (AMD Zen 4 or later, Intel Cooper "
                         f"Lake or later) or AMX-BF16 (Intel Sapphire Rapids or later); target {target.name} "
                         f"({cpu}) has neither, so build it fp32")
    return route


def _bf16_error(artifact: Artifact, graph, target: Target) -> dict:
    """The bf16 build's outputs against the fp32 graph's (onnxruntime / torch) on random inputs: the
    largest absolute difference relative to the largest fp32 output, and top-1 agreement for a classifier."""
    if target.placement.kind != "local" or target.name != "x86":
        return {"measured": False, "reason": f"the target {target.name} is not this host: not run here"}
    rng = np.random.default_rng(0)
    loaded = artifact.load()
    worst, scale, agree, total = 0.0, 0.0, 0, 0
    for _ in range(BF16_ERROR_INPUTS):
        feeds = {i.name: rng.standard_normal(tuple(i.shape)).astype(np.float32) for i in graph.inputs}
        reference = graph.run(feeds)
        built = loaded.run(feeds)
        for name in graph.output_names:
            want, got = np.asarray(reference[name], np.float64), np.asarray(built[name], np.float64)
            worst, scale = max(worst, float(np.abs(got - want).max())), max(scale, float(np.abs(want).max()))
            if want.ndim == 2 and want.shape[1] > 1:
                agree += int((want.argmax(1) == got.argmax(1)).sum())
                total += want.shape[0]
    return {"measured": True, "inputs": f"{BF16_ERROR_INPUTS} standard normal inputs", "max_abs": worst,
            "relative": worst / scale if scale else 0.0, "top1_agreement": agree / total if total else None}


def _remove_previous_artifact(out_dir: str) -> None:
    # A rebuild into the same folder for another target must not leave e.g. a stale model.cu.
    for name in (MANIFEST, "model.so", "model.tar", "model.cu"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def _prepare(mod, target: Target, prepack: bool):
    """Fuse into the TIR tasks MetaSchedule tunes (the zero pipeline), marking weights layout-free."""
    import tvm
    from tvm import relax

    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
              # the blocked conv2d layouts have no TOPI legalization: targets/legalize.py; the rest is TVM's own
              legalize_layouts(),
              relax.get_pipeline("zero")]
    if prepack:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    try:
        with target.tvm():
            return tvm.transform.Sequential(passes)(mod)
    except Exception as e:  # noqa: BLE001
        raise BuildError(f"lowering the model for {target.name} failed: {type(e).__name__}: {e}") from e


def _block_float_convs(mod, lanes: int, target: Target):
    """(module, blocked convs, why they were kept in NCHW or None). The blocked layout is an optimization:
    where TVM's layout conversion fails on some op of the graph, the build goes on with the NCHW graph and
    the manifest says why."""
    try:
        with target.tvm():
            return (*block_convs(mod, lanes), None)
    except Exception as e:  # noqa: BLE001
        return mod, 0, f"TVM's ConvertLayout failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _prepack(mod, target: Target):
    import tvm
    from tvm import relax

    with target.tvm():
        return tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(),
                                         relax.transform.LiftTransformParams(),
                                         relax.transform.FoldConstant()])(mod)


def _has_prepacked_kernels(mod) -> bool:
    return any(gv.name_hint.endswith("_prepacked") for gv in mod.functions)


def _compile(mod, target: Target):
    import tvm

    try:
        return tvm.compile(mod, target=target.tvm())
    except Exception as e:  # noqa: BLE001
        raise BuildError(f"compiling for {target.name} ({target.tvm_target}) failed: {type(e).__name__}: {e}") from e


def _output_infos(mod, names: list[str]) -> list[dict[str, Any]]:
    # TVM 0.27 calls struct info "types": Function.ret_ty is a TupleType or TensorType.
    def leaves(info) -> list:
        if hasattr(info, "fields"):
            return [leaf for field in info.fields for leaf in leaves(field)]
        return [info]

    infos = []
    for i, info in enumerate(leaves(mod["main"].ret_ty)):
        shape = getattr(info, "shape", None)
        values = getattr(shape, "values", None)
        infos.append({"name": names[i] if i < len(names) else f"output{i}",
                      "shape": [int(d) for d in values] if values is not None else None,
                      "dtype": str(getattr(info, "dtype", "unknown"))})
    return infos


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import tvm

    try:  # the installed distribution's version: targets/ may not import the tensorfold API package above it
        tensorfold_version = version("tensorfold")
    except PackageNotFoundError:
        tensorfold_version = "unknown (not installed)"
    versions = {"tensorfold": tensorfold_version, "tvm": tvm.__version__, "python": platform.python_version()}
    for name in ("torch", "onnx"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def _relative(path: str | None, root: str) -> str | None:
    return None if path is None else os.path.relpath(path, root)


__all__ = ["Artifact", "TuningSummary", "build"]
