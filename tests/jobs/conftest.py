"""A Ray head shared by the job tests that do not test the local start itself.

Starting a local Ray costs each job run about 8 s; most job tests connect to this head instead
(``RAY_ADDRESS``), exactly as a job does inside ``ray job submit`` on a cluster. Token
authentication is on, as on a real cluster.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shared_ray(tiny_cache: Path):
    """Environment entries that point a job at the shared head (``RAY_ADDRESS`` and the auth token)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    port, dash = free_port(), free_port()
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    full = dict(os.environ, **env, RAY_USAGE_STATS_ENABLED="0", REFEREE_SYNTH_CACHE=str(tiny_cache), PATH=path)
    full.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats"],
        cwd=ROOT, env=full, capture_output=True, text=True, timeout=180,
    )
    if start.returncode != 0:
        pytest.fail(f"ray start failed: {start.stderr[-2000:]}")
    try:
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "REFEREE_SYNTH_TEST_DASHBOARD": f"http://127.0.0.1:{dash}"}
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=full, capture_output=True, timeout=180)
