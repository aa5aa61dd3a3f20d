"""Data-movement kernels get a fixed CPU schedule instead of tuning trials (targets/tuning/injective.py)."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.script import relax as R

from tensorfold.targets.tuning.injective import SCHEDULED, is_fixed_task, schedule_injective

CPU = {"kind": "llvm", "num-cores": 2}


def _lowered(shape, dtype, body):
    """A Relax function of one input `body` builds, fused into PrimFuncs as a build does."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor(shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    with tvm.target.Target(CPU):
        return tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.get_pipeline("zero")])(bb.get())


def _reblock_pad(bb, x):
    """u8 NCHW16c -> NCHW4c + a zero-point pad: what the blocked int8 network runs between convs."""
    y = bb.emit(relax.op.reshape(x, (1, 2, 6, 5, 4, 4)))
    y = bb.emit(relax.op.permute_dims(y, [0, 1, 4, 2, 3, 5]))
    y = bb.emit(relax.op.reshape(y, (1, 8, 6, 5, 4)))
    return bb.emit(relax.op.nn.pad(y, [0, 0, 0, 0, 1, 1, 1, 1, 0, 0], pad_value=7.0))


def _requantize(bb, x):
    """int32 -> u8 with an int64 per-channel multiplier and shift (fixed-point requantization)."""
    multiplier = relax.const(np.arange(1, 33, dtype="int64").reshape(1, 2, 1, 1, 16) << 24, "int64")
    y = bb.emit(relax.op.right_shift(relax.op.multiply(relax.op.astype(x, "int64"), multiplier),
                                     relax.const(31, "int64")))
    return bb.emit(relax.op.astype(relax.op.clip(y, 0, 255), "uint8"))


def _primfuncs(mod):
    return {g.name_hint: f for g, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _run(mod, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(CPU)), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()


@pytest.mark.parametrize("body, shape, dtype", [(_reblock_pad, (1, 2, 6, 5, 16), "uint8"),
                                                (_requantize, (1, 2, 6, 5, 16), "int32")])
def test_fixed_schedule_computes_what_the_unscheduled_kernel_computes(body, shape, dtype):
    mod = _lowered(shape, dtype, body)
    scheduled, names = schedule_injective(mod, CPU)
    assert sorted(names) == sorted(_primfuncs(mod)) and names  # every kernel here only moves data
    for name, func in _primfuncs(scheduled).items():
        assert func.attrs[SCHEDULED]
        text = func.script()
        assert "T.parallel(" in text and "T.vectorized(" in text, text
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255 if dtype == "uint8" else 1 << 20, size=shape).astype(dtype)
    np.testing.assert_array_equal(_run(scheduled, x), _run(mod, x))


def test_kernels_that_reduce_are_left_to_tuning_and_fixed_ones_are_no_tasks():
    import tvm.s_tir.meta_schedule as ms

    def conv_then_reblock(bb, x):
        w = relax.const(np.ones((16, 8, 3, 3), "float32"))
        y = bb.emit(relax.op.nn.conv2d(x, w))
        return bb.emit(relax.op.permute_dims(y, [0, 2, 3, 1]))

    mod = _lowered((1, 8, 10, 10), "float32", conv_then_reblock)
    scheduled, names = schedule_injective(mod, CPU)
    conv = [name for name in _primfuncs(mod) if "conv2d" in name]
    assert conv and not set(conv) & set(names)
    assert SCHEDULED not in (_primfuncs(scheduled)[conv[0]].attrs or {})
    tasks = ms.relax_integration.extract_tasks(scheduled, tvm.target.Target(CPU))
    assert sorted(t.task_name for t in tasks if not is_fixed_task(t)) == sorted(conv)
    assert {t.task_name for t in tasks if is_fixed_task(t)} == set(names)


def test_gpu_targets_keep_their_kernels_for_tuning():
    mod = _lowered((1, 2, 6, 5, 16), "uint8", _reblock_pad)
    assert schedule_injective(mod, {"kind": "cuda", "arch": "sm_80"}) == (mod, [])
