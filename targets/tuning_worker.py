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
