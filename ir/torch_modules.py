"""Specs materialized as torch modules (the FX adapter's half of the spec contract)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .specs import (Activation, BatchNorm, Conv, ConvTranspose, GroupMax, Linear, ParallelSum, Reshape, Spec, TTLinear,
                    symmetric_padding)


def _param(array: np.ndarray) -> nn.Parameter:
    # a copy: arrays read from ONNX are read-only, and a parameter must not alias a spec's array
    return nn.Parameter(torch.from_numpy(np.array(array, dtype=np.float32, order="C")))


class TTLinearModule(nn.Module):
    """Tensor-Train matrix layer as an einsum chain (docs/methods.md#tt).

    Contracts one core at a time over x reshaped to (rows, *in_modes); every step is a
    plain `torch.einsum`, which torch.export, ONNX (Einsum) and TVM all accept.
    """

    def __init__(self, spec: TTLinear):
        super().__init__()
        self.in_modes = tuple(int(n) for n in spec.in_modes)
        self.out_modes = tuple(int(m) for m in spec.out_modes)
        self.cores = nn.ParameterList([_param(c) for c in spec.cores])
        self.bias = _param(spec.bias) if spec.bias is not None else None
        self.equations = tt_equations(len(self.cores))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        t = x.reshape(-1, *self.in_modes).unsqueeze(1)  # (rows, r0=1, n1..nd)
        for equation, core in zip(self.equations, self.cores):
            t = torch.einsum(equation, core, t)
        y = t.reshape(*lead, -1)
        return y + self.bias if self.bias is not None else y


class BatchNormModule(nn.Module):
    """Inference batch norm over axis 1 for inputs of any rank (reference evaluation only)."""

    def __init__(self, spec: BatchNorm):
        super().__init__()
        for name in ("mean", "var", "gamma", "beta"):
            self.register_buffer(name, torch.from_numpy(np.array(getattr(spec, name), dtype=np.float32)))
        self.eps = spec.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, self.gamma, self.beta, training=False, eps=self.eps)


class ChannelSelect(nn.Module):
    """x.index_select(axis, index): the channels a branch reads (ONNX: Gather), so the rest cost nothing."""

    def __init__(self, index: np.ndarray, axis: int):
        super().__init__()
        self.axis = int(axis)
        self.register_buffer("index", torch.from_numpy(np.asarray(index, dtype=np.int64).copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(self.axis, self.index)


class GroupMaxModule(nn.Module):
    """(..., groups * P) -> (..., P), the max over the `groups` contiguous blocks (ONNX: Gathers and a Max)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = int(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.max over a dim, not amax: TVM's Relax torch frontend converts max.dim and has no amax
        return torch.max(x.unflatten(-1, (self.groups, -1)), dim=-2).values


class ReshapeModule(nn.Module):
    """(N, ...) -> (N, *shape), the batch kept as -1 so any batch size runs."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(d) for d in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *self.shape)


class ParallelSumModule(nn.Module):
    """Branches over (a gather of) one input, summed; the bias sits in the first branch's last layer.

    The FX adapter does not call this module's forward: it inserts one node per leaf of every
    branch (so the convs inside stay layers) and the adds; `forward` serves `run_specs`.
    """

    def __init__(self, spec: ParallelSum):
        super().__init__()
        self.selects = nn.ModuleList(nn.Identity() if c is None else ChannelSelect(c, spec.axis) for c in spec.channels)
        self.branches = nn.ModuleList(chain_module(b) for b in spec.biased_branches())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for select, branch in zip(self.selects, self.branches):
            y = branch(select(x))
            total = y if total is None else total + y
        return total


def tt_equations(d: int) -> list[str]:
    """Einsum equations of the TT chain for d cores.

    State before core k: (b, m_1..m_{k}, r_k, n_{k+1}..n_d); core k: (r_k, m, n, r_{k+1}).
    The state keeps finished output modes first, then the running rank, then unread inputs.
    """
    letters = "abcdefghijklmnopqstuvwxyz"  # no 'r' reserved below
    equations = []
    out_letters = [f"{letters[i]}" for i in range(d)]          # m_k
    in_letters = [f"{letters[d + i]}" for i in range(d)]       # n_k
    for k in range(d):
        rank_in, rank_out = "R", "S"
        state = "Z" + "".join(out_letters[:k]) + rank_in + "".join(in_letters[k:])
        core = rank_in + out_letters[k] + in_letters[k] + rank_out
        new_state = "Z" + "".join(out_letters[: k + 1]) + rank_out + "".join(in_letters[k + 1:])
        equations.append(f"{core},{state}->{new_state}")
    return equations


def _conv_class(spatial_dims: int, transpose: bool = False):
    if transpose:
        return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}[spatial_dims]
    return {1: nn.Conv1d, 2: nn.Conv2d}[spatial_dims]


def _pad_module(padding) -> nn.Module:
    # F.pad takes the last dim first: (w_begin, w_end, h_begin, h_end)
    flat = [p for begin_end in reversed(padding) for p in begin_end]
    return nn.ConstantPad1d(tuple(flat), 0.0) if len(padding) == 1 else nn.ConstantPad2d(tuple(flat), 0.0)


def to_module(spec: Spec) -> nn.Module:
    """One spec as a standard torch module (asymmetric padding becomes ConstantPad + conv)."""
    if isinstance(spec, Conv):
        sym = symmetric_padding(spec.padding)
        conv = _conv_class(spec.spatial_dims)(
            spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride,
            padding=sym if sym is not None else 0, dilation=spec.dilation,
            groups=spec.groups, bias=spec.bias is not None)
        conv.weight = _param(spec.weight)
        if spec.bias is not None:
            conv.bias = _param(spec.bias)
        return conv if sym is not None else nn.Sequential(_pad_module(spec.padding), conv)
    if isinstance(spec, ConvTranspose):
        conv = _conv_class(len(spec.kernel_size), transpose=True)(
            spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride,
            padding=spec.padding, output_padding=spec.output_padding, dilation=spec.dilation,
            groups=spec.groups, bias=spec.bias is not None)
        conv.weight = _param(spec.weight)
        if spec.bias is not None:
            conv.bias = _param(spec.bias)
        return conv
    if isinstance(spec, Linear):
        linear = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias is not None)
        linear.weight = _param(spec.weight)
        if spec.bias is not None:
            linear.bias = _param(spec.bias)
        return linear
    if isinstance(spec, BatchNorm):
        return BatchNormModule(spec)
    if isinstance(spec, TTLinear):
        return TTLinearModule(spec)
    if isinstance(spec, ParallelSum):
        return ParallelSumModule(spec)
    if isinstance(spec, Activation):
        return nn.ReLU() if spec.function == "relu" else nn.LeakyReLU(float(spec.alpha))
    if isinstance(spec, GroupMax):
        return GroupMaxModule(spec.groups)
    if isinstance(spec, Reshape):
        return ReshapeModule(spec.shape)
    raise TypeError(f"unknown layer spec {type(spec).__name__}")


def chain_module(specs: Sequence[Spec]) -> nn.Module:
    modules = [to_module(s) for s in specs]
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


def run_specs(specs: Sequence[Spec], x: np.ndarray) -> np.ndarray:
    """Reference evaluation of a spec chain in float64 (used to measure per-layer error)."""
    module = chain_module(specs).double().eval()
    with torch.no_grad():
        return module(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()
