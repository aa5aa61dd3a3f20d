"""`tensorfold rpc stop`: which recorded processes it stops (real processes: `sleep`, in their own groups)."""
from __future__ import annotations

import pytest

from tensorfold.cli import main
from tensorfold.targets import rpc


@pytest.fixture
def processes(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORFOLD_CACHE", str(tmp_path))
    started = {
        "tracker-a": rpc.spawn("tracker-a", ["sleep", "60"], {"kind": "tracker", "host": "127.0.0.1", "port": 9301}),
        "server-a": rpc.spawn("server-a", ["sleep", "60"], {"kind": "qemu-arm64-server", "host": "127.0.0.1",
                                                            "port": 9401, "tracker": "127.0.0.1:9301"}),
        "tracker-b": rpc.spawn("tracker-b", ["sleep", "60"], {"kind": "tracker", "host": "127.0.0.1", "port": 9302}),
        "server-b": rpc.spawn("server-b", ["sleep", "60"], {"kind": "qemu-arm64-server", "host": "127.0.0.1",
                                                            "port": 9402, "tracker": "127.0.0.1:9302"}),
    }
    yield started
    for process in started.values():
        process.stop(grace=0.5)


def _alive(processes) -> set[str]:
    for process in processes.values():
        process.process.poll()  # reap a stopped child so it does not linger as a zombie
    return {name for name, process in processes.items() if process.alive()}


def test_stop_ends_the_tracker_on_its_port_and_only_the_servers_registered_there(processes, capsys):
    assert main(["rpc", "stop", "--port", "9301"]) == 0
    assert _alive(processes) == {"tracker-b", "server-b"}
    out = capsys.readouterr().out
    assert "tracker on 127.0.0.1:9301" in out and "qemu-arm64-server on 127.0.0.1:9401" in out
    assert "9302" not in out and "9402" not in out
    assert {r["port"] for r in rpc.recorded_processes()} == {9302, 9402}


def test_stop_all_ends_every_recorded_process(processes):
    assert main(["rpc", "stop", "--all"]) == 0
    assert _alive(processes) == set()
    assert rpc.recorded_processes() == []
