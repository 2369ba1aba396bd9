"""Start and stop a test's own Ray head, touching no other Ray on the machine (never `ray stop`).

The head runs under `ray start --head --block` in its own temporary root: every Ray process it
spawns descends from that command or names that folder on its command line, and only those are
stopped.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.conftest import ROOT


@dataclass
class RayHead:
    proc: subprocess.Popen | None  # the blocking `ray start` (None for a head started elsewhere)
    temp_dir: str
    port: int
    dashboard_port: int  # 0 for a head started without its dashboard

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def private_ports(port: int, dashboard_port: int) -> list[str]:
    """Flags that keep a second head off the fixed ports of another Ray on the machine (the GCS,
    the dashboard unless ``dashboard_port`` is 0, and the dashboard agent's 52365, without which
    `ray job submit` finds no agent)."""
    dashboard = [f"--dashboard-port={dashboard_port}"] if dashboard_port else []
    return [f"--port={port}", *dashboard, f"--dashboard-agent-listen-port={free_port()}"]


def head_command(ray_bin: str, temp_dir: str, port: int, dashboard_port: int) -> list[str]:
    """`ray start --head` on private ports; ``dashboard_port`` 0 starts no dashboard."""
    dashboard = ["--dashboard-host=127.0.0.1"] if dashboard_port else ["--include-dashboard=false"]
    return [ray_bin, "start", "--head", *private_ports(port, dashboard_port), *dashboard, "--node-ip-address=127.0.0.1",
            "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}"]


def start_head(ray_bin: str, env: dict[str, str], cwd: str, timeout: float = 180, dashboard: bool = True) -> RayHead:
    """A blocking head in a fresh short temp root (Unix socket paths must stay under 108 bytes), up once `ray start`
    says so and its ports listen. ``dashboard=False``: no dashboard, so no `ray job submit`; such a head idles at
    4.9-5.7% of a core instead of 7.7-8.8% and is up in 3-5 s instead of 6-7 s (after one job; Ray 2.60, 2 cores)."""
    temp_dir = tempfile.mkdtemp(prefix="rs-ray-", dir="/tmp")
    port, dash = free_port(), (free_port() if dashboard else 0)
    said = Path(temp_dir) / "ray-start.out"
    with said.open("w") as out:
        proc = subprocess.Popen([*head_command(ray_bin, temp_dir, port, dash), "--block"], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.PIPE, text=True)
    head = RayHead(proc, temp_dir, port, dash)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            stop_head(head)
            raise RuntimeError(f"ray start exited with {proc.returncode}: {err[-2000:]}")
        if "Ray runtime started" in said.read_text() and listening(port) and (not dash or listening(dash)):
            return head
        time.sleep(0.3)
    stop_head(head)
    raise RuntimeError(f"ray head not up after {timeout:.0f} s")


def head_processes(head: RayHead) -> list[psutil.Process]:
    """This head's processes: descendants of its `ray start`, and any naming its temp root."""
    found: dict[int, psutil.Process] = {}
    if head.proc is not None:
        try:
            root = psutil.Process(head.proc.pid)
            found.update({p.pid: p for p in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(head.temp_dir in arg for arg in (p.info["cmdline"] or [])):
                found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_and_wait(procs: list[psutil.Process], kill: bool, timeout: float) -> list[psutil.Process]:
    """Send SIGTERM (or SIGKILL) to ``procs``; the ones still running (zombies are done) after ``timeout`` s."""
    for p in procs:
        try:
            p.kill() if kill else p.terminate()
        except psutil.NoSuchProcess:
            pass
    deadline = time.time() + timeout
    while (left := [p for p in procs if _alive(p)]) and time.time() < deadline:
        time.sleep(0.1)
    return left


def stop_head(head: RayHead, grace: float = 15, straggler_grace: float = 3, start_grace: float = 5) -> None:
    """Stop exactly this head. A blocking `ray start` gets SIGTERM first and stops its own processes (~2 s: SIGTERM to
    all of them at once left the GCS and raylet up for over 15 s); it gets ``start_grace`` seconds (after a whole
    suite's jobs one took over 15 s). What is left (a head started elsewhere, workers) gets SIGTERM, and SIGKILL
    after ``straggler_grace`` seconds: a test head has nothing to save."""
    procs = {p.pid: p for p in head_processes(head)}  # while `ray start` lives: its descendants are found through it
    if head.proc is not None and head.proc.poll() is None:
        head.proc.terminate()
        try:
            head.proc.wait(timeout=start_grace)
        except subprocess.TimeoutExpired:
            procs[head.proc.pid] = psutil.Process(head.proc.pid)
        procs.update({p.pid: p for p in head_processes(head)})  # any it started while stopping
    left = _signal_and_wait([p for p in procs.values() if _alive(p)], kill=False, timeout=straggler_grace)
    _signal_and_wait(left, kill=True, timeout=grace)
    if head.proc is not None:
        head.proc.wait(timeout=grace)
        if head.proc.stderr:
            head.proc.stderr.close()
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def start_token_head(tiny_cache: Path, dashboard: bool) -> tuple[RayHead, dict[str, str]]:
    """A test's own head with token authentication, as on a real cluster: (the head, the auth entries a client needs).
    Its processes see the tiny cache, this interpreter's bin folder and no outer RAY_ADDRESS. Stop it with stop_head."""
    bin_dir = str(Path(sys.executable).parent)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = dict(os.environ, **auth, RAY_USAGE_STATS_ENABLED="0", REFEREE_SYNTH_CACHE=str(tiny_cache),
               PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]))
    env.pop("RAY_ADDRESS", None)
    head = start_head(str(Path(bin_dir) / "ray"), env, str(ROOT), dashboard=dashboard)
    return head, auth
