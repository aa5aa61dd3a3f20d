"""The .tfz file: exact round trips on both front ends, sizes, refusals, corrupt and truncated files,
the digits CNN end to end, and the command that writes it."""
from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.cli import main
from tensorfold.ir.errors import ExportError, InvalidModelError


class Net(nn.Module):
    """conv (bias; weights scaled so some lie outside [-1, 1]) -> linear (Laplacian weights, as trained ones are)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 32)
        self.out = nn.Linear(32, 5, bias=False)
        with torch.no_grad():
            self.conv.weight.mul_(6.0)
            self.fc.weight.copy_(torch.distributions.Laplace(0.0, 0.05).sample(self.fc.weight.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(torch.flatten(torch.relu(self.conv(x)), 1))))


EXAMPLE = torch.randn(1, 2, 6, 6)


def _graph(front: str, tools):
    torch.manual_seed(0)
    module = Net().eval()
    return tf.capture(module, EXAMPLE) if front == "fx" else tf.load(tools.export_to_onnx(module, EXAMPLE))


def _layer_weights(graph) -> list[np.ndarray]:
    return [array for layer in graph.layers() if layer.kind in ("conv", "linear")
            for array in (layer.spec.weight, layer.spec.bias) if array is not None]


def _saved(tools, passes: str = "kmeans(clusters=64), huffman", name: str = "model.tfz") -> str:
    coded, _ = tf.compress(_graph("onnx", tools), passes)
    path = str(tools.tmp_path / name)
    coded.save(path)
    return path


@pytest.mark.parametrize("front", ["fx", "onnx"])
@pytest.mark.parametrize("passes", ["kmeans(clusters=64), huffman", "kmeans(clusters=16, shared=false)"])
def test_decode_of_encode_is_bit_identical(front, passes, tools):
    coded, _ = tf.compress(_graph(front, tools), passes)
    path = tools.tmp_path / "model.tfz"
    coded.save(str(path))
    loaded = tf.load(str(path))
    assert type(loaded).__name__ == "OnnxGraph" and loaded.coding.huffman == ("huffman" in passes)
    before, after = _layer_weights(coded), _layer_weights(loaded)
    assert len(before) == len(after) == 5
    for a, b in zip(before, after):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)  # bit-identical, not merely close
    feed = coded.random_inputs(7)
    want, got = coded.run(feed)[coded.output_names[0]], loaded.run(feed)[loaded.output_names[0]]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6
    # the coding survives loading: saving the loaded graph again writes the same bytes
    again = tools.tmp_path / "again.tfz"
    loaded.save(str(again))
    assert again.read_bytes() == path.read_bytes()


def test_huffman_file_is_smaller_than_fixed_width_on_skewed_weights(tools):
    fixed = os.path.getsize(_saved(tools, "kmeans", "fixed.tfz"))
    coded = os.path.getsize(_saved(tools, "kmeans, huffman", "coded.tfz"))
    onnx_bytes = os.path.getsize(tools.export_to_onnx(Net().eval(), EXAMPLE, "fp32.onnx"))
    assert coded < 0.8 * fixed < 0.8 * onnx_bytes / 3


def test_saving_without_kmeans_is_refused(tools):
    path = tools.tmp_path / "model.tfz"
    for graph in (_graph("fx", tools), _graph("onnx", tools)):
        with pytest.raises(ExportError, match="run the kmeans pass first"):
            graph.save(str(path))
        assert not path.exists()


def test_weights_rewritten_after_kmeans_are_named(tools):
    module = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        module[1].running_var.fill_(4.0)
    coded, _ = tf.compress(tf.capture(module, EXAMPLE), "kmeans, fold_bn")  # the fold rescales the conv
    path = tools.tmp_path / "model.tfz"
    with pytest.raises(ExportError, match="layer\\(s\\) 0 changed after the kmeans pass"):
        coded.save(str(path))
    assert not path.exists()


def test_the_input_file_is_never_overwritten(tools):
    path = _saved(tools)
    content = open(path, "rb").read()
    with pytest.raises(ExportError, match="refusing to write over the input file"):
        tf.load(path).save(path)
    assert open(path, "rb").read() == content


def _damaged(path: str) -> dict[str, bytes]:
    data = open(path, "rb").read()
    middle = len(data) // 2
    flipped = data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1:]
    return {"truncated": data[:middle], "flipped byte": flipped, "not tfz": b"PK\x03\x04" + bytes(100),
            "empty": b"", "header only": data[:16]}


def test_corrupt_or_truncated_files_give_a_clear_error(tools, capsys):
    path = _saved(tools)
    for kind, data in _damaged(path).items():
        bad = tools.tmp_path / f"{kind.replace(' ', '_')}.tfz"
        bad.write_bytes(data)
        with pytest.raises(InvalidModelError, match=str(bad)) as error:
            tf.load(str(bad))
        message = str(error.value).replace(str(bad), "")
        assert ("truncated" in message) == (kind in ("truncated", "header only")), kind
        # the command stops with that message and writes nothing
        out = tools.tmp_path / "out.onnx"
        assert main(["compress", str(bad), "-p", "kmeans", "-o", str(out), "-q"]) == 2
        assert str(bad) in capsys.readouterr().err and not out.exists()


def test_damage_behind_a_valid_checksum_is_caught_too(tools):
    """Bytes altered (and the checksum recomputed): always a decoded model or InvalidModelError, never a traceback."""
    data = bytearray(open(_saved(tools), "rb").read())
    rng = np.random.default_rng(0)
    bad = tools.tmp_path / "bad.tfz"
    outcomes = set()
    for position in rng.integers(16, len(data) - 4, 150):
        damaged = bytearray(data)
        damaged[position] ^= int(rng.integers(1, 256))
        damaged[-4:] = struct.pack("<I", zlib.crc32(bytes(damaged[:-4])))
        bad.write_bytes(bytes(damaged))
        try:
            tf.load(str(bad))
            outcomes.add("loaded")
        except InvalidModelError as e:
            assert str(bad) in str(e)
            outcomes.add("refused")
    assert "refused" in outcomes


def test_digits_cnn_end_to_end(tmp_path):
    from tensorfold.examples import digits
    from tensorfold.runtime.evaluate import classification_accuracy

    images, labels = digits.test_data()
    graph = tf.capture(digits.model(verbose=False), torch.from_numpy(images[:1]))
    coded, _ = tf.compress(graph, "fold_bn, kmeans, huffman")
    fixed, _ = tf.compress(graph, "fold_bn, kmeans")
    paths = {"coded": tmp_path / "digits.tfz", "fixed": tmp_path / "digits_fixed.tfz", "fp32": tmp_path / "digits.onnx"}
    coded.save(str(paths["coded"]))
    fixed.save(str(paths["fixed"]))
    graph.save(str(paths["fp32"]))
    size = {name: os.path.getsize(p) for name, p in paths.items()}
    assert size["coded"] < 0.8 * size["fixed"] and size["fixed"] < size["fp32"] / 3.5

    loaded = tf.load(str(paths["coded"]))
    want = coded.run({coded.inputs[0].name: images})[coded.output_names[0]]
    got = loaded.run({loaded.inputs[0].name: images})[loaded.output_names[0]]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6
    accuracy = classification_accuracy(graph, images, labels)
    assert classification_accuracy(loaded, images, labels) >= accuracy - 0.01


def test_compress_command_writes_tfz_and_reports_sizes(tmp_path):
    out, report_path = tmp_path / "digits.tfz", tmp_path / "report.json"
    assert main(["compress", "digits", "-p", "fold_bn, kmeans, huffman", "-o", str(out), "--report",
                 str(report_path), "-q"]) == 0
    extra = json.loads(report_path.read_text())["extra"]
    sizes = extra["file bytes"]
    assert sizes[".tfz huffman"] == out.stat().st_size
    assert sizes[".tfz huffman"] < sizes[".tfz fixed-width"] < sizes["float32 .onnx"] / 3.5
    assert extra["test accuracy after"] >= extra["test accuracy before"] - 0.01
    assert tf.load(str(out)).coding.huffman
