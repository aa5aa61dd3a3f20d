"""Stage results in OUT/stages/, each keyed by a fingerprint of its inputs: a deploy that stopped
resumes at the first stage whose result is missing or whose inputs changed."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np

from tensorfold.ir.graph import Graph


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def graph_fingerprint(graph: Graph) -> str:
    """The graph's inputs, outputs and every layer (name, kind, shapes, weights)."""
    digest = hashlib.sha256()
    digest.update(repr([(i.name, tuple(i.shape)) for i in graph.inputs]).encode())
    digest.update(repr(list(graph.output_names)).encode())
    for layer in graph.layers():
        digest.update(repr((layer.name, layer.kind, tuple(layer.in_shape or ()), tuple(layer.out_shape or ()))).encode())
        spec = layer.spec
        for attr in ("weight", "bias", "gamma", "beta", "mean", "var"):
            value = getattr(spec, attr, None) if spec is not None else None
            if value is not None:
                digest.update(np.ascontiguousarray(np.asarray(value)).tobytes())
    return digest.hexdigest()[:16]


class Stages:
    def __init__(self, out: str):
        self.dir = os.path.join(out, "stages")
        self.reused: list[str] = []

    def path(self, name: str, suffix: str = ".json") -> str:
        return os.path.join(self.dir, name + suffix)

    def load(self, name: str, key: str) -> dict | None:
        """The stage's stored result when it was made from the same inputs."""
        try:
            with open(self.path(name)) as f:
                stored = json.load(f)
        except (OSError, ValueError):
            return None
        if stored.get("fingerprint") != key:
            return None
        for extra in stored.get("files", []):
            if not os.path.isfile(os.path.join(self.dir, extra)):
                return None
        self.reused.append(name)
        return stored["result"]

    def save(self, name: str, key: str, result: Any, files: list[str] = ()) -> None:
        os.makedirs(self.dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"fingerprint": key, "files": list(files), "result": result}, f, indent=1, default=float)
        os.replace(tmp, self.path(name))

    def save_graph(self, name: str, graph: Graph) -> str:
        os.makedirs(self.dir, exist_ok=True)
        path = self.path(name, ".onnx")
        tmp = path + ".partial.onnx"
        graph.save(tmp)
        os.replace(tmp, path)
        return os.path.basename(path)

    def load_graph(self, name: str) -> Graph:
        from tensorfold.ir import load

        return load(self.path(name, ".onnx"))
