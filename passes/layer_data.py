"""What data-driven passes see of the calibration data: each layer's input, as im2col patches.

A layer's input is recorded through the graph view (both front ends), cut into the rows the
layer multiplies by its weight (a conv's im2col patches with the layer's own stride, padding
and dilation; a Linear's last axis), and accumulated batch by batch into the uncentred second
moment Sigma = E[x x^T] in float64 (Kalle, Rudkiewicz et al.'s Sigma-norm). The patches of one batch
are processed in slices, so memory stays bounded for S*k^2 up to 4608 (Sigma itself is then
170 MB).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from tensorfold.ir.errors import PipelineError
from tensorfold.ir.graph import Graph, Layer
from tensorfold.ir.specs import Conv, Linear, Spec

from .measure import Feeds
from .progress import progress_bar

ROWS_PER_SLICE = 1 << 22  # patch values per slice of a batch (32 MB in float64)
HOW_TO_GIVE_DATA = ("give calibration data: tf.compress(..., calibration=<arrays | DataLoader | ImageFolder dir | "
                    ".npy | task name>) or `tensorfold compress ... --calibration PATH`")


def require_calibration(pass_name: str, feeds: Feeds) -> Feeds:
    if not feeds:
        raise PipelineError(f"pass {pass_name!r} is data-driven and got no calibration data; {HOW_TO_GIVE_DATA}")
    return feeds


def split_feeds(feeds: Feeds, held_out_every: int = 5) -> tuple[Feeds, Feeds]:
    """(fit, held out): every `held_out_every`-th batch held out; a single batch is split in half."""
    if len(feeds) >= 2:
        held = [f for i, f in enumerate(feeds) if i % held_out_every == held_out_every - 1] or feeds[-1:]
        return [f for f in feeds if not any(f is h for h in held)], held
    (feed,) = feeds
    count = len(next(iter(feed.values())))
    if count < 2:
        return feeds, []
    half = count // 2
    return [{k: v[:half] for k, v in feed.items()}], [{k: v[half:] for k, v in feed.items()}]


def patch_width(spec: Spec) -> int:
    """Length of one patch row: S*k^2 for a conv (all groups), in_features for a Linear."""
    if isinstance(spec, Conv):
        return spec.in_channels * int(np.prod(spec.kernel_size))
    if isinstance(spec, Linear):
        return spec.in_features
    raise PipelineError(f"patches of a {type(spec).__name__} layer are not defined")


def patches(spec: Spec, x: np.ndarray | torch.Tensor, transposed_input: bool = False) -> Iterator[torch.Tensor]:
    """Slices of the rows (.., patch_width) that `spec` multiplies by its unfolded weight, in float64.

    Conv rows follow the unfolding K.reshape(T, -1): channel-major, then kernel taps, so the
    block of group g is columns [g*S_g*k^2, (g+1)*S_g*k^2).
    """
    x = torch.as_tensor(np.asarray(x)).to(torch.float64)
    if isinstance(spec, Linear):
        rows = (x.T if transposed_input else x).reshape(-1, spec.in_features)
        step = max(1, ROWS_PER_SLICE // spec.in_features)
        for start in range(0, len(rows), step):
            yield rows[start:start + step]
        return
    if not isinstance(spec, Conv):
        raise PipelineError(f"patches of a {type(spec).__name__} layer are not defined")
    width = patch_width(spec)
    per_sample = max(1, ROWS_PER_SLICE // max(1, width * int(np.prod(spec.out_shape(x.shape)[2:]))))
    for start in range(0, len(x), per_sample):
        yield _unfold(spec, x[start:start + per_sample])


def _unfold(spec: Conv, x: torch.Tensor) -> torch.Tensor:
    flat = [p for begin_end in reversed(spec.padding) for p in begin_end]  # F.pad: last dim first
    x = F.pad(x, flat)
    if spec.spatial_dims == 1:  # unfold is 2-D only: a 1-D conv is a (1 x k) 2-D conv
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *spec.kernel_size), (1, *spec.dilation), (1, *spec.stride)
    else:
        kernel, dilation, stride = spec.kernel_size, spec.dilation, spec.stride
    columns = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, S*k^2, L)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


@dataclass
class SecondMoment:
    """Running sums of x x^T and x over patch rows, in float64."""

    width: int
    xx: np.ndarray = field(init=False)
    x: np.ndarray = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.xx = np.zeros((self.width, self.width))
        self.x = np.zeros(self.width)

    def add(self, rows: torch.Tensor) -> None:
        self.xx += (rows.T @ rows).numpy()
        self.x += rows.sum(0).numpy()
        self.count += len(rows)

    def sigma(self, damping: float = 0.0) -> np.ndarray:
        """E[x x^T] + damping * mean(diag) * I (damping keeps it invertible with few or degenerate samples)."""
        if not self.count:
            raise PipelineError("no calibration rows were recorded for this layer")
        sigma = self.xx / self.count
        if damping:
            sigma = sigma + damping * max(float(np.trace(sigma)) / self.width, 1e-30) * np.eye(self.width)
        return sigma

    @property
    def mean(self) -> np.ndarray:
        return self.x / max(self.count, 1)


def second_moments(graph: Graph, layers: Sequence[Layer], feeds: Feeds, label: str = "calibration statistics",
                   progress: bool = False) -> dict[str, SecondMoment]:
    """Sigma of every layer's patches, over all `feeds`, recording every layer input in one run per feed."""
    moments = {layer.name: SecondMoment(patch_width(layer.spec)) for layer in layers}
    tensors = sorted({layer.input for layer in layers})
    with progress_bar(label, len(feeds), progress) as advance:
        for feed in feeds:
            recorded = graph.run(feed, record=[t for t in tensors if t not in feed])
            for layer in layers:
                value = feed[layer.input] if layer.input in feed else recorded[layer.input]
                for rows in patches(layer.spec, value, bool(layer.facts.get("transA"))):
                    moments[layer.name].add(rows)
            advance()
    return moments
