"""`tf.build`: a Graph (or a module with example inputs, or an .onnx path) -> artifact folder."""
from __future__ import annotations

import os
from typing import Any

from tensorfold.ir import Graph, capture, load
from tensorfold.ir.errors import TensorfoldError
from tensorfold.targets import Artifact, Target
from tensorfold.targets import build as _build_graph


def build(graph: Any, target: str | Target, out_dir: str | os.PathLike, tune_trials: int = 0,
          tuning_db: str | os.PathLike | None = None, progress: bool = True,
          example_inputs: Any = None, tune_further: bool = False, int8_network: str = "auto",
          float_network: str = "auto", precision: str = "fp32") -> Artifact:
    """Compile for `target` ("x86", "x86:znver4", "cuda:sm_80", "arm64", "android-arm64") into `out_dir`.

    `graph`: a tensorfold Graph, an `.onnx` path, or a torch module with `example_inputs`.
    `tune_trials`: MetaSchedule trials for the workloads the tuning database has no record
    of (0: none; records already there are still used). `tuning_db`: the database folder
    (default `~/.cache/tensorfold/tuning/<target key>/`). `tune_further`: spend the trials on
    every workload, tuned ones too, starting from their best records. `int8_network` (QDQ graphs on a
    dot-product CPU): "auto" (blocked with VNNI or AMX, else per-conv), "per-conv", "blocked" or "nchw"
    (targets/build.py says what each does). `float_network` (fp32 convs): "auto" (blocked on x86),
    "blocked" or "nchw". `precision`: "fp32" (default) or "bf16" (convs multiply bfloat16, sum fp32: on AMX
    tiles on Intel Xeon Sapphire Rapids or later, else AVX512-BF16's vdpbf16ps on AMD Zen 4 or later, which
    needs tune_trials; the manifest's `bf16` reports the output error). Returns the Artifact (folder +
    manifest); `artifact.load()` runs it in this process when the target is local.
    """
    if isinstance(graph, (str, os.PathLike)):
        graph = load(os.fspath(graph))
    elif not isinstance(graph, Graph):
        if example_inputs is None:
            raise TensorfoldError("build(module, ...) needs example_inputs=...; or pass tf.capture(module, inputs)")
        graph = capture(graph, example_inputs)
    return _build_graph(graph, target, os.fspath(out_dir), tune_trials=tune_trials,
                        tuning_db=None if tuning_db is None else os.fspath(tuning_db), progress=progress,
                        tune_further=tune_further, int8_network=int8_network,
                        float_network=float_network, precision=precision)
