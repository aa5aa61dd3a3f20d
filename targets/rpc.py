"""TVM RPC plumbing: a local tracker as a managed process, and sessions requested with a deadline.

TVM's own client retries a refused tracker connection for 60 s and blocks forever on a key
no server has registered; a measure must instead fail within a few seconds and name the
tracker, so connecting and requesting run here with explicit timeouts.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tensorfold.ir.errors import TensorfoldError

from .registry import Placement, Target

DEFAULT_TIMEOUT = 5.0


class RpcError(TensorfoldError):
    """A tracker or RPC server is unreachable, has no device under a key, or died."""


def state_dir() -> Path:
    """Where pid files and logs of trackers and servers started here live."""
    root = os.environ.get("TENSORFOLD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "tensorfold")
    path = Path(root) / "rpc"
    path.mkdir(parents=True, exist_ok=True)
    return path


def parse_address(text: str, default_port: int = 9190) -> tuple[str, int]:
    host, _, port = str(text).rpartition(":")
    if not host:
        host, port = port, str(default_port)
    try:
        return host, int(port)
    except ValueError:
        raise RpcError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _with_deadline(what: str, timeout: float, work: Callable[[], Any]) -> Any:
    """Run `work` in a daemon thread; a hang past `timeout` becomes an RpcError naming `what`."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RpcError(f"{what}: no answer within {timeout:g} s")
    if "error" in box:
        error = box["error"]
        if isinstance(error, RpcError):
            raise error
        raise RpcError(f"{what}: {type(error).__name__}: {error}") from error
    return box.get("value")


def placed(target: Target, rpc_tracker: str | None, rpc_key: str | None) -> Target:
    """`target` placed at a tracker ("HOST:PORT", key) or one RPC server ("direct:HOST:PORT"); a
    local target, or no tracker and no key, leaves it as it is."""
    if target.placement.kind == "local" or not (rpc_tracker or rpc_key):
        return target
    if rpc_tracker and rpc_tracker.startswith("direct:"):
        host, port = parse_address(rpc_tracker[len("direct:"):], 9090)
        return target.with_placement(Placement("direct", None, host, port))
    host, port = parse_address(rpc_tracker) if rpc_tracker else (target.placement.host, target.placement.port)
    return target.with_placement(Placement("tracker", rpc_key or target.placement.key, host, port))


def connect_tracker(host: str, port: int, timeout: float = DEFAULT_TIMEOUT):
    """A TrackerSession, or an RpcError naming host:port within `timeout` seconds."""
    from tvm import rpc

    try:
        # A plain connect first: TVM's client retries a refused port for 60 s.
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise RpcError(f"RPC tracker {host}:{port} is unreachable ({e.strerror or e}); start one with "
                       f"`tensorfold rpc start` or pass --rpc-tracker HOST:PORT") from None
    return _with_deadline(f"RPC tracker {host}:{port}", timeout, lambda: rpc.connect_tracker(host, port))


