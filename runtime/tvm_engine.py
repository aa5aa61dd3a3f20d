"""TVM: a built artifact's library in a Relax VM, here (`tvm`) or on a remote device over RPC (`tvm-rpc`).

Both run the VM's stateful interface (set_input / invoke_stateful / get_outputs): over
RPC a returned tuple is not subscriptable (docs/toolchain.md#rpc-and-qemu), and one interface for both
keeps the two engines' numbers comparable.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import numpy as np

from .engines import EngineFailed, EngineUnavailable, Inputs, Runner

LOCAL, REMOTE = "tvm", "tvm-rpc"


def _manifest(artifact_dir: str) -> dict[str, Any]:
    with open(os.path.join(artifact_dir, "manifest.json")) as f:
        return json.load(f)


def _leaves(result: Any) -> list[Any]:
    if hasattr(result, "numpy"):
        return [result]
    return [leaf for item in result for leaf in _leaves(item)]


def _make_runner(engine: str, vm, device, manifest: dict[str, Any], threads: int | None, emulated: bool,
                 describe: str, close=lambda: None) -> Runner:
    import tvm

    infos = manifest["inputs"]
    names = [i["name"] for i in infos]
    outputs = [o["name"] for o in manifest["outputs"]]

    def place(inputs: Inputs) -> list:
        return [tvm.runtime.tensor(np.ascontiguousarray(inputs[i["name"]], dtype=i["dtype"]), device) for i in infos]

    def run(inputs: Inputs) -> dict[str, np.ndarray]:
        try:
            vm.set_input("main", *place(inputs))
            vm.invoke_stateful("main")
            leaves = _leaves(vm.get_outputs("main"))
            return {name: leaf.numpy() for name, leaf in zip(outputs, leaves)}
        except Exception as e:  # noqa: BLE001 - a dead server surfaces as a TVMError or OSError
            raise EngineFailed(f"{describe}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

    def make_timer(inputs: Inputs):
        vm.set_input("main", *place(inputs))
        if engine == REMOTE:
            # Time on the device, not the RPC round trip: one run per call (plus TVM's warm-up run).
            evaluate = vm.time_evaluator("invoke_stateful", device, number=1, repeat=1)

            def once() -> float:
                try:
                    return float(evaluate("main").mean)
                except Exception as e:  # noqa: BLE001
                    raise EngineFailed(f"{describe}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
            return once

        def once_local() -> float:
            start = time.perf_counter()
            vm.invoke_stateful("main")
            return time.perf_counter() - start
        return once_local

    shapes = {i["name"]: tuple(i["shape"]) for i in infos}
    return Runner(engine, run, make_timer, names, shapes, threads, emulated, close,
                  {"artifact": manifest.get("source"), "tuning_trials": manifest["tuning"]["trials_spent"]})


def prepare_local(artifact_dir: str, threads: int) -> Runner:
    import tvm
    from tvm import relax

    from .engines import tvm_threads_default

    tvm_threads_default()  # before TVM's thread pool starts (it would take one core on a 2-vCPU VM)
    manifest = _manifest(artifact_dir)
    target = manifest["target"]
    if target["link"] != "local-cc" and not (target["device"] == "cuda" and tvm.cuda(0).exist):
        raise EngineUnavailable(f"{artifact_dir} is built for {target['name']}, which does not run in this process")
    device = tvm.cuda(0) if target["device"] == "cuda" else tvm.cpu()
    library = os.path.join(artifact_dir, manifest["files"]["library"])
    vm = relax.VirtualMachine(tvm.runtime.load_module(library), device)
    return _make_runner(LOCAL, vm, device, manifest, threads, False, f"TVM on {target['name']}")


def prepare_remote(artifact_dir: str, remote) -> Runner:
    """`remote`: a targets.rpc.RemoteSession; the library is uploaded and loaded there."""
    from tvm import relax

    manifest = _manifest(artifact_dir)
    target = manifest["target"]["name"]
    files = manifest["files"]
    library = files.get("linked") or files["library"]
    if library.endswith(".tar"):
        raise EngineUnavailable(f"{artifact_dir}: {target} objects are not linked into a .so "
                                f"({files.get('link_instructions') or 'set TVM_NDK_CC and rebuild'})")
    where = f"{target} over RPC ({remote.key or 'direct'} at {remote.host}:{remote.port})"
    try:
        session = remote.session
        # A unique remote name per upload: every artifact's library is model.so, and loading a second
        # file under a name already loaded in the server shut the server down here. Unique per upload,
        # not per artifact folder: a folder rebuilt and prepared again (deploy times the same model in
        # several blocks) overwrote the library the server had mapped, and its next dlsym segfaulted.
        remote_name = f"tf_{uuid.uuid4().hex[:16]}_{os.path.basename(library)}"
        session.upload(os.path.join(artifact_dir, library), target=remote_name)
        module = session.load_module(remote_name)
        device = session.cpu()
        vm = relax.VirtualMachine(module, device)
    except Exception as e:  # noqa: BLE001
        raise EngineFailed(f"{where}: loading {library} failed: {type(e).__name__}: {e}") from e
    return _make_runner(REMOTE, vm, device, manifest, None, remote.emulated, where)
