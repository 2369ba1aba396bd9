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
from pipeline.io.lease import LEASE_NAME, LeaseFence, LeaseLost, RunLease


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


# ---- issue 33: a lost lease is lost for good; odd lease files are one line ------------------------------------

def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_take_over_found_by_verify_before_the_heartbeat_says_the_lease_was_lost(tmp_path) -> None:
    lease = _lease(tmp_path, heartbeat_s=60.0, stale_s=120.0).acquire()  # no beat runs during the test
    try:
        _write_holder(tmp_path, host="node-b", token="driver-b")
        with pytest.raises(LeaseLost, match="this driver lost the run lease .*host node-b"):
            lease.verify()
        with pytest.raises(LeaseLost, match="lost the run lease"):
            lease.ensure_held()  # and it stays lost
    finally:
        lease.release()
    assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == "driver-b"  # not removed: not ours


def test_the_heartbeats_warning_never_comes_after_the_drivers_error(tmp_path, capsys) -> None:
    # The driver's last stderr line is its error: whichever of verify and the heartbeat finds the loss first,
    # nothing is printed once verify has raised (CI once saw the heartbeat's warning land after the error).
    for attempt in range(20):
        out = tmp_path / str(attempt)
        lease = _lease(out, heartbeat_s=0.005, stale_s=1.0).acquire()
        try:
            time.sleep(0.005 * (attempt % 4))  # the beat and the take-over meet at different moments
            for _ in range(100):  # a beat that read the lease just before may write it back once: take it again
                _write_holder(tmp_path / "next", host="node-b", token="driver-b")
                os.replace(tmp_path / "next" / LEASE_NAME, out / LEASE_NAME)  # atomic, as a take-over writes it
                try:
                    lease.verify()
                except LeaseLost as err:
                    assert "host node-b" in str(err)
                    break
            else:
                pytest.fail("verify never saw the take-over")
            said = capsys.readouterr().err
            time.sleep(0.05)  # ten beat periods
            assert capsys.readouterr().err == "", f"printed after verify raised (attempt {attempt}); before: {said}"
        finally:
            lease.release()


@pytest.mark.parametrize("how", ["taken over", "removed"])
def test_a_driver_that_lost_its_lease_never_writes_it_again(tmp_path, how) -> None:
    lease = _lease(tmp_path, heartbeat_s=0.05, stale_s=1.0).acquire()
    try:
        lease.verify()  # ours: no error
        if how == "taken over":
            _write_holder(tmp_path, host="node-b", token="driver-b")
        else:
            (tmp_path / LEASE_NAME).unlink()
        assert _wait_for(lambda: lease.lost is not None)
        with pytest.raises(LeaseLost, match=how):
            lease.ensure_held()
        with pytest.raises(LeaseLost):
            lease.verify()
        time.sleep(0.3)  # several beat periods: the old holder must not come back
        if how == "taken over":
            assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == "driver-b"
        else:
            assert not (tmp_path / LEASE_NAME).exists()
    finally:
        lease.release()
    if how == "taken over":  # release leaves the new holder's lease alone
        assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == "driver-b"


def test_the_fence_refuses_once_the_lease_names_another_token(tmp_path) -> None:
    lease = _lease(tmp_path).acquire()
    try:
        fence = LeaseFence.for_run(pafs.LocalFileSystem(), str(tmp_path), lease.me.token)
        fence.check()
        _write_holder(tmp_path, token="driver-b")
        with pytest.raises(LeaseLost, match="not this driver's"):
            fence.check()
        (tmp_path / LEASE_NAME).unlink()
        with pytest.raises(LeaseLost, match="no lease"):
            fence.check()
    finally:
        lease.release()


def test_a_fifo_or_folder_as_the_lease_is_one_line_never_a_hang(tmp_path) -> None:
    os.mkfifo(tmp_path / LEASE_NAME)  # any open of it would block until a writer comes
    outcome: list[BaseException | None] = []

    def take() -> None:
        try:
            _lease(tmp_path).acquire().release()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            outcome.append(err)

    import threading

    worker = threading.Thread(target=take, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "acquire blocked on a FIFO lease"
    assert isinstance(outcome[0], UserError) and "not a regular file" in str(outcome[0])
    (tmp_path / LEASE_NAME).unlink()
    (tmp_path / LEASE_NAME).mkdir()
    lease = _lease(tmp_path)
    with pytest.raises(UserError, match="not a regular file; remove it"):
        lease.acquire()
    lease.release()  # no second error from the clean-up


@pytest.mark.parametrize("fields", [{"pid": "abc"}, {"pid": 2**70}, {"pid": -5}, {"heartbeat": None},
                                    {"heartbeat": "soon"}, {"heartbeat": True}, {"host": 7}])
def test_a_lease_with_fields_of_the_wrong_type_counts_as_torn(tmp_path, fields, capsys) -> None:
    _write_holder(tmp_path, **fields)
    lease = _lease(tmp_path).acquire()  # no TypeError / OverflowError: a record nobody wrote whole
    try:
        assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == lease.me.token
        assert "malformed" in capsys.readouterr().err
    finally:
        lease.release()


@pytest.mark.parametrize("heartbeat", [time.time() + 10_000, float("nan"), float("inf")], ids=["ahead", "nan", "inf"])
def test_a_heartbeat_off_this_hosts_clock_is_aged_by_the_lease_files_last_change(tmp_path, heartbeat) -> None:
    _write_holder(tmp_path, host="node-ahead", pid=4242, heartbeat=heartbeat)
    with pytest.raises(UserError, match="not on this host's clock") as err:  # just written: a live holder
        _lease(tmp_path, stale_s=60).acquire()
    assert "\n" not in str(err.value)
    old = time.time() - 120
    os.utime(tmp_path / LEASE_NAME, (old, old))  # unchanged for two minutes on the storage's clock
    lease = _lease(tmp_path, stale_s=60).acquire()
    lease.release()


def test_a_full_disk_at_start_leaves_no_temporary_lease(tmp_path) -> None:
    code = (
        "import resource, signal, sys\n"
        "import pyarrow.fs as pafs\n"
        "from pipeline.io.lease import RunLease\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))  # writes past 16 bytes fail (EFBIG), as on a full disk\n"
        "try:\n"
        f"    RunLease(pafs.LocalFileSystem(), {str(tmp_path)!r}, 'out', 10.0, 120.0).acquire()\n"
        "except OSError as err:\n"
        "    sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3])))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
