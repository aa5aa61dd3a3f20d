"""finetune: training a compressed graph gets accuracy back without touching its structure (FX and ONNX)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import InputShapeError, PipelineError, TensorfoldError
from tensorfold.models import resolve
from tensorfold.runtime.evaluate import predict
from tensorfold.runtime.tasks import get_task

DAMAGE = "fold_bn, tucker2(rank=evbmf)"  # 4.4x fewer FLOPs on digits: accuracy falls to ~10 %


@pytest.fixture(scope="module")
def digits_damaged():
    original, _ = tf.compress(resolve("digits"), "fold_bn")
    damaged, _ = tf.compress(original, "tucker2(rank=evbmf)")
    return original, damaged


def _structure(graph) -> list[tuple]:
    return [(l.kind, tuple(a.shape for a in (l.spec.weight,)) if l.spec is not None and hasattr(l.spec, "weight")
             else None) for l in graph.layers()]


def _test_accuracy(graph) -> float:
    x, y = get_task("digits").test_data()
    return float(np.mean(predict(graph, x).argmax(1) == y))


@pytest.mark.parametrize("frontend", ["fx", "onnx"])
def test_finetune_recovers_a_damaged_model_and_keeps_its_structure(digits_damaged, frontend, tmp_path):
    _, damaged = digits_damaged
    if frontend == "onnx":
        damaged.save(str(tmp_path / "damaged.onnx"))
        damaged = tf.load(str(tmp_path / "damaged.onnx"))
    tuned, report = tf.finetune(damaged, "digits", epochs=2, distill=False)
    assert type(tuned) is type(damaged)
    assert _structure(tuned) == _structure(damaged)  # same layers, same factor shapes: ranks unchanged
    epochs = report.summary["epochs"]
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert report.summary["held-out accuracy before"] < 0.3 < 0.9 < report.summary["held-out accuracy after"]
    before, after = _test_accuracy(damaged), _test_accuracy(tuned)
    assert before < 0.3 and after > 0.9, (before, after)
    # the input graph is untouched
    assert _test_accuracy(damaged) == before


def test_a_rate_that_wrecks_the_model_backs_off_to_one_that_does_not(digits_damaged):
    original, _ = digits_damaged
    _, plain = tf.finetune(original, "digits", epochs=1, lr=1.0, distill=False, backoff=0, keep="last")
    before = plain.summary["held-out accuracy before"]
    assert plain.summary["held-out accuracy after"] < before - 0.2        # Adam at lr 1 wrecks a trained model
    assert "lr back-offs" not in plain.summary
    tuned, report = tf.finetune(original, "digits", epochs=1, lr=1.0, distill=False, backoff=4, keep="last")
    offs = report.summary["lr back-offs"]
    assert [b["lr"] for b in offs] == pytest.approx([10.0 ** -i for i in range(len(offs))])
    assert all(b["heldout"] < before - 0.05 and b["epoch"] == 1 for b in offs)  # each abandoned run did collapse
    assert report.summary["lr"] == pytest.approx(10.0 ** -len(offs))
    assert report.summary["held-out accuracy after"] >= before - 0.05       # the kept run did not
    assert report.summary["epochs"][-1]["heldout_top1"] == report.summary["held-out accuracy after"]
    assert len([w for w in report.warnings if "restarted from the starting weights" in w]) == len(offs)
    # the restart starts from the given weights, not from the wrecked ones: same as asking for the rate directly
    _, direct = tf.finetune(original, "digits", epochs=1, lr=report.summary["lr"], distill=False, backoff=0,
                            keep="last")
    assert direct.summary["held-out accuracy after"] == report.summary["held-out accuracy after"]
    with pytest.raises(PipelineError, match="backoff"):
        tf.finetune(original, "digits", backoff=-1)


def test_a_fine_tune_that_only_hurts_returns_the_model_it_was_given(digits_damaged):
    original, _ = digits_damaged
    x, _ = get_task("digits").test_data()
    _, last = tf.finetune(original, "digits", epochs=1, lr=0.01, distill=False, backoff=0, keep="last")
    before = last.summary["held-out accuracy before"]
    assert last.summary["held-out accuracy after"] < before - 0.1            # Adam at 0.01 hurts a trained model
    kept, report = tf.finetune(original, "digits", epochs=1, lr=0.01, distill=False, backoff=0)  # keep=best
    assert report.summary["epochs"][-1]["heldout_top1"] == last.summary["held-out accuracy after"]
    assert report.summary["held-out accuracy after"] == before
    assert report.summary["kept"].startswith("the starting weights")
    assert any("returned as it was given" in w for w in report.warnings)
    np.testing.assert_array_equal(predict(kept, x), predict(original, x))  # the very weights it was given
    with pytest.raises(PipelineError, match="keep"):
        tf.finetune(original, "digits", keep="first")


def test_a_run_that_ends_below_its_start_backs_off_without_collapsing(digits_damaged):
    original, _ = digits_damaged
    # Adam at 3e-3: 1.0 -> 0.993 held out in one epoch, too small a fall to count as a collapse
    _, last = tf.finetune(original, "digits", epochs=1, lr=0.003, distill=False, backoff=1, keep="last")
    before = last.summary["held-out accuracy before"]
    assert "lr back-offs" not in last.summary and last.summary["held-out accuracy after"] < before
    _, report = tf.finetune(original, "digits", epochs=1, lr=0.003, distill=False, backoff=1)
    (off,) = report.summary["lr back-offs"]
    assert off["lr"] == pytest.approx(0.003) and "heldout" not in off
    assert off["ended"] == last.summary["held-out accuracy after"]
    assert "no epoch reached the starting held-out accuracy" in off["why"]
    assert report.summary["lr"] == pytest.approx(0.0003)
    assert report.summary["held-out accuracy after"] >= before


@pytest.mark.parametrize("before, held, constant, expected", [
    (0.79, 0.097, 0.1, True),     # ResNet-18 MUSCO stage 1 at lr 1e-3: to chance
    (0.79, 0.75, 0.1, False),     # a dip within a tenth
    (0.79, 0.70, 0.1, True),      # more than a tenth down
    (0.155, 0.106, 0.1, True),    # CP-ALS ResNet at 3e-4: barely above chance, then down to it
    (0.155, 0.14, 0.1, False),    # a small dip from a low start
    (0.105, 0.095, 0.1, False),   # a start at chance: noise, not a collapse
    (0.10, 0.95, 0.1, False),     # a damaged model recovering
])
def test_collapse_rule(before, held, constant, expected):
    from tensorfold.passes.training.loop import collapsed

    assert collapsed(before, held, True, constant) is expected
    assert collapsed(1.0, 1.6, False) and not collapsed(1.0, 1.2, False)   # MSE: up by half


def test_pipeline_finetune_then_int8_and_tfz(tmp_path):
    graph = resolve("digits")
    compressed, report = tf.compress(graph, f"{DAMAGE}, finetune(epochs=2), kmeans, huffman", train_data="digits",
                                     calibration="digits")
    step = next(p for p in report.passes if p.name == "finetune")
    assert step.summary["teacher"].startswith("digits")  # distils from the pipeline's input by default
    path = tmp_path / "d.tfz"
    compressed.save(str(path))
    assert _test_accuracy(tf.load(str(path))) > 0.9
    quantized, _ = tf.compress(graph, f"{DAMAGE}, finetune(epochs=2), int8", train_data="digits",
                               calibration="digits")
    assert _test_accuracy(quantized) > 0.9


def test_finetuned_graph_builds_with_tvm(digits_damaged, tmp_path):
    from tensorfold.targets import load_artifact

    tuned, _ = tf.finetune(digits_damaged[1], "digits", epochs=1)
    artifact = tf.build(tuned, "x86", tmp_path / "out", progress=False)
    x, _ = get_task("digits").test_data()
    expected = predict(tuned, x[:4])
    got = np.concatenate([next(iter(load_artifact(artifact.path)(x[i:i + 1]).values())) for i in range(4)])
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4


def test_freeze_keeps_first_and_last_layers(digits_damaged):
    _, damaged = digits_damaged
    tuned, report = tf.finetune(damaged, "digits", epochs=1, freeze="first|last")
    names = [l.name for l in damaged.layers() if l.kind in ("conv", "linear")]
    for name in (names[0], names[-1]):
        assert np.array_equal(tuned.layer(name).spec.weight, damaged.layer(name).spec.weight)
    assert not np.array_equal(tuned.layer(names[1]).spec.weight, damaged.layer(names[1]).spec.weight)
    assert {r.layer for r in report.records if r.action == "skipped"} == {names[0], names[-1]}
    with pytest.raises(PipelineError, match="freeze pattern 'nope' matches no layer"):
        tf.finetune(damaged, "digits", freeze="nope")


class _Permuted(nn.Module):
    """The trained digits CNN with its classes rotated: a teacher that disagrees with every label."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.roll(self.model(x), 1, dims=1)


