"""Builds for machines other than this one: CUDA source that nvcc compiles, aarch64 objects and .so."""
from __future__ import annotations

import os
import re
import shutil
import struct
import tarfile

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.ir.errors import TargetError
from tensorfold.targets import load_artifact

EM_AARCH64, ET_REL, ET_DYN = 183, 1, 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _graph():
    return tf.capture(Net().eval(), (torch.randn(1, 3, 16, 16),))


def _elf_header(data: bytes) -> tuple[int, int]:
    """(e_type, e_machine) of a 64-bit little-endian ELF file, read from its header."""
    assert data[:4] == b"\x7fELF", "not an ELF file"
    assert data[4] == 2 and data[5] == 1, "not 64-bit little-endian"
    return struct.unpack_from("<HH", data, 16)


def test_cuda_source_compiles_with_nvcc(tmp_path):
    artifact = tf.build(_graph(), "cuda:sm_80", tmp_path / "cuda", progress=False)
    assert artifact.manifest["target"]["tvm"] == {"kind": "cuda", "arch": "sm_80"}
    assert artifact.manifest["files"] == {"library": "model.so", "cuda_source": "model.cu"}
    assert (tmp_path / "cuda" / "model.so").stat().st_size > 0
    source = (tmp_path / "cuda" / "model.cu").read_text()
    assert "__global__" in source
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA source was generated but not compiled")
    import tvm
    from tvm.support import nvcc

    with tvm.target.Target({"kind": "cuda", "arch": "sm_80"}):  # nvcc reads the arch of the current target
        ptx = nvcc.compile_cuda(source, target_format="ptx", arch="sm_80", compiler="nvcc")
    ptx = bytes(ptx).decode()
    assert ".target sm_80" in ptx
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source))
    assert kernels and kernels == set(re.findall(r"\.entry (\w+)\(", ptx))


def test_cuda_artifact_needs_a_gpu_to_load(tmp_path):
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a GPU: loading is the measure half's test")
    tf.build(_graph(), "cuda", tmp_path / "cuda", progress=False)
    with pytest.raises(TargetError, match="no cuda device"):
        load_artifact(tmp_path / "cuda")


def test_android_tar_holds_aarch64_relocatable_objects(tmp_path, monkeypatch):
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    artifact = tf.build(_graph(), "android-arm64", tmp_path / "android", progress=False)
    library = tmp_path / "android" / "model.tar"
    assert artifact.manifest["files"]["library"] == "model.tar"
    # no NDK here: the manifest says how to link
    assert "TVM_NDK_CC" in artifact.manifest["files"]["link_instructions"]
    assert "TVM_NDK_CC" in artifact.manifest["load"]["android"]
    with tarfile.open(library) as tar:
        objects = [m for m in tar.getmembers() if m.name.endswith(".o")]
        assert objects, f"no objects in {library}: {tar.getnames()}"
        for member in objects:
            e_type, e_machine = _elf_header(tar.extractfile(member).read())
            assert (e_type, e_machine) == (ET_REL, EM_AARCH64), member.name
    with pytest.raises(TargetError, match="Android"):
        load_artifact(tmp_path / "android")


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="aarch64-linux-gnu-g++ absent: apt-get install g++-aarch64-linux-gnu (CI installs it)")
def test_arm64_library_is_an_aarch64_shared_object(tmp_path):
    artifact = tf.build(_graph(), "arm64:cortex-a76", tmp_path / "arm64", progress=False)
    assert artifact.manifest["target"]["tvm"]["mtriple"] == "aarch64-linux-gnu"
    assert artifact.manifest["target"]["runs_on"]["kind"] == "tracker"
    data = (tmp_path / "arm64" / "model.so").read_bytes()
    assert _elf_header(data) == (ET_DYN, EM_AARCH64)
    with pytest.raises(TargetError, match="aarch64"):
        load_artifact(os.fspath(tmp_path / "arm64"))


def test_tuning_a_remote_target_asks_for_the_device(tmp_path, monkeypatch):
    monkeypatch.delenv("TVM_NDK_CC", raising=False)  # without the NDK no candidate can be linked for a phone
    with pytest.raises(TargetError, match="TVM_NDK_CC.*tune-trials 0"):
        tf.build(_graph(), "android-arm64", tmp_path / "a", tune_trials=4, tuning_db=tmp_path / "db", progress=False)
