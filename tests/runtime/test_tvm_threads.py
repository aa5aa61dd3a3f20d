"""TVM's CPU thread pool gets every physical core (its own default halves them on x86, assuming SMT)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import tensorfold as tf

RUN = """
import sys, numpy as np, tvm
from tensorfold.targets import load_artifact
model = load_artifact(sys.argv[1])
model(np.zeros((1, 3, 8, 8), np.float32))
print(tvm.get_global_func("runtime.NumThreads")())
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    graph = tf.capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), torch.zeros(1, 3, 8, 8))
    return tf.build(graph, "x86", tmp_path_factory.mktemp("threads") / "a", progress=False).path


def _threads_in_fresh_process(path, **env) -> int:
    clean = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", RUN, str(path)], env={**clean, **env}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_a_loaded_artifact_runs_on_every_physical_core(artifact):
    import psutil

    assert _threads_in_fresh_process(artifact) == (psutil.cpu_count(logical=False) or os.cpu_count())


def test_tvm_num_threads_still_decides(artifact):
    assert _threads_in_fresh_process(artifact, TVM_NUM_THREADS="1") == 1
