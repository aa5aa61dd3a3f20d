"""What `ron` can convert: chains of layer -> [batch norm] -> activation / max-pool / flatten -> next layer.

A block is one conv or Linear layer and the ops between its output and the next layer's input. The
walk reads op names through the graph view (both front ends), then checks each op's meaning on one
calibration batch (a ReLU must equal max(x, 0), a pool must be a non-overlapping k-window max, a
flatten must keep every sample's values in order), so a spelling it misreads cannot slip through.
A run is a chain of blocks, each reading the previous one's output alone: the reduced network replaces
a run, or a tail of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.nn import functional as F

from tensorfold.ir.graph import GRAPH_OUTPUT, Graph, Layer
from tensorfold.ir.specs import Conv, Linear

ACTIVATIONS = {"relu": "relu", "leakyrelu": "leaky_relu"}
POOLS = {"maxpool", "maxpool1d", "maxpool2d"}
RESHAPES = {"flatten", "reshape", "view"}
IDENTITIES = {"identity", "dropout", "contiguous"}
SHAPE_READERS = {"shape", "size"}  # read a tensor's shape only
HANDLED = "ReLU, LeakyReLU, a max-pool with kernel = stride, a flatten"


def _normalized(op: str) -> str:
    return op.lower().replace("_", "")


@dataclass
class Step:
    kind: str                  # "batchnorm", "activation", "pool", "reshape", "identity"
    op: str                    # as the graph spells it
    input: str
    output: str
    bn: Layer | None = None
    function: str = ""         # activation: "relu" | "leaky_relu"
    alpha: float = 0.0         # leaky_relu slope, read from data
    window: tuple[int, ...] = ()


@dataclass
class Block:
    layer: Layer
    steps: list[Step] = field(default_factory=list)
    output: str = ""               # the tensor after the steps
    next: Layer | None = None      # the conv / Linear that alone reads `output`
    stop: str = ""                 # why the walk stopped, when `next` is None
    unusable: str | None = None    # why the layer cannot enter a reduced network at all
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-sample shapes, from data

    @property
    def bn(self) -> Layer | None:
        return self.steps[0].bn if self.steps and self.steps[0].kind == "batchnorm" else None

    @property
    def affine_output(self) -> str:
        """The layer's output after its batch norm (what a closing layer of the reduced network gives)."""
        return self.bn.output if self.bn is not None else self.layer.output

    @property
    def width(self) -> int:
        return math.prod(self.shapes[self.output])

    @property
    def pool(self) -> Step | None:
        return next((s for s in self.steps if s.kind == "pool"), None)


def dense_entries(layer: Layer) -> int:
    return math.prod(layer.in_shape[1:]) * math.prod(layer.out_shape[1:])


def layer_reason(layer: Layer, dense_limit: int) -> str | None:
    """Why `layer` cannot be part of a reduced network (None if it can)."""
    if layer.spec is None or layer.unusable:
        return layer.unusable or "unusable"
    if layer.facts.get("transA"):
        return "a Gemm that reads its input transposed"
    if isinstance(layer.spec, Linear) and len(layer.in_shape) != 2:
        return f"a Linear over a {len(layer.in_shape)}-D input (acts on the last axis of each sample, not all of it)"
    if isinstance(layer.spec, Conv) and dense_entries(layer) > dense_limit:
        return (f"input too large for a dense matrix: {math.prod(layer.out_shape[1:])} x {math.prod(layer.in_shape[1:])}"
                f" = {dense_entries(layer):,} entries exceeds dense_limit={dense_limit:,}")
    if not isinstance(layer.spec, (Conv, Linear)):
        return f"a {type(layer.spec).__name__} layer"
    return None


def blocks_of(graph: Graph, dense_limit: int) -> list[Block]:
    """One block per conv / Linear layer, in graph order, walked by op names (not yet checked on data)."""
    layers = graph.layers()
    readers: dict[str, list[Layer]] = {}
    for layer in layers:
        readers.setdefault(layer.input, []).append(layer)
    return [_walk(graph, layer, readers, layer_reason(layer, dense_limit))
            for layer in layers if layer.kind in ("conv", "linear")]


