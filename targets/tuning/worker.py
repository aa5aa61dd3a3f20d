"""The build function MetaSchedule's builder workers run (kept tiny: it is imported in each worker).

MetaSchedule's default build imports `tvm.s_tir.tensor_intrin` in every worker, and
LocalBuilder starts fresh workers for every batch of candidates (a leak workaround). That
import parses hundreds of TVMScript intrinsics: ~28 s of CPU per worker on an idle 2-core
EPYC, 1-2 min under load (measured), which dominated small tuning budgets. The
candidates arrive already tensorized (RewriteTensorize runs in the tuning process), so
building them does not need the registry; it is imported only if a build fails without it.
"""
from __future__ import annotations


def build_candidate(mod, target, _params):
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    try:
        return tvm_build(mod, target=target)
    except Exception:  # noqa: BLE001 - retry the way MetaSchedule's default build would
        import tvm.s_tir.tensor_intrin  # noqa: F401

        return tvm_build(mod, target=target)


def export_cross(rt_mod, compiler: str) -> str:
    """A candidate as a shared library built by `compiler` (an aarch64 g++, or the NDK's clang):
    the device loads a .so; MetaSchedule's default export writes a .tar that only a device
    with its own compiler could link."""
    import os
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    rt_mod.export_library(path, fcompile=cc.cross_compiler(compiler))
    return path


def alloc_from_host(session, device, args_info, alloc_repeat):
    """RPCRunner's argument allocation, filled with random values sent from here: MetaSchedule's
    default fills them on the device with `random_fill_for_measure`, which TVM runtimes built
    without USE_RANDOM (the aarch64 runtime here, most phone apps) do not have."""
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rng = np.random.default_rng(0)

    def fill(tensor):
        values = rng.uniform(-1, 1, size=tuple(tensor.shape))
        tensor.copyfrom(values.astype(str(tensor.dtype)))

    return alloc_argument_common(fill, device, args_info, alloc_repeat)
