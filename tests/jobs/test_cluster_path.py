"""README's cluster path as printed (a local head, token auth, `ray job submit`), and test heads
that stop only themselves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, copy_project
from tests.jobs.ray_head import RayHead, free_port, head_processes, listening, start_head, stop_head
from tests.jobs.test_synthesize import _check_complete_run

pytestmark = pytest.mark.slow
MARK = "<!-- tested: tests/jobs/test_cluster_path.py runs this block -->"


def readme_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split(MARK, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return block.replace("\\\n", " ").splitlines()


def _clean_env(home: Path, tiny_cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return dict(env, HOME=str(home), PATH=path, REFEREE_SYNTH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1",
                RAY_USAGE_STATS_ENABLED="0")


def _retry_while_agent_starts(cmd: str) -> str:
    """Seconds after `ray start`, the job agent may not be up yet and Ray says "try again later":
    retry as a person would, on that answer only."""
    return (f"for i in $(seq 60); do if out=$({cmd} 2>&1); then echo \"$out\"; break; fi; "
            "echo \"$out\" | grep -q 'No available agent' || { echo \"$out\"; exit 1; }; sleep 2; done")


def test_readme_local_head_commands_work_as_printed(tmp_path, tiny_cache) -> None:
    """Run verbatim, but for this test's own ports and temp root (a developer's Ray may hold the
    defaults) and `ray stop`, which would stop every Ray of the user: the head is stopped by its root."""
    lines = readme_block()
    assert any(x.startswith("export RAY_AUTH_MODE=token") for x in lines) and "ray stop" in lines
    # A short temp root: Unix socket paths under it must stay under 108 bytes.
    head = RayHead(None, tempfile.mkdtemp(prefix="rs-readme-", dir="/tmp"), free_port(), free_port())
    script = ["set -euo pipefail"]
    for line in lines:
        if line.strip() == "ray stop":
            continue
        line = line.replace("ray start --head", f"ray start --head --port={head.port} "
                            f"--dashboard-port={head.dashboard_port} --temp-dir={head.temp_dir} "
                            "--node-ip-address=127.0.0.1 --num-cpus=2 --disable-usage-stats")
        line = line.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{head.dashboard_port}")
        script.append(_retry_while_agent_starts(line) if line.startswith("ray job submit") else line)
    repo, home = copy_project(tmp_path / "repo"), tmp_path / "home"
    home.mkdir()
    try:
        proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=repo, env=_clean_env(home, tiny_cache),
                              capture_output=True, text=True, timeout=420)
    finally:
        stop_head(head)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    assert (home / ".ray" / "auth_token").is_file()
    out = repo / "demo-out" / "local-head" / "run"
    _check_complete_run(out, {(r, 0) for r in range(4)})
    assert json.loads((out / "summary.json").read_text())["shards_completed"] >= 1


def test_a_test_head_stops_without_touching_another_ray(tmp_path, tiny_cache) -> None:
    """A Ray head started outside (plain `ray start --head`, as a developer would) outlives a test
    head's start and stop, and the test head leaves no process behind."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = dict(_clean_env(tmp_path, tiny_cache), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    outsider = RayHead(None, tempfile.mkdtemp(prefix="rs-outsider-", dir="/tmp"), free_port(), free_port())
    started = subprocess.run(
        [ray_bin, "start", "--head", f"--port={outsider.port}", f"--dashboard-port={outsider.dashboard_port}",
         f"--temp-dir={outsider.temp_dir}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         "--num-cpus=1", "--disable-usage-stats"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        before = {p.pid for p in head_processes(outsider)}
        assert before and listening(outsider.port)
        ours = start_head(ray_bin, env, str(ROOT))
        mine = head_processes(ours)
        assert mine and not {p.pid for p in mine} & before
        stop_head(ours)
        assert not [p for p in mine if p.is_running() and p.status() != "zombie"]
        assert before <= {p.pid for p in head_processes(outsider)} and listening(outsider.port)
        status = subprocess.run([ray_bin, "status", "--address", outsider.address], env=env,
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and re.search(r"Active:", status.stdout), status.stderr[-1500:]
    finally:
        stop_head(outsider)
