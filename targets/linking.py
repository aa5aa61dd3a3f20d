"""Turning a compiled executable into files on disk, per target's `link` kind.

local-cc: `model.so` with the host compiler. cross-gcc: `model.so` with the aarch64 g++.
tar: `model.tar` of relocatable objects (no NDK is installable here; `tvm.support.ndk`
links them when TVM_NDK_CC names an NDK clang). cuda: `model.so` (CUDA source embedded,
the runtime compiles it on the GPU machine) plus `model.cu` written beside it.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

from tensorfold.ir.errors import BuildError, TargetError

from .registry import Target

NDK_ENV = "TVM_NDK_CC"


def check_toolchain(target: Target) -> None:
    """Fail before compiling if the linker the target needs is not installed."""
    if target.link == "cross-gcc" and shutil.which(target.cross_compiler or "") is None:
        raise TargetError(
            f"target {target.name}: the cross compiler {target.cross_compiler} is not on PATH; "
            f"`apt-get install {target.apt_package}` installs it (Debian/Ubuntu)")


def android_link_instructions(library: str) -> str:
    return (f"{library} holds aarch64-linux-android objects; link them into a .so with the Android NDK: "
            f"set {NDK_ENV}=<ndk>/toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android28-clang++ "
            f"and run `python -c \"import tvm; from tvm.support import ndk; "
            f"tvm.runtime.load_module('{library}').export_library('model.so', fcompile=ndk.create_shared)\"`"
            f" (or rebuild with {NDK_ENV} set: the build then writes model.so too)")


def export(executable: Any, target: Target, out_dir: str) -> dict[str, Any]:
    """Write the library (and companions) into out_dir; returns what the manifest records."""
    library = os.path.join(out_dir, target.library_name)
    check_toolchain(target)
    try:
        if target.link == "cross-gcc":
            from tvm.support import cc

            executable.export_library(library, fcompile=cc.cross_compiler(target.cross_compiler))
        else:
            executable.export_library(library)
    except Exception as e:  # noqa: BLE001
        raise BuildError(f"target {target.name}: writing {library} failed: {type(e).__name__}: {e}") from e
    files: dict[str, Any] = {"library": os.path.basename(library)}
    if target.link == "cuda":
        files["cuda_source"] = _write_cuda_source(executable, out_dir)
    if target.link == "tar":
        files.update(_link_android(executable, out_dir))
    return files


def _write_cuda_source(executable: Any, out_dir: str) -> str:
    cuda = _find_module(executable.mod, "cuda")
    if cuda is None:
        raise BuildError("the CUDA build produced no CUDA module; nothing to write as model.cu")
    path = os.path.join(out_dir, "model.cu")
    with open(path, "w") as f:
        f.write(cuda.inspect_source())
    return os.path.basename(path)


def _find_module(module: Any, kind: str) -> Any:
    if module.kind == kind:
        return module
    for imported in module.imports:
        found = _find_module(imported, kind)
        if found is not None:
            return found
    return None


def _link_android(executable: Any, out_dir: str) -> dict[str, Any]:
    if not os.environ.get(NDK_ENV):
        return {"linked": None, "link_instructions": android_link_instructions("model.tar")}
    from tvm.support import ndk

    shared = os.path.join(out_dir, "model.so")
    try:
        executable.export_library(shared, fcompile=ndk.create_shared)
    except Exception as e:  # noqa: BLE001
        raise BuildError(f"linking {shared} with the NDK compiler {os.environ[NDK_ENV]} failed: {e}") from e
    return {"linked": "model.so"}
