"""What a target is: data naming the TVM target dict, how to link, and where it runs.

Target names: `x86` (this host), `x86:<mcpu>`, `cuda` / `cuda:sm_XX`, `arm64` /
`arm64:<mcpu>`, `android-arm64` / `android-arm64:<mcpu>`. TVM 0.27 only accepts targets
as dicts (a string like "llvm -mcpu=..." raises), so a target carries its dict.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from tensorfold.ir.errors import TargetError

DEFAULT_TRACKER = ("127.0.0.1", 9190)


@dataclass(frozen=True)
class Placement:
    """Where a built artifact runs.

    kind: "local" (this process), "tracker" (an RPC tracker at host:port hands out a device
    registered under `key`), or "direct" (an RPC server at host:port). The RPC kinds are
    filled in by the measure half (issue 5 part B); a build only records them.
    """

    kind: str = "local"
    key: str | None = None
    host: str | None = None
    port: int | None = None

    def describe(self, device: str = "cpu") -> str:
        if self.kind == "local":
            return "this machine's NVIDIA GPU (where there is one)" if device == "cuda" else "this machine"
        if self.kind == "tracker":
            return f"RPC key {self.key!r} at tracker {self.host}:{self.port}"
        return f"RPC server {self.host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "host": self.host, "port": self.port}


@dataclass(frozen=True)
class Target:
    """A named build target.

    link: "local-cc" (the host's compiler), "cross-gcc" (`cross_compiler` names the
    aarch64 g++), "tar" (relocatable objects, linked later by the NDK) or "cuda" (a .so
    holding the CUDA source, plus the source written beside it).
    device: the TVM device type the artifact runs on ("cpu" or "cuda").
    """

    name: str
    tvm_target: dict[str, Any]
    link: str
    device: str = "cpu"
    placement: Placement = field(default_factory=Placement)
    cross_compiler: str | None = None
    apt_package: str | None = None
    description: str = ""

    @property
    def key(self) -> str:
        """A file-system-safe key: one tuning database per key."""
        spec = self.tvm_target
        parts = [self.name.split(":")[0], str(spec.get("arch") or spec.get("mcpu") or "generic")]
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts))

    @property
    def library_name(self) -> str:
        return "model.tar" if self.link == "tar" else "model.so"

    @property
    def runs_here(self) -> bool:
        """Whether this machine can run (and so tune) the artifact in-process."""
        if self.placement.kind != "local":
            return False
        if self.device == "cuda":
            import tvm

            return bool(tvm.cuda(0).exist)
        return True

    def tvm(self):
        import tvm

        return tvm.target.Target(self.tvm_target)

    def with_placement(self, placement: Placement) -> "Target":
        return replace(self, placement=placement)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "tvm": self.tvm_target, "link": self.link, "device": self.device,
                "runs_on": self.placement.to_json(), "key": self.key}


# ---- the families -------------------------------------------------------------------

def _num_cores() -> int:
    # MetaSchedule sizes its thread pools from "num-cores"; physical cores avoid SMT contention.
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def _x86(mcpu: str | None) -> Target:
    import tvm

    from .int8.amx import host_amx_mattr, target_has_amx

    if mcpu is None:
        # {"mcpu": "native"} silently falls back to a generic CPU (docs/toolchain.md#tvm): ask LLVM.
        spec = dict(tvm.target.Target.from_device(tvm.cpu()).export())
        spec = {k: v for k, v in spec.items() if k in ("kind", "mtriple", "mcpu", "mattr")}
        amx = host_amx_mattr()  # what LLVM's CPU name may lack (a VM's Xeon read as rocketlake)
        if amx and not target_has_amx(spec):
            spec["mattr"] = [*spec.get("mattr", []), *amx]
        name, description = "x86", f"this host ({spec.get('mcpu', 'generic')}), run in-process"
    else:
        _check_cpu(mcpu, "x86_64-linux-gnu", "x86")
        spec = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}
        name, description = f"x86:{mcpu}", f"an x86-64 {mcpu} CPU"
    spec["num-cores"] = _num_cores()
    return Target(name, spec, link="local-cc", description=description)


def _cuda(arch: str | None) -> Target:
    arch = arch or "sm_80"
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch):
        raise TargetError(f"cuda:{arch}: the CUDA arch must look like sm_80 or sm_90a")
    return Target(f"cuda:{arch}", {"kind": "cuda", "arch": arch}, link="cuda", device="cuda",
                  description=f"an NVIDIA GPU of compute capability {arch}; compiled anywhere, run where a GPU is")


# MetaSchedule's parallel rules need the device's core count, which a build cannot ask a device
# it may never reach: 4, the big cluster of a typical aarch64 board or phone.
DEVICE_CORES = 4


def _aarch64_spec(triple: str, family: str, mcpu: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": "llvm", "mtriple": triple, "mattr": ["+neon"], "num-cores": DEVICE_CORES}
    if mcpu:
        _check_cpu(mcpu, triple, family)
        spec["mcpu"] = mcpu
    return spec


def _arm64(mcpu: str | None) -> Target:
    spec = _aarch64_spec("aarch64-linux-gnu", "arm64", mcpu)
    host, port = DEFAULT_TRACKER
    return Target("arm64" + (f":{mcpu}" if mcpu else ""), spec, link="cross-gcc",
                  placement=Placement("tracker", "arm64", host, port),
                  cross_compiler="aarch64-linux-gnu-g++", apt_package="g++-aarch64-linux-gnu",
                  description="aarch64 Linux with NEON, cross-compiled into a .so")


def _android_arm64(mcpu: str | None) -> Target:
    spec = _aarch64_spec("aarch64-linux-android", "android-arm64", mcpu)
    host, port = DEFAULT_TRACKER
    return Target("android-arm64" + (f":{mcpu}" if mcpu else ""), spec, link="tar",
                  placement=Placement("tracker", "android", host, port),
                  description="an Android aarch64 phone: objects in a .tar, linked by the NDK (TVM_NDK_CC)")


def _check_cpu(mcpu: str, triple: str, family: str) -> None:
    from tvm.target import codegen

    if not codegen.llvm_is_valid_cpu(mcpu, triple):
        raise TargetError(f"{family}:{mcpu}: LLVM does not know the CPU {mcpu!r} for {triple}; "
                          f"e.g. {', '.join(EXAMPLE_CPUS[family])}")


FAMILIES: dict[str, Callable[[str | None], Target]] = {
    "x86": _x86,
    "cuda": _cuda,
    "arm64": _arm64,
    "android-arm64": _android_arm64,
}
EXAMPLE_CPUS = {"x86": ["skylake-avx512", "znver4", "icelake-server"], "arm64": ["cortex-a76", "neoverse-n1"],
                "android-arm64": ["cortex-a76", "cortex-x1"], "cuda": ["sm_80", "sm_90"]}
KNOWN_NAMES = ["x86", "x86:<mcpu>", "cuda", "cuda:sm_XX", "arm64", "arm64:<mcpu>", "android-arm64",
               "android-arm64:<mcpu>"]


def get_target(name: str | Target) -> Target:
    """A target by name (see the module docstring); a Target passes through."""
    if isinstance(name, Target):
        return name
    family, _, option = str(name).strip().partition(":")
    make = FAMILIES.get(family)
    if make is None:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(KNOWN_NAMES)} "
                          f"(e.g. x86:skylake-avx512, cuda:sm_90, arm64:cortex-a76)")
    return make(option or None)


def host_cpu() -> str:
    """This machine's CPU with TVM's mcpu for it, for every figure measured here: e.g.
    "AMD EPYC 9R14 (family 25, model 17, TVM mcpu znver4)". Zen 4 and Zen 5 differ 2x in latency."""
    from tensorfold.runtime.machine import cpu_description

    return cpu_description(f"TVM mcpu {get_target('x86').tvm_target.get('mcpu', 'generic')}")


def list_targets() -> list[Target]:
    """One target per family, in its default form (what `tensorfold targets` prints)."""
    return [make(None) for make in FAMILIES.values()]


def cpu_has(tvm_target: dict[str, Any], *features: str, arch: str = "x86_64") -> bool:
    """Whether `tvm_target` is an LLVM target for `arch` (the triple's first part) with every LLVM feature
    in `features` (e.g. "avx512bf16"), as TVM reads them from its mcpu and mattr."""
    import tvm
    from tvm.target import codegen

    if tvm_target.get("kind") != "llvm" or not str(tvm_target.get("mtriple", "")).startswith(arch):
        return False
    target = tvm.target.Target(tvm_target)
    return all(codegen.target_has_features(feature, target) for feature in features)
