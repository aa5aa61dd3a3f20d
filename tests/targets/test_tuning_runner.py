"""How tuning times a candidate: on a CPU here, with caches flushed before every call (as a network
runs it: its weights come from memory), one call per repeat; elsewhere MetaSchedule's own defaults."""
from __future__ import annotations

import numpy as np

from tensorfold.targets.registry import get_target
from tensorfold.targets.tuning.tune import COLD_CACHE, _runner


def test_local_cpu_runner_times_each_call_on_flushed_caches():
    config = _runner(get_target("x86")).evaluator_config
    assert config.enable_cpu_cache_flush
    assert (config.number, config.min_repeat_ms) == (1, 0)  # the flush comes before each repeat only
    assert config.repeat == COLD_CACHE["repeat"] >= 5


def test_gpu_runner_does_not_flush_host_caches(monkeypatch):
    cuda = get_target("cuda")
    monkeypatch.setattr(type(cuda), "runs_here", property(lambda self: True))  # as on a GPU machine
    assert not _runner(cuda).evaluator_config.enable_cpu_cache_flush


def test_cold_timing_reads_the_weights_from_memory():
    """What the flush changes, measured with the evaluator option the runner sets: a kernel that reads
    one float per cache line of a 256 KB weight, which stays in L2 when timed back to back, runs slower
    when the weight is flushed before each call. The ratio is loose: this is a shared VM."""
    import tvm
    from tvm import te

    lines = 4096  # 64-byte cache lines: 256 KB
    w = te.placeholder((lines, 16), "float32", name="w")
    x = te.placeholder((1,), "float32", name="x")
    y = te.compute((lines,), lambda i: w[i, 0] + x[0], name="y")
    lib = tvm.compile(te.create_prim_func([x, w, y]).with_attr("global_symbol", "main"), target={"kind": "llvm"})
    args = [tvm.runtime.tensor(np.ones(shape, np.float32)) for shape in ((1,), (lines, 16), (lines,))]

    def median_seconds(flush: bool) -> float:
        timer = lib.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=50, min_repeat_ms=0,
                                       f_preproc="cache_flush_cpu_non_first_arg" if flush else "")
        return float(np.median(timer(*args).results))

    hot, cold = median_seconds(False), median_seconds(True)
    assert cold > 1.5 * hot, (hot, cold)