def test_distillation_pulls_predictions_toward_the_teacher(digits_damaged):
    _, damaged = digits_damaged
    task = get_task("digits")
    teacher = tf.capture(_Permuted(task.model(verbose=False)), torch.zeros(task.input_shape))
    x, _ = task.test_data()
    teacher_says = predict(teacher, x).argmax(1)
    plain, _ = tf.finetune(damaged, "digits", epochs=2)
    distilled, report = tf.finetune(damaged, "digits", epochs=2, teacher=teacher, alpha=0.9)
    assert "alpha 0.9" in report.summary["teacher"]
    agree_plain = np.mean(predict(plain, x).argmax(1) == teacher_says)
    agree_distilled = np.mean(predict(distilled, x).argmax(1) == teacher_says)
    assert agree_distilled > agree_plain + 0.3, (agree_plain, agree_distilled)


# ---- ONNX files from other converters ---------------------------------------------------------

def _wild_onnx(path) -> None:
    """Opset 11, symbolic batch, a conv weight in a Constant node, a square Gemm with transB=0
    (torch's Linear holds its transpose at the same shape) and a Gemm with transB=1."""
    rng = np.random.default_rng(0)
    conv_w = rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32)
    square = rng.normal(0, 0.3, (16, 16)).astype(np.float32)   # (in, out): transB=0
    head = rng.normal(0, 0.3, (3, 16)).astype(np.float32)      # (out, in): transB=1
    nodes = [
        helper.make_node("Constant", [], ["conv_w"], value=numpy_helper.from_array(conv_w, "conv_w")),
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "square", "square_b"], ["g"], transB=0),
        helper.make_node("Relu", ["g"], ["h"]),
        helper.make_node("Gemm", ["h", "head", "head_b"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(np.zeros(4, np.float32), "conv_b"),
             numpy_helper.from_array(square, "square"), numpy_helper.from_array(np.zeros(16, np.float32), "square_b"),
             numpy_helper.from_array(head, "head"), numpy_helper.from_array(np.zeros(3, np.float32), "head_b")]
    graph = helper.make_graph(nodes, "wild", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6), str(path))