def _walk(graph: Graph, layer: Layer, readers: dict[str, list[Layer]], unusable: str | None) -> Block:
    block = Block(layer, unusable=unusable)
    tensor = layer.output
    while True:
        users = [(op, out) for op, out in graph.consumer_outputs(tensor) if _normalized(op) not in SHAPE_READERS]
        block.output = tensor
        if not users:
            block.stop = "its output is read by no op"
            return block
        if len(users) > 1 or users[0][0] == GRAPH_OUTPUT:
            where = "a graph output" if any(op == GRAPH_OUTPUT for op, _ in users) else f"read by {len(users)} ops"
            block.stop = f"its output is {where} (a branch, a residual or the end)"
            return block
        op, out = users[0]
        reader = (readers.get(tensor) or [None])[0]
        if reader is not None and reader.kind in ("conv", "linear"):
            block.next = reader
            return block
        name = _normalized(op)
        if reader is not None and reader.kind == "batchnorm":
            if block.steps or reader.spec is None or reader.unusable:
                block.stop = (f"batch norm {reader.name!r} " + ("after an activation or pool" if block.steps
                              else f"is unusable: {reader.unusable}"))
                return block
            block.steps.append(Step("batchnorm", op, tensor, reader.output, bn=reader))
            tensor = reader.output
            continue
        if name in ACTIVATIONS:
            step = Step("activation", op, tensor, out, function=ACTIVATIONS[name])
        elif name in POOLS:
            if block.pool is not None:
                block.stop = "a second max-pool after one layer"
                return block
            step = Step("pool", op, tensor, out)
        elif name in RESHAPES:
            step = Step("reshape", op, tensor, out)
        elif name in IDENTITIES:
            step = Step("identity", op, tensor, out)
        else:
            block.stop = f"unsupported op {op} reads its output (handled: {HANDLED})"
            return block
        block.steps.append(step)
        tensor = out


def check_on_data(graph: Graph, blocks: list[Block], feed: dict[str, np.ndarray]) -> None:
    """Record every tensor of the walks on one batch: per-sample shapes, and each op's meaning checked.

    A step that does not do what its name says cuts its block's walk there (the block then closes a run).
    """
    tensors = {t for b in blocks for t in [b.layer.input, b.layer.output]
               + [x for s in b.steps for x in (s.input, s.output)]}
    recorded = graph.run(feed, record=sorted(t for t in tensors if t not in feed))
    values = {**recorded, **{k: v for k, v in feed.items() if k in tensors}}
    for block in blocks:
        block.shapes = {t: tuple(values[t].shape[1:]) for t in
                        [block.layer.input, block.layer.output] + [x for s in block.steps for x in (s.input, s.output)]}
        for i, step in enumerate(block.steps):
            reason = _check_step(step, values[step.input], values[step.output])
            if reason is not None:
                block.steps, block.next, block.output = block.steps[:i], None, step.input
                block.stop = f"{step.op} after it is not what ron handles: {reason}"
                break


def _check_step(step: Step, x: np.ndarray, y: np.ndarray) -> str | None:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(float(np.max(np.abs(x))) if x.size else 0.0, 1e-30)
    if step.kind == "batchnorm":
        return None
    if step.kind in ("reshape", "identity"):
        same = y.shape[0] == x.shape[0] and y.size == x.size and np.array_equal(y.reshape(len(y), -1),
                                                                                   x.reshape(len(x), -1))
        return None if same and (step.kind == "reshape" or x.shape == y.shape) else "it reorders or changes values"
    if step.kind == "activation":
        if step.function == "leaky_relu":
            negative = x < 0
            step.alpha = float(np.median(y[negative] / x[negative])) if negative.any() else 0.01
        expected = np.where(x > 0, x, step.alpha * x if step.function == "leaky_relu" else 0.0)
        return None if x.shape == y.shape and np.allclose(y, expected, rtol=1e-5, atol=1e-6 * scale) \
            else f"it is not {step.function} on calibration data"
    # pool: a max over non-overlapping windows, kernel = stride, no padding, floor
    dims = x.ndim - 2
    if dims not in (1, 2) or y.ndim != x.ndim or y.shape[:2] != x.shape[:2] or 0 in y.shape[2:]:
        return f"a pool from {x.shape[1:]} to {y.shape[1:]} (1-D or 2-D, channels kept)"
    window = tuple(a // b for a, b in zip(x.shape[2:], y.shape[2:]))
    if any(w < 1 or a // w != b for a, b, w in zip(x.shape[2:], y.shape[2:], window)):
        return f"a pool from {x.shape[2:]} to {y.shape[2:]} is not a k-window one"
    pool = F.max_pool1d if dims == 1 else F.max_pool2d
    expected = pool(torch.from_numpy(x), window, stride=window).numpy()
    if not np.allclose(y, expected, rtol=1e-6, atol=1e-6 * scale):
        return f"not a {'x'.join(map(str, window))} max-pool with stride = kernel and no padding"
    step.window = window
    return None


def runs_of(blocks: list[Block]) -> list[list[Block]]:
    """Maximal chains of usable blocks, each block's output read by the next block's layer alone."""
    by_layer = {b.layer.name: b for b in blocks}
    successors = {b.layer.name: by_layer.get(b.next.name) if b.next is not None else None for b in blocks}
    has_predecessor = {s.layer.name for s in successors.values() if s is not None}
    runs = []
    for block in blocks:
        if block.unusable or (block.layer.name in has_predecessor and _usable_predecessor(block, blocks)):
            continue
        run = [block]
        while (following := successors[run[-1].layer.name]) is not None and not following.unusable:
            run.append(following)
        runs.append(run)
    return runs


def _usable_predecessor(block: Block, blocks: list[Block]) -> bool:
    return any(b.next is not None and b.next.name == block.layer.name and not b.unusable for b in blocks)


def without_bias(spec: Conv | Linear) -> Conv | Linear:
    return replace(spec, bias=None)