def tracker_summary(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    tracker = connect_tracker(host, port, timeout)
    try:
        return _with_deadline(f"RPC tracker {host}:{port}", timeout, tracker.summary)
    finally:
        tracker.close()


def registered_keys(summary: dict[str, Any]) -> list[str]:
    # server_info keys read "server:<key>"
    return sorted({item["key"].split(":", 1)[-1] for item in summary.get("server_info", [])})


@dataclass
class RemoteSession:
    """An open RPC session to one device, with where it is (to tell emulated servers apart)."""

    session: Any
    host: str
    port: int
    key: str
    tracker: str

    @property
    def emulated(self) -> bool:
        return is_local_qemu_server(self.host, self.port)


def request_session(tracker_host: str, tracker_port: int, key: str, timeout: float = DEFAULT_TIMEOUT,
                    wait_for_key: float = 0.0) -> RemoteSession:
    """A session with a device registered under `key`, or an RpcError within about `timeout` s."""
    from tvm import rpc
    from tvm.rpc import base

    where = f"RPC tracker {tracker_host}:{tracker_port}"
    deadline = time.monotonic() + wait_for_key
    while True:
        keys = registered_keys(tracker_summary(tracker_host, tracker_port, timeout))
        if key in keys or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if key not in keys:
        raise RpcError(f"{where} has no server registered under key {key!r} (registered: {keys or 'none'}); "
                       f"start one (`tensorfold rpc-server --qemu-arm64 --key {key}`) or join a device with TVM's RPC app")
    tracker = connect_tracker(tracker_host, tracker_port, timeout)

    def ask():
        # TrackerSession.request spelled out: it hides the server's address, which tells us
        # whether it is a qemu server started on this machine.
        base.sendjson(tracker._sock, [base.TrackerCode.REQUEST, key, "", 1])
        value = base.recvjson(tracker._sock)
        if value[0] != base.TrackerCode.SUCCESS:
            raise RpcError(f"{where}: request for key {key!r} refused: {value}")
        url, port, match_key = value[1]
        return url, int(port), rpc.connect(url, port, match_key)

    try:
        url, port, session = _with_deadline(f"{where}, key {key!r} (all devices busy?)", timeout, ask)
    finally:
        tracker.close()
    return RemoteSession(session, url, port, key, f"{tracker_host}:{tracker_port}")


def connect_direct(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> RemoteSession:
    from tvm import rpc

    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise RpcError(f"RPC server {host}:{port} is unreachable ({e.strerror or e})") from None
    session = _with_deadline(f"RPC server {host}:{port}", timeout, lambda: rpc.connect(host, port))
    return RemoteSession(session, host, port, "", "")


# ---- processes we start: own process group, pid file, stopped by group -------------------------

@dataclass
class ManagedProcess:
    """A server process started in its own session; `stop()` ends the whole group."""

    name: str
    process: subprocess.Popen
    pid_file: Path
    log: Path
    info: dict[str, Any]

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        stop_group(self.process.pid, grace)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.pid_file.unlink(missing_ok=True)

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def stop_group(pid: int, grace: float = 3.0) -> bool:
    """SIGTERM the process group led by `pid`, then SIGKILL what is left. False if it was gone."""
    # Killing only the parent leaves the RPC workers holding the port (docs/toolchain.md#rpc-and-qemu).
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def spawn(name: str, argv: list[str], info: dict[str, Any], env: dict[str, str] | None = None) -> ManagedProcess:
    directory = state_dir()
    log = directory / f"{name}.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=env)
    pid_file = directory / f"{name}.pid.json"
    pid_file.write_text(json.dumps({**info, "pid": process.pid, "log": str(log)}))
    return ManagedProcess(name, process, pid_file, log, info)


def recorded_processes() -> list[dict[str, Any]]:
    """Pid files of live trackers/servers started here (stale ones are removed)."""
    records = []
    for pid_file in sorted(state_dir().glob("*.pid.json")):
        try:
            record = json.loads(pid_file.read_text())
            os.killpg(record["pid"], 0)
        except (ValueError, KeyError, ProcessLookupError, PermissionError):
            pid_file.unlink(missing_ok=True)
            continue
        records.append({**record, "pid_file": str(pid_file)})
    return records


def started_for_tracker(record: dict[str, Any], port: int) -> bool:
    """Whether a recorded process is the tracker on `port` or a server registered at a tracker on `port`."""
    if record.get("kind") == "tracker":
        return record.get("port") == port
    return str(record.get("tracker", "")).rsplit(":", 1)[-1] == str(port)


def is_local_qemu_server(host: str, port: int) -> bool:
    if host not in ("127.0.0.1", "localhost", "::1"):
        return False
    return any(r.get("kind") == "qemu-arm64-server" and r.get("port") == port for r in recorded_processes())


def _wait_listening(process: subprocess.Popen, host: str, port: int, timeout: float, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RpcError(f"{what} exited with code {process.returncode}; log: {log}\n{_tail(log)}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RpcError(f"{what} did not listen on {host}:{port} within {timeout:g} s; log: {log}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_tracker(host: str = "127.0.0.1", port: int = 9190, timeout: float = 20.0) -> ManagedProcess:
    """A TVM RPC tracker on host:port (loopback by default) in its own process group."""
    if host not in ("127.0.0.1", "localhost"):
        raise RpcError(f"tracker host {host!r}: a tracker started here listens on 127.0.0.1 only")
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        raise RpcError(f"{host}:{port} is already in use (a tracker running? `tensorfold rpc stop`)")
    except OSError:
        pass
    # port_end = port + 1: the tracker must take exactly this port, not the next free one.
    argv = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
            "--port-end", str(port + 1), "--silent"]
    name = f"tracker-{port}"
    managed = spawn(name, argv, {"kind": "tracker", "host": host, "port": port})
    try:
        _wait_listening(managed.process, host, port, timeout, managed.log, f"RPC tracker {host}:{port}")
    except BaseException:
        managed.stop()
        raise
    return managed
