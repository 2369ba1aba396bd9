"""The run folder's lease: one holder at a time, heartbeats, stale and dead holders taken over."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.errors import UserError
from pipeline.io.lease import LEASE_NAME, RunLease


def _lease(out: Path, heartbeat_s: float = 10.0, stale_s: float = 120.0) -> RunLease:
    return RunLease(pafs.LocalFileSystem(), str(out), str(out), heartbeat_s, stale_s, settle_s=0.05)


def _write_holder(out: Path, **fields) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": "2026-01-01T00:00:00+00:00",
              "heartbeat": time.time(), "token": "someone-else"}
    holder.update(fields)
    out.mkdir(parents=True, exist_ok=True)
    (out / LEASE_NAME).write_text(json.dumps(holder))


def test_a_second_holder_is_refused_with_the_first_named(tmp_path) -> None:
    first = _lease(tmp_path / "run").acquire()
    try:
        record = json.loads((tmp_path / "run" / LEASE_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(UserError) as err:
            _lease(tmp_path / "run").acquire()
        msg = str(err.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "heartbeat 0 s ago" in msg
        assert "\n" not in msg
    finally:
        first.release()
    assert not (tmp_path / "run" / LEASE_NAME).exists()
    _lease(tmp_path / "run").acquire().release()  # free again


def test_heartbeat_refreshes_and_release_stops_it(tmp_path) -> None:
    lease = _lease(tmp_path, heartbeat_s=0.05, stale_s=1.0).acquire()
    first = json.loads((tmp_path / LEASE_NAME).read_text())["heartbeat"]
    time.sleep(0.4)
    later = json.loads((tmp_path / LEASE_NAME).read_text())["heartbeat"]
    lease.release()
    assert later - first >= 0.2
    assert not (tmp_path / LEASE_NAME).exists()
    assert not [p for p in tmp_path.iterdir()]  # no temporary files left


def test_stale_lease_of_another_host_is_taken_over_with_a_warning(tmp_path, capsys) -> None:
    _write_holder(tmp_path, host="node-7", pid=4242, heartbeat=time.time() - 30)
    with pytest.raises(UserError, match="host node-7 pid 4242"):
        _lease(tmp_path, stale_s=60).acquire()
    lease = _lease(tmp_path, stale_s=10).acquire()
    try:
        assert "taking over" in capsys.readouterr().err
        assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == lease.me.token
    finally:
        lease.release()


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path, capsys) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_holder(tmp_path, pid=int(proc.stdout))  # fresh heartbeat, but the process has exited
    _lease(tmp_path).acquire().release()
    assert "the process is gone" in capsys.readouterr().err


def test_a_lease_taken_over_is_not_removed_by_its_old_holder(tmp_path) -> None:
    old = _lease(tmp_path).acquire()
    _write_holder(tmp_path, host="node-9", token="new-holder")
    old.release()
    assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == "new-holder"


def _contend(out: str, barrier, results) -> None:
    lease = RunLease(pafs.LocalFileSystem(), out, out, 10.0, 120.0, settle_s=0.05)
    barrier.wait()
    try:
        lease.acquire()
        results.put("won")
        time.sleep(1.0)  # hold it while the others try
        lease.release()
    except UserError:
        results.put("refused")


def test_of_drivers_started_together_exactly_one_wins(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["refused", "refused", "refused", "won"]
