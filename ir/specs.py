"""Backend-neutral layer specs: what a pass reads from a graph and what it emits.

A spec holds weights as numpy arrays and the attributes needed to run the layer.
The FX adapter materializes specs as `nn.Module`s (`ir.torch_modules`), the ONNX
adapter as standard ONNX nodes (`ir.onnx_nodes`). Shapes and costs are computed
here, from the spec alone, so both adapters count params and FLOPs the same way.

FLOPs count a multiply-add as 2 operations (bias additions are ignored).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence, Union

import numpy as np

Padding = tuple[tuple[int, int], ...]  # per spatial dim: (begin, end)


@dataclass
class Conv:
    """N-d convolution (N = 1 or 2). weight: (T, S/groups, *kernel)."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    stride: tuple[int, ...] = (1, 1)
    padding: Padding = ((0, 0), (0, 0))
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1

    kind = "conv"

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1] * self.groups)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def spatial_dims(self) -> int:
        return self.weight.ndim - 2

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels and self.weight.shape[1] == 1

    @property
    def has_padding(self) -> bool:
        return any(b or e for b, e in self.padding)

    def out_shape(self, in_shape: Sequence[int]) -> tuple[int, ...]:
        spatial = []
        for i, size in enumerate(in_shape[2:]):
            begin, end = self.padding[i]
            reach = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            spatial.append((size + begin + end - reach) // self.stride[i] + 1)
        return (in_shape[0], self.out_channels, *spatial)


@dataclass
class ConvTranspose:
    """Transposed convolution. weight: (S, T/groups, *kernel), symmetric padding."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    output_padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1

    kind = "conv_transpose"

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[1] * self.groups)

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    def out_shape(self, in_shape: Sequence[int]) -> tuple[int, ...]:
        spatial = [
            (size - 1) * self.stride[i] - 2 * self.padding[i]
            + self.dilation[i] * (self.kernel_size[i] - 1) + self.output_padding[i] + 1
            for i, size in enumerate(in_shape[2:])
        ]
        return (in_shape[0], self.out_channels, *spatial)


@dataclass
class Linear:
    """y = x @ weight.T + bias over the last axis. weight: (out, in)."""

    weight: np.ndarray
    bias: np.ndarray | None = None

    kind = "linear"

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def out_shape(self, in_shape: Sequence[int]) -> tuple[int, ...]:
        return (*in_shape[:-1], self.out_features)


@dataclass
class BatchNorm:
    """Inference-mode batch norm over axis 1."""

    mean: np.ndarray
    var: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    eps: float = 1e-5

    kind = "batchnorm"

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0])

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """(s, t) with BN(x) = s*x + t per channel, computed in float64."""
        scale = self.gamma.astype(np.float64) / np.sqrt(self.var.astype(np.float64) + self.eps)
        shift = self.beta.astype(np.float64) - scale * self.mean.astype(np.float64)
        return scale, shift

    def out_shape(self, in_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(in_shape)


@dataclass
class TTLinear:
    """Tensor-Train matrix layer (docs/methods.md#tt).

    cores[k]: (r_{k-1}, out_modes[k], in_modes[k], r_k), r_0 = r_d = 1.
    y = reshape(x, (..., *in_modes)) contracted core by core, reshaped to (..., prod(out_modes)) + bias.
    """

    cores: list[np.ndarray]
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    bias: np.ndarray | None = None

    kind = "tt_linear"

    @property
    def in_features(self) -> int:
        return int(np.prod(self.in_modes))

    @property
    def out_features(self) -> int:
        return int(np.prod(self.out_modes))

    def out_shape(self, in_shape: Sequence[int]) -> tuple[int, ...]:
        return (*in_shape[:-1], self.out_features)


@dataclass
class ParallelSum:
    """Branches read the same input and their outputs are summed, plus one bias (docs/methods.md#lowrank_sparse).

    channels[i]: the input channel indices branch i reads (a gather along `axis`), None = all.
    `axis` is 1 for convs (NC...) and -1 for linears (features last). Every branch must end in a
    Conv or Linear: adapters put the bias on the first branch's last layer (exact: it is added
    after that layer), so no extra Add of a constant appears in the graph.
    """

    branches: list[list["Spec"]]
    channels: list[np.ndarray | None]
    bias: np.ndarray | None = None
    axis: int = 1

    kind = "parallel_sum"

    def branch_in_shape(self, i: int, in_shape: Sequence[int]) -> tuple[int, ...]:
        shape = list(in_shape)
        if self.channels[i] is not None:
            shape[self.axis] = len(self.channels[i])
        return tuple(shape)

    def out_shape(self, in_shape: Sequence[int]) -> tuple[int, ...]:
        return chain_out_shape(self.branches[0], self.branch_in_shape(0, in_shape))

    def biased_branches(self) -> list[list["Spec"]]:
        """The branches with `bias` added to the first branch's last layer (how adapters emit it)."""
        if self.bias is None:
            return [list(b) for b in self.branches]
        last = self.branches[0][-1]
        if not isinstance(last, (Conv, Linear)):
            raise TypeError(f"ParallelSum: the first branch must end in a Conv or Linear, not {type(last).__name__}")
        bias = self.bias if last.bias is None else last.bias + self.bias
        return [self.branches[0][:-1] + [replace(last, bias=np.asarray(bias, np.float32))]] + \
            [list(b) for b in self.branches[1:]]


@dataclass
class Activation:
    """An elementwise activation: `function` "relu", or "leaky_relu" with slope `alpha` for x < 0."""

    function: str = "relu"
    alpha: float = 0.01

    kind = "activation"
    FUNCTIONS = ("relu", "leaky_relu")

    def __post_init__(self) -> None:
        if self.function not in self.FUNCTIONS:
            raise ValueError(f"Activation: function {self.function!r} is not one of {self.FUNCTIONS}")

    def out_shape(self, in_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(in_shape)


@dataclass
class GroupMax:
    """(..., groups * P) -> (..., P): the elementwise max of the `groups` contiguous blocks of the last axis.

    A max-pool over windows of `groups` values, with the window members laid out block by block
    (block m holds member m of every window): what a pool becomes once only some windows are kept.
    """

    groups: int

    kind = "group_max"

    def out_shape(self, in_shape: Sequence[int]) -> tuple[int, ...]:
        if in_shape[-1] % self.groups:
            raise ValueError(f"GroupMax: last axis {in_shape[-1]} is not a multiple of {self.groups} groups")
        return (*in_shape[:-1], in_shape[-1] // self.groups)


@dataclass
class Reshape:
    """(N, ...) -> (N, *shape): every sample's values in the same (C) order, in a new shape."""

    shape: tuple[int, ...]

    kind = "reshape"

    def out_shape(self, in_shape: Sequence[int]) -> tuple[int, ...]:
        if math.prod(in_shape[1:]) != math.prod(self.shape):
            raise ValueError(f"Reshape: {tuple(in_shape[1:])} and {self.shape} hold different numbers of values")
        return (in_shape[0], *self.shape)


Spec = Union[Conv, ConvTranspose, Linear, BatchNorm, TTLinear, ParallelSum, Activation, GroupMax, Reshape]
PARAMETER_FREE = (Activation, GroupMax, Reshape)  # no weights; they move or compare values, no multiply-adds


@dataclass
class Cost:
    params: int = 0
    flops: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.params + other.params, self.flops + other.flops)


def _count(*arrays: np.ndarray | None) -> int:
    return int(sum(a.size for a in arrays if a is not None))


def tt_contraction_flops(spec: TTLinear, rows: int) -> int:
    """Multiply-adds of the einsum chain, contracting the first core first (docs/methods.md#tt)."""
    d = len(spec.cores)
    flops = 0
    # after contracting cores 0..k-1 the intermediate holds out_modes[:k], r_k, in_modes[k:]
    for k, core in enumerate(spec.cores):
        r_prev, m, n, r_next = core.shape
        done_out = int(np.prod(spec.out_modes[:k])) if k else 1
        rest_in = int(np.prod(spec.in_modes[k + 1:])) if k < d - 1 else 1
        flops += 2 * rows * done_out * rest_in * r_prev * n * m * r_next
    return flops


def cost(spec: Spec, in_shape: Sequence[int]) -> Cost:
    """Params and FLOPs of one layer on an input of `in_shape` (batch included)."""
    if isinstance(spec, Conv):
        out = spec.out_shape(in_shape)
        macs = math.prod(out) * (spec.weight.shape[1] * math.prod(spec.kernel_size))
        return Cost(_count(spec.weight, spec.bias), 2 * macs)
    if isinstance(spec, ConvTranspose):
        macs = math.prod(in_shape) * (spec.weight.shape[1] * math.prod(spec.kernel_size))
        return Cost(_count(spec.weight, spec.bias), 2 * macs)
    if isinstance(spec, Linear):
        rows = math.prod(in_shape[:-1])
        return Cost(_count(spec.weight, spec.bias), 2 * rows * spec.in_features * spec.out_features)
    if isinstance(spec, BatchNorm):
        return Cost(4 * spec.num_features, 2 * math.prod(in_shape))
    if isinstance(spec, TTLinear):
        rows = math.prod(in_shape[:-1])
        return Cost(_count(*spec.cores, spec.bias), tt_contraction_flops(spec, rows))
    if isinstance(spec, PARAMETER_FREE):  # compares and moves values: no multiply-adds (like a bias, not counted)
        return Cost()
    if isinstance(spec, ParallelSum):  # a gather moves data and adds no FLOPs; the sum's adds are ignored like biases
        total = Cost(_count(spec.bias), 0)
        for i, branch in enumerate(spec.branches):
            total = total + chain_cost(branch, spec.branch_in_shape(i, in_shape))
        return total
    raise TypeError(f"unknown layer spec {type(spec).__name__}")


def chain_cost(specs: Sequence[Spec], in_shape: Sequence[int]) -> Cost:
    total, shape = Cost(), tuple(in_shape)
    for spec in specs:
        total = total + cost(spec, shape)
        shape = spec.out_shape(shape)
    return total


def chain_out_shape(specs: Sequence[Spec], in_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(in_shape)
    for spec in specs:
        shape = spec.out_shape(shape)
    return shape


def arrays_of(spec: Spec) -> dict[str, np.ndarray]:
    """The named arrays of a spec (for finiteness checks and serialization)."""
    if isinstance(spec, BatchNorm):
        return {"mean": spec.mean, "var": spec.var, "gamma": spec.gamma, "beta": spec.beta}
    if isinstance(spec, PARAMETER_FREE):
        return {}
    if isinstance(spec, TTLinear):
        named = {f"core{i}": c for i, c in enumerate(spec.cores)}
    elif isinstance(spec, ParallelSum):
        named = {f"branch{i}.{j}.{name}": array for i, branch in enumerate(spec.branches)
                 for j, layer in enumerate(branch) for name, array in arrays_of(layer).items()}
        named.update({f"channels{i}": c for i, c in enumerate(spec.channels) if c is not None})
    else:
        named = {"weight": spec.weight}
    if spec.bias is not None:
        named["bias"] = spec.bias
    return named


def symmetric_padding(padding: Padding) -> tuple[int, ...] | None:
    """The per-dim padding if every dim pads the same at both ends, else None."""
    if all(b == e for b, e in padding):
        return tuple(b for b, _ in padding)
    return None

