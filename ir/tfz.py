"""The `.tfz` compressed model file: an ONNX graph whose k-means-coded weights are stored as
codebook indices (fixed-width or canonical Huffman) and 16-bit uniform values.

Layout, little-endian (README, "kmeans, huffman and the .tfz file"):

    header     b"TFZ\\0" | u16 version (1) | u16 flags (bit 0: indices Huffman-coded) | u64 file size
    structure  u64 n | n bytes: zlib(ONNX ModelProto), coded initializers emptied (name, dims, type kept)
    codebooks  u32 count | per codebook: u32 k | f32[k] (ascending)
    tensors    u32 count | per coded initializer:
                 u16 n | utf-8 name[n] | u8 kind (0: 16-bit uniform, 1: clustered) | u8 ndim | u32 dims[ndim]
                 | f32 min | f32 scale                       (kind 0: every value; kind 1: the outliers)
                 kind 0: u16 q[size]                          value = min + q * scale
                 kind 1: u32 codebook | u32 m | u32 outlier positions[m] (flat, ascending) | u16 q[m]
                         | u8 code lengths[k] (canonical code per codebook entry; 0 = unused)
                         | u64 bits | bitstream[ceil(bits / 8)]   (the other size - m indices, C order, MSB first)
    trailer    u32 CRC-32 of every byte before it
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import struct
import zlib
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from . import huffman_code
from .coding import CodedTensor, Uniform16, WeightCoding, digest
from .errors import CaptureError, ExportError, InvalidModelError

if TYPE_CHECKING:
    from .graph import Graph
    from .onnx_graph import OnnxGraph

MAGIC = b"TFZ\0"
VERSION = 1
HUFFMAN_FLAG = 1
_HEADER = struct.Struct("<4sHHQ")
_UNIFORM, _CLUSTERED = 0, 1


# ---- writing -----------------------------------------------------------------------------------
def encode(model: onnx.ModelProto, coding: WeightCoding, source: str) -> bytes:
    """The .tfz bytes of `model`, whose weights `coding` describes."""
    structure = copy.deepcopy(model)
    records, matched = [], set()
    for tensor in structure.graph.initializer:
        if tensor.data_type != TensorProto.FLOAT:
            continue
        found = coding.find(numpy_helper.to_array(tensor))
        if found is None:
            continue  # not coded (a batch norm's statistics, say): kept as float32 in the structure
        key, record = found
        matched.add(key)
        records.append((tensor.name, record))
        for name in ("raw_data", "float_data", "external_data", "data_location"):
            tensor.ClearField(name)
    stale = sorted({record.layer for key, record in coding.tensors.items() if key not in matched})
    if stale:
        raise ExportError(f"{source}: the weights of layer(s) {', '.join(stale)} changed after the kmeans pass "
                          "(a later pass rewrote them), so they are no longer on the codebook; run kmeans after "
                          "every pass that changes weights (only huffman may follow it)")
    body = bytearray()
    packed = zlib.compress(structure.SerializeToString(), 9)
    body += struct.pack("<Q", len(packed)) + packed
    body += struct.pack("<I", len(coding.codebooks))
    for codebook in coding.codebooks:
        body += struct.pack("<I", len(codebook)) + np.asarray(codebook, "<f4").tobytes()
    body += struct.pack("<I", len(records))
    for name, record in records:
        body += _tensor_bytes(name, record, coding)
    flags = HUFFMAN_FLAG if coding.huffman else 0
    header = _HEADER.pack(MAGIC, VERSION, flags, _HEADER.size + len(body) + 4)
    return header + bytes(body) + struct.pack("<I", zlib.crc32(header + body))


def _tensor_bytes(name: str, record: CodedTensor, coding: WeightCoding) -> bytes:
    encoded = name.encode()
    kind = _UNIFORM if record.codebook is None else _CLUSTERED
    out = bytearray(struct.pack("<H", len(encoded)) + encoded + struct.pack("<BB", kind, len(record.shape)))
    out += np.asarray(record.shape, "<u4").tobytes()
    out += struct.pack("<ff", record.uniform.minimum, record.uniform.scale)
    if kind == _UNIFORM:
        return bytes(out + np.asarray(record.uniform.q, "<u2").tobytes())
    positions = np.flatnonzero(record.outlier.reshape(-1))
    out += struct.pack("<II", record.codebook, len(positions)) + positions.astype("<u4").tobytes()
    out += record.uniform.q.reshape(-1)[positions].astype("<u2").tobytes()
    symbols, indices = len(coding.codebooks[record.codebook]), record.inlier_indices
    if coding.huffman:
        lengths = huffman_code.code_lengths(np.bincount(indices, minlength=symbols))
    else:
        lengths = huffman_code.fixed_lengths(symbols)
    if lengths.max(initial=0) > huffman_code.MAX_CODE_LENGTH:
        raise ExportError(f"layer {record.layer!r}: a Huffman code is longer than {huffman_code.MAX_CODE_LENGTH} bits")
    stream, bits = huffman_code.encode(indices, lengths)
    return bytes(out + lengths.astype(np.uint8).tobytes() + struct.pack("<Q", bits) + stream)


def save_tfz(graph: "Graph", path: str) -> None:
    """Write `graph` (an FxGraph is exported to ONNX first) as a .tfz file; nothing is written on error."""
    path = os.fspath(path)
    if graph.coding is None:
        raise ExportError(f"cannot write {path!r}: a .tfz file stores k-means-coded weights and {graph.source} has "
                          "none; run the kmeans pass first (e.g. -p \"kmeans, huffman\"), or save as .onnx")
    if os.path.exists(path) and os.path.exists(graph.source) and os.path.samefile(path, graph.source):
        raise ExportError(f"refusing to write over the input file {graph.source!r}; choose another output path")
    blob = encode(graph.to_onnx(), graph.coding, graph.source)
    partial = f"{path}.partial"
    try:
        with open(partial, "wb") as f:
            f.write(blob)
        os.replace(partial, path)  # whole or not at all
    except OSError as e:
        if os.path.exists(partial):
            os.remove(partial)
        raise ExportError(f"{graph.source}: writing {path!r} failed: {e}") from e


def sizes(graph: "Graph") -> dict[str, int]:
    """Bytes of the graph as float32 ONNX, as .tfz with fixed-width indices, and with Huffman-coded indices."""
    model = graph.to_onnx()
    return {"float32 .onnx": len(model.SerializeToString()),
            ".tfz fixed-width": len(encode(model, dataclasses.replace(graph.coding, huffman=False), graph.source)),
            ".tfz huffman": len(encode(model, dataclasses.replace(graph.coding, huffman=True), graph.source))}


# ---- reading -----------------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes, where: str):
        self.data, self.where, self.offset = data, where, 0

    def bytes(self, count: int, what: str) -> bytes:
        if count < 0 or self.offset + count > len(self.data):
            raise InvalidModelError(f"{self.where}: corrupt .tfz file: {what} runs past the end of the data")
        chunk = self.data[self.offset:self.offset + count]
        self.offset += count
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.bytes(struct.calcsize(fmt), what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.bytes(count * np.dtype(dtype).itemsize, what), dtype=dtype).copy()


def decode(data: bytes, where: str) -> tuple[onnx.ModelProto, WeightCoding]:
    """The ONNX model (weights filled in) and the coding a .tfz file holds; InvalidModelError naming `where`."""
    if not data.startswith(MAGIC):
        raise InvalidModelError(f"{where}: not a .tfz file (it does not start with the .tfz magic bytes)")
    if len(data) < _HEADER.size + 4:
        raise InvalidModelError(f"{where}: corrupt .tfz file: truncated ({len(data)} bytes, less than a header)")
    _, version, flags, size = _HEADER.unpack_from(data)
    if version != VERSION:
        raise InvalidModelError(f"{where}: .tfz version {version}; this tensorfold reads version {VERSION}")
    if len(data) != size:
        state = "truncated" if len(data) < size else "has trailing bytes"
        raise InvalidModelError(f"{where}: corrupt .tfz file: {state} ({len(data)} bytes, its header says {size})")
    if zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise InvalidModelError(f"{where}: corrupt .tfz file: checksum mismatch (the bytes were altered)")
    try:
        return _decode_body(_Reader(data[_HEADER.size:-4], where), bool(flags & HUFFMAN_FLAG), where)
    except (zlib.error, DecodeError, ValueError, OverflowError, struct.error) as e:  # CodeError is a ValueError
        raise InvalidModelError(f"{where}: corrupt .tfz file: {type(e).__name__}: {e}") from e


def _decode_body(reader: _Reader, huffman: bool, where: str) -> tuple[onnx.ModelProto, WeightCoding]:
    (packed_size,) = reader.unpack("<Q", "the structure's size")
    model = onnx.ModelProto.FromString(zlib.decompress(reader.bytes(packed_size, "the structure")))
    codebooks = []
    for i in range(reader.unpack("<I", "the codebook count")[0]):
        (clusters,) = reader.unpack("<I", f"codebook {i}'s size")
        codebooks.append(reader.array("<f4", clusters, f"codebook {i}").astype(np.float32))
    codebooks = tuple(codebooks)
    initializers = {t.name: t for t in model.graph.initializer}
    tensors = {}
    for _ in range(reader.unpack("<I", "the tensor count")[0]):
        name, record = _read_tensor(reader, codebooks)
        tensor = initializers.get(name)
        if tensor is None or tensor.data_type != TensorProto.FLOAT or tuple(tensor.dims) != record.shape:
            raise InvalidModelError(f"{where}: corrupt .tfz file: coded tensor {name!r} {record.shape} has no "
                                    "matching empty float initializer in the structure")
        values = record.values(codebooks)
        tensor.raw_data = np.ascontiguousarray(values, "<f4").tobytes()
        tensors[digest(values)] = record
    if reader.offset != len(reader.data):
        raise InvalidModelError(f"{where}: corrupt .tfz file: {len(reader.data) - reader.offset} bytes left over")
    empty = [t.name for t in model.graph.initializer if math.prod(t.dims) and t.data_type == TensorProto.FLOAT
             and not (t.raw_data or t.float_data or t.external_data)]
    if empty:
        raise InvalidModelError(f"{where}: corrupt .tfz file: no values stored for initializer(s) {', '.join(empty)}")
    return model, WeightCoding(codebooks, tensors, huffman)


def _read_tensor(reader: _Reader, codebooks: tuple[np.ndarray, ...]) -> tuple[str, CodedTensor]:
    (name_size,) = reader.unpack("<H", "a tensor name's size")
    name = reader.bytes(name_size, "a tensor name").decode()
    kind, ndim = reader.unpack("<BB", f"tensor {name!r}'s kind")
    shape = tuple(int(d) for d in reader.array("<u4", ndim, f"tensor {name!r}'s dims"))
    size = math.prod(shape)
    minimum, scale = (np.float32(v) for v in reader.unpack("<ff", f"tensor {name!r}'s min and scale"))
    if kind == _UNIFORM:
        q = reader.array("<u2", size, f"tensor {name!r}'s values").astype(np.uint16).reshape(shape)
        return name, CodedTensor(name, Uniform16(q, minimum, scale))
    if kind != _CLUSTERED:
        raise ValueError(f"tensor {name!r} has unknown kind {kind}")
    codebook, outliers = reader.unpack("<II", f"tensor {name!r}'s codebook")
    if codebook >= len(codebooks) or outliers > size:
        raise ValueError(f"tensor {name!r} names codebook {codebook} of {len(codebooks)}, "
                         f"and {outliers} outliers of {size} values")
    positions = reader.array("<u4", outliers, f"tensor {name!r}'s outlier positions").astype(np.int64)
    outlier_q = reader.array("<u2", outliers, f"tensor {name!r}'s outliers")
    lengths = reader.array("u1", len(codebooks[codebook]), f"tensor {name!r}'s code table").astype(np.int64)
    (bits,) = reader.unpack("<Q", f"tensor {name!r}'s bit count")
    stream = reader.bytes((bits + 7) // 8, f"tensor {name!r}'s bitstream")
    if outliers and (positions[-1] >= size or np.any(np.diff(positions) <= 0)):
        raise ValueError(f"tensor {name!r}'s outlier positions are not ascending positions inside it")
    if size - outliers > bits:  # every index takes a bit at least; checked before allocating `size`
        raise ValueError(f"tensor {name!r}: {bits} bits cannot hold {size - outliers} indices")
    outlier = np.zeros(size, dtype=bool)
    outlier[positions] = True
    q = np.zeros(size, dtype=np.uint16)
    q[positions] = outlier_q
    indices = np.zeros(size, dtype=np.uint16)
    indices[~outlier] = huffman_code.decode(stream, bits, lengths, size - outliers)
    record = CodedTensor(name, Uniform16(q.reshape(shape), minimum, scale), codebook,
                         indices.reshape(shape), outlier.reshape(shape))
    return name, record


def load_tfz(path: str, input_shapes: Mapping[str, Sequence[int]] | None = None) -> "OnnxGraph":
    """A .tfz file -> a runnable OnnxGraph (its coding kept, so it can be saved as .tfz again)."""
    from .onnx_graph import OnnxGraph

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CaptureError(f"{path}: cannot read: {e}") from e
    model, coding = decode(data, path)
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001
        raise InvalidModelError(f"{path}: the decoded ONNX model is invalid (onnx.checker): {e}") from e
    graph = OnnxGraph(model, path, input_shapes)
    graph.coding = coding
    return graph
