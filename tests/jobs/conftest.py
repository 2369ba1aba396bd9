"""A Ray head shared by the job tests that do not test the local start itself.

Starting a local Ray costs each job run about 8 s; most job tests connect to this head instead
(``RAY_ADDRESS``), exactly as a job does inside ``ray job submit`` on a cluster. Token
authentication is on, as on a real cluster.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.jobs.ray_head import start_head, stop_head


@pytest.fixture(scope="session")
def shared_ray(tiny_cache: Path):
    """Environment entries that point a job at the shared head (``RAY_ADDRESS`` and the auth token)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    full = dict(os.environ, **env, RAY_USAGE_STATS_ENABLED="0", REFEREE_SYNTH_CACHE=str(tiny_cache), PATH=path)
    full.pop("RAY_ADDRESS", None)
    try:
        head = start_head(ray_bin, full, str(ROOT))
    except RuntimeError as err:
        pytest.fail(str(err))
    try:
        yield {**env, "RAY_ADDRESS": head.address,
               "REFEREE_SYNTH_TEST_DASHBOARD": f"http://127.0.0.1:{head.dashboard_port}"}
    finally:
        stop_head(head)  # this head only: other Ray clusters on the machine are left alone
