"""The artifact folder a build writes, its manifest, and loading it back in any process.

    out_dir/
      model.so | model.tar     compiled library (weights embedded as constants)
      model.cu                 CUDA targets: the generated source, for reading and nvcc checks
      manifest.json            inputs, outputs, target, versions, tuning, how to load
      logs/                    MetaSchedule logs of the tuning run, if any
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from tensorfold.ir.errors import BuildError, InputShapeError, TargetError

MANIFEST = "manifest.json"
FORMAT = "tensorfold-artifact/1"


@dataclass
class Artifact:
    """A built model on disk: `path` is the folder, `manifest` its manifest.json."""

    path: str
    manifest: dict[str, Any]

    @property
    def library(self) -> str:
        return os.path.join(self.path, self.manifest["files"]["library"])

    @property
    def target_name(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def trials_spent(self) -> int:
        return int(self.manifest["tuning"]["trials_spent"])

    def load(self, device: Any = None) -> "LoadedModel":
        return load_artifact(self.path, device)

    @classmethod
    def open(cls, path: str) -> "Artifact":
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise BuildError(f"{path}: not a tensorfold artifact folder (no {MANIFEST}); build one with tensorfold build")
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            raise BuildError(f"{manifest_path}: unknown artifact format {manifest.get('format')!r}, expected {FORMAT}")
        return cls(os.path.abspath(path), manifest)

    def save_manifest(self) -> None:
        with open(os.path.join(self.path, MANIFEST), "w") as f:
            json.dump(self.manifest, f, indent=2)


def plain_tvm_instructions(library: str, device: str) -> str:
    dev = "tvm.cuda(0)" if device == "cuda" else "tvm.cpu()"
    return (f"import tvm; from tvm import relax; "
            f"vm = relax.VirtualMachine(tvm.runtime.load_module('{library}'), {dev}); "
            f"out = vm['main'](*[tvm.runtime.tensor(x) for x in inputs])  # inputs in manifest order; "
            f"out is a Tensor or a tuple of Tensors in manifest output order")


class LoadedModel:
    """A built model loaded into a TVM VM: call with arrays (positional or by input name)."""

    def __init__(self, artifact: Artifact, device: Any):
        import tvm
        from tvm import relax

        self.artifact = artifact
        self.device = device
        self.input_infos = artifact.manifest["inputs"]
        self.output_names = [o["name"] for o in artifact.manifest["outputs"]]
        self.module = tvm.runtime.load_module(artifact.library)
        self.vm = relax.VirtualMachine(self.module, device)

    def __call__(self, *arrays: Any, **named: Any) -> dict[str, np.ndarray]:
        import tvm

        values = self._order(arrays, named)
        result = self.vm["main"](*[tvm.runtime.tensor(v, self.device) for v in values])
        leaves = _flatten(result)
        return {name: leaf.numpy() for name, leaf in zip(self.output_names, leaves)}

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self(**inputs)

    def _order(self, arrays: Sequence[Any], named: Mapping[str, Any]) -> list[np.ndarray]:
        names = [i["name"] for i in self.input_infos]
        if arrays and named:
            raise InputShapeError("give the inputs either positionally or by name, not both")
        if named:
            missing = sorted(set(names) - set(named))
            if missing:
                raise InputShapeError(f"{self.artifact.path}: missing inputs {missing}; the model takes {names}")
            arrays = tuple(named[n] for n in names)
        if len(arrays) != len(names):
            raise InputShapeError(f"{self.artifact.path}: got {len(arrays)} input(s), the model takes {names}")
        values = []
        for info, array in zip(self.input_infos, arrays):
            value = np.ascontiguousarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array,
                                         dtype=info["dtype"])
            if tuple(value.shape) != tuple(info["shape"]):
                raise InputShapeError(f"{self.artifact.path}: input {info['name']!r} has shape {value.shape}; "
                                      f"the model was built for {tuple(info['shape'])} (rebuild for another shape)")
            values.append(value)
        return values


def _flatten(result: Any) -> list[Any]:
    if hasattr(result, "numpy"):
        return [result]
    leaves: list[Any] = []
    for item in result:
        leaves.extend(_flatten(item))
    return leaves


def load_artifact(path: str, device: Any = None) -> LoadedModel:
    """Load an artifact folder for running in this process (`device`: a tvm device, default per target)."""
    import tvm

    from tensorfold.runtime.engines import tvm_threads_default

    tvm_threads_default()  # before TVM's thread pool starts (it would take one core on a 2-vCPU VM)

    artifact = Artifact.open(path)
    target = artifact.manifest["target"]
    if target["link"] == "tar":
        raise TargetError(f"{path}: {target['name']} artifacts are objects for an Android phone; "
                          f"{artifact.manifest['files'].get('link_instructions', '')}; run them over RPC")
    if target["link"] == "cross-gcc":
        raise TargetError(f"{path}: built for {target['name']} (aarch64); it does not load on this machine: "
                          "run it over TVM RPC on the device (or under qemu-aarch64)")
    if device is None:
        device = tvm.cuda(0) if target["device"] == "cuda" else tvm.cpu()
    if not device.exist:
        raise TargetError(f"{path}: built for {target['name']}, but this machine has no {target['device']} device")
    return LoadedModel(artifact, device)
