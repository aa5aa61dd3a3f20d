"""Targets are data: names -> TVM dicts, linkers and placements; bad names and missing toolchains explained."""
from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn

import tensorfold as tf
from tensorfold.cli import main
from tensorfold.ir.errors import TargetError
from tensorfold.targets import get_target, list_targets
from tensorfold.targets.linking import check_toolchain


def test_x86_is_this_host_with_core_count():
    target = get_target("x86")
    assert target.tvm_target["kind"] == "llvm"
    # Target.from_device, not "native" (which silently falls back to a generic CPU)
    assert target.tvm_target.get("mcpu") not in (None, "", "native", "generic")
    assert target.tvm_target["num-cores"] >= 1
    assert target.link == "local-cc" and target.placement.kind == "local" and target.runs_here


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        line = next((l for l in f if l.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU flags from /proc/cpuinfo")
def test_x86_code_uses_the_widest_vector_registers_this_cpu_has():
    """A 16-lane fp32 loop built for the host target is 512-bit code on an AVX-512 CPU (256-bit on AVX2):
    a target that lost the host CPU (a generic x86-64) would emit 128-bit SSE. LLVM prefers 256-bit vectors
    for its own vectorizer on some AVX-512 CPUs; TVM's explicit vectors must still use zmm there."""
    import tvm
    from tvm import te

    flags = _cpu_flags()
    register = "zmm" if "avx512f" in flags else "ymm" if "avx2" in flags else None
    if register is None:
        pytest.skip("this CPU has neither AVX-512 nor AVX2")
    n = 64
    a, b = te.placeholder((n, n), name="A"), te.placeholder((n, n), name="B")
    k = te.reduce_axis((0, n), "k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b, c]))
    i, j, kk = sch.get_loops(sch.get_sblock("C"))
    jo, ji = sch.split(j, [None, 16])
    sch.reorder(i, jo, kk, ji)
    sch.vectorize(ji)
    asm = tvm.compile(sch.mod, target=tvm.target.Target(get_target("x86").tvm_target)).mod.inspect_source("asm")
    assert re.search(rf"\bv\w+\s+.*%{register}\d+", asm), f"no {register} instruction in the host target's code"


@pytest.mark.parametrize("name, expected", [
    ("x86:skylake-avx512", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}),
    ("x86:znver4", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}),
    ("cuda", {"kind": "cuda", "arch": "sm_80"}),
    ("cuda:sm_90", {"kind": "cuda", "arch": "sm_90"}),
    ("arm64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}),
    ("arm64:cortex-a76", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "mcpu": "cortex-a76"}),
    ("android-arm64", {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]}),
])
def test_named_targets_give_their_tvm_dicts(name, expected):
    target = get_target(name)
    assert {k: v for k, v in target.tvm_target.items() if k != "num-cores"} == expected
    target.tvm()  # TVM accepts the dict


def test_where_targets_run_and_how_they_link():
    arm, android, cuda = get_target("arm64"), get_target("android-arm64"), get_target("cuda:sm_80")
    assert (arm.link, arm.cross_compiler, arm.library_name) == ("cross-gcc", "aarch64-linux-gnu-g++", "model.so")
    assert (android.link, android.library_name) == ("tar", "model.tar")
    assert (cuda.link, cuda.device) == ("cuda", "cuda")
    assert arm.placement.kind == "tracker" and arm.placement.key and arm.placement.port
    assert not arm.runs_here and not android.runs_here
    assert len({t.key for t in list_targets()}) == len(list_targets())  # one tuning database each


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(TargetError) as info:
        get_target("risc-v")
    message = str(info.value)
    assert "'risc-v'" in message
    for known in ("x86", "cuda", "arm64", "android-arm64"):
        assert known in message


@pytest.mark.parametrize("name, word", [("x86:pentium-9000", "pentium-9000"), ("cuda:ampere", "sm_80"),
                                        ("arm64:cortex-z99", "cortex-z99")])
def test_bad_target_options_are_explained(name, word):
    with pytest.raises(TargetError, match=word):
        get_target(name)


def test_missing_cross_compiler_names_the_apt_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no aarch64-linux-gnu-g++ on it
    with pytest.raises(TargetError) as info:
        check_toolchain(get_target("arm64"))
    assert "aarch64-linux-gnu-g++" in str(info.value)
    assert "apt-get install g++-aarch64-linux-gnu" in str(info.value)
    # and tf.build refuses before compiling anything
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with pytest.raises(TargetError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        tf.build(model, "arm64", tmp_path / "out", example_inputs=(torch.randn(1, 3, 8, 8),), progress=False)
    assert not (tmp_path / "out" / "model.so").exists()


def test_cli_targets_lists_every_family(capsys):
    assert main(["targets"]) == 0
    printed = capsys.readouterr().out
    for name in ("x86", "cuda:sm_80", "arm64", "android-arm64"):
        assert f"\n{name}:" in "\n" + printed
    assert "'kind': 'llvm'" in printed and "tracker" in printed


def test_cli_build_unknown_target_fails_cleanly(capsys, tmp_path):
    assert main(["build", "digits", "--target", "x87", "-o", os.fspath(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "unknown target 'x87'" in error and "android-arm64" in error