def _learnable(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 1, 8, 8)).astype(np.float32)
    quadrant = x[:, 0, :4, :4].mean((1, 2)), x[:, 0, 4:, 4:].mean((1, 2))
    y = np.where(quadrant[0] > 0.1, 0, np.where(quadrant[1] > 0.1, 1, 2)).astype(np.int64)
    return x, y


def test_finetune_of_a_wild_onnx_file_writes_back_into_the_same_graph(tmp_path):
    path = tmp_path / "wild.onnx"
    _wild_onnx(path)
    original_bytes = path.read_bytes()
    graph = tf.load(str(path))
    x, y = _learnable(2048, 0)
    tuned, report = tf.finetune(graph, (x, y), epochs=6, lr=3e-3, batch=32)
    assert path.read_bytes() == original_bytes  # never overwritten
    assert report.summary["held-out accuracy after"] > report.summary["held-out accuracy before"] + 0.15
    model = tuned.model
    assert model.opset_import[0].version == 11
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu", "MaxPool", "Flatten", "Gemm", "Relu", "Gemm"]
    trained = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert {"conv_w", "square", "head"} <= set(trained)
    # every value moved, and accuracy on fresh data follows from the written-back values (a transposed
    # square Gemm written back the wrong way round would not reproduce what was trained)
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert not np.allclose(trained["square"], before["square"])
    fresh_x, fresh_y = _learnable(512, 1)
    scores = [np.mean(predict(g, fresh_x).argmax(1) == fresh_y) for g in (graph, tuned)]
    assert scores[1] > scores[0] + 0.15, scores


def test_onnx_torch_view_writes_every_parameter_back_exactly(tmp_path):
    from tensorfold.ir.onnx_torch import torch_view

    path = tmp_path / "wild.onnx"
    _wild_onnx(path)
    view = torch_view(tf.load(str(path)))
    assert "square" in view.transposed and "head" not in view.transposed
    with torch.no_grad():
        for parameter in view.module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    written = view.written_back()
    feeds = written.random_inputs(seed=5, batch=3)
    expected = view.module(torch.from_numpy(feeds["x"])).detach().numpy()
    assert np.allclose(written.run(feeds)["y"], expected, atol=1e-5)


def test_finetune_bad_input_names_what_is_wrong(digits_damaged, tmp_path):
    _, damaged = digits_damaged
    x, y = get_task("digits").train_data()
    with pytest.raises(InputShapeError, match=r"samples have shape \(1, 4, 4\).*takes \(1, 32, 32\)"):
        tf.finetune(damaged, (x[:, :, :4, :4], y))
    with pytest.raises(PipelineError, match=r"labels span 5\.\.14.*has 10 outputs"):
        tf.finetune(damaged, (x, y + 5))
    with pytest.raises(PipelineError, match="finetune needs labelled training data"):
        tf.compress(damaged, "finetune")
    quantized, _ = tf.compress(damaged, "int8", calibration="digits")
    with pytest.raises(PipelineError, match="Put finetune before int8"):
        tf.finetune(quantized, "digits")
    with pytest.raises(PipelineError, match="lr=-1"):
        tf.finetune(damaged, "digits", lr=-1)
    with pytest.raises(TensorfoldError, match="no such task|expected a task"):
        tf.finetune(damaged, "digitz")


def test_finetune_refuses_an_onnx_graph_onnx2torch_cannot_convert(tmp_path):
    nodes = [helper.make_node("Shrink", ["x"], ["s"], lambd=0.5),
             helper.make_node("Gemm", ["s", "w", "b"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(np.ones((2, 4), np.float32), "w"),
             numpy_helper.from_array(np.zeros(2, np.float32), "b")]
    graph = helper.make_graph(nodes, "shrink", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    path = tmp_path / "shrink.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    data = (np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32), np.zeros(64, np.int64))
    with pytest.raises(TensorfoldError, match=r"shrink\.onnx: onnx2torch cannot convert.*Shrink"):
        tf.finetune(tf.load(str(path)), data)
