"""Register only the tensor intrinsics a target's tuning can use.

MetaSchedule's TuneContext runs `import tvm.s_tir.tensor_intrin`, whose `__init__` parses
every intrinsic family as TVMScript. Measured with `python -X importtime` on the 2-core
EPYC: 66 s in all, of which the CUDA family is 45 s, ROCm 6 s, Hexagon 3 s; x86 0.6 s and
ARM 3 s (with their shared dot-product helpers). A CPU build tunes with the x86 or ARM
intrinsics only, so we import those submodules and register the package without running
its `__init__`; the later `import tvm.s_tir.tensor_intrin` then finds it already loaded.
A CUDA target (or any other) imports the family it needs explicitly.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

PACKAGE = "tvm.s_tir.tensor_intrin"


def load_for(tvm_target: dict) -> None:
    kind = tvm_target.get("kind")
    triple = str(tvm_target.get("mtriple", ""))
    if kind == "llvm" and triple.startswith("x86_64"):
        families = ["x86"]
    elif kind == "llvm" and triple.startswith("aarch64"):
        families = ["arm_cpu"]
    elif kind == "cuda":
        families = ["cuda"]
    else:
        importlib.import_module(PACKAGE)  # unknown family: the whole registry, as TVM does
        return
    if PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(PACKAGE)
        package = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
        sys.modules[PACKAGE] = package
        setattr(importlib.import_module("tvm.s_tir"), "tensor_intrin", package)
    for family in families:
        importlib.import_module(f"{PACKAGE}.{family}")
