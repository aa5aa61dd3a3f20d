"""An aarch64 TVM RPC server under qemu-aarch64 on loopback (docs/toolchain.md#rpc-and-qemu).

The aarch64 Python + TVM runtime comes from scripts/prepare-arm64-runtime.sh. TVM's
rpc_server re-executes `sys.executable` for its workers, so a small launcher, run by the
emulated Python, points `sys.executable` at a wrapper that runs qemu again, then starts
`tvm.exec.rpc_server`. Emulated time is not device time: numbers only.
"""
from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

from .rpc import ManagedProcess, RpcError, free_port, registered_keys, spawn, state_dir, tracker_summary

PREPARE = "scripts/prepare-arm64-runtime.sh"
APT = "apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user debootstrap"

LAUNCHER = """\
import runpy, sys
sys.executable = {wrapper!r}
sys.argv = ["tvm.exec.rpc_server"] + {args!r}
runpy.run_module("tvm.exec.rpc_server", run_name="__main__")
"""


def arm64_root() -> Path:
    return Path(os.environ.get("TENSORFOLD_ARM64_ROOT") or Path.home() / ".cache" / "tensorfold" / "arm64")


def missing_runtime() -> str | None:
    """Why an emulated arm64 server cannot start here, or None when it can."""
    if shutil.which("qemu-aarch64") is None:
        return f"qemu-aarch64 is not installed ({APT})"
    root = arm64_root()
    if not (root / "READY").is_file():
        return f"the aarch64 Python + TVM runtime is not prepared in {root} (run {PREPARE})"
    return None


def _write_wrapper(directory: Path, root: Path) -> Path:
    rootfs, site = root / "rootfs", root / "site"
    wrapper = directory / "python-aarch64"
    # binfmt is not mounted here: qemu is called explicitly (docs/toolchain.md#rpc-and-qemu).
    wrapper.write_text("#!/bin/sh\n"
                       f"PYTHONPATH='{site}' TVM_USE_RUNTIME_LIB=1 exec qemu-aarch64 -L '{rootfs}' "
                       f"'{rootfs}/usr/bin/python3.11' \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return wrapper


def start_arm64_server(tracker_host: str = "127.0.0.1", tracker_port: int = 9190, key: str = "arm64",
                       port: int | None = None, timeout: float = 120.0) -> ManagedProcess:
    """Start the emulated server on 127.0.0.1 and wait until the tracker lists it under `key`."""
    reason = missing_runtime()
    if reason:
        raise RpcError(f"cannot start an arm64 RPC server under qemu: {reason}")
    registered_keys(tracker_summary(tracker_host, tracker_port))  # an unreachable tracker fails now, by name
    port = port or free_port()
    name = f"qemu-arm64-{port}"
    directory = state_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = _write_wrapper(directory, arm64_root())
    args = ["--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1),
            "--tracker", f"{tracker_host}:{tracker_port}", "--key", key]
    launcher = directory / "launch_rpc_server.py"
    launcher.write_text(LAUNCHER.format(wrapper=str(wrapper), args=args))
    managed = spawn(name, [str(wrapper), str(launcher)],
                    {"kind": "qemu-arm64-server", "host": "127.0.0.1", "port": port, "key": key,
                     "tracker": f"{tracker_host}:{tracker_port}"})
    try:
        _wait_registered(managed, tracker_host, tracker_port, key, timeout)
    except BaseException:
        managed.stop()
        raise
    return managed


def _wait_registered(managed: ManagedProcess, host: str, port: int, key: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not managed.alive():
            log = managed.log.read_text(errors="replace")[-2000:] if managed.log.exists() else ""
            raise RpcError(f"the qemu arm64 RPC server exited (code {managed.process.returncode}); "
                           f"log {managed.log}:\n{log}")
        summary = tracker_summary(host, port)
        if any(item["key"].split(":", 1)[-1] == key and int(item["addr"][1]) == managed.info["port"]
               for item in summary.get("server_info", [])):
            return
        time.sleep(1.0)
    raise RpcError(f"the qemu arm64 RPC server did not register at tracker {host}:{port} under key {key!r} "
                   f"within {timeout:g} s; log: {managed.log}")
