"""The job against a real S3-compatible server (moto's server mode on 127.0.0.1) through pyarrow.fs."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, compbench_prompts
from tests.jobs.ray_head import free_port
from tests.jobs.test_synthesize import SYNTH, _env, _prompts, _run

pytestmark = pytest.mark.slow
BUCKET = "nightly"


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on loopback, started and stopped here; yields the AWS environment."""
    # This interpreter's moto, never another moto_server that happens to be on PATH.
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _client(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def _keys(env: dict[str, str], prefix: str) -> list[str]:
    pages = _client(env).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _get(env: dict[str, str], key: str) -> bytes:
    return _client(env).get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _check_s3_run(env: dict[str, str], prefix: str, rows: int) -> None:
    keys = _keys(env, prefix)
    assert f"{prefix}/run.json" in keys and f"{prefix}/summary.json" in keys
    assert not [k for k in keys if ".tmp-" in k], "a temporary name is visible"
    markers = [k for k in keys if k.endswith(".stats.json")]
    seen = []
    for marker in markers:
        base = marker[: -len(".stats.json")]
        stats = json.loads(_get(env, marker))
        tar_bytes = _get(env, f"{base}.tar")
        assert len(tar_bytes) == stats["tar_bytes"]
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            names = tar.getnames()
        side = pq.read_table(io.BytesIO(_get(env, f"{base}.parquet"))).to_pylist()
        accepted = {r["key"] for r in side if r["status"] == "accepted"}
        assert {n.split(".")[0] for n in names} == accepted
        seen += [(r["row"], r["sample_index"]) for r in side]
    assert sorted(seen) == [(r, 0) for r in range(rows)]


def test_job_writes_to_s3_and_resumes_after_driver_kill(tmp_path, tiny_cache, shared_ray, s3_server) -> None:
    _client(s3_server).create_bucket(Bucket=BUCKET)
    prompts = compbench_prompts("color_val", 10)
    path = _prompts(tmp_path / "p.parquet", prompts)
    output = f"s3://{BUCKET}/runs/night1"
    env = _env(tiny_cache, **shared_ray, **s3_server)
    args = ["--prompts", str(path), "--output", output, "--num-actors", "1", "--shard-size", "2"]
    cmd = [sys.executable, SYNTH, "--config", "configs/tiny.yaml", "--no-progress", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len([k for k in _keys(s3_server, "runs/night1/shards")
                                          if k.endswith(".stats.json")]) < 2:
        time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [k for k in _keys(s3_server, "runs/night1/shards") if k.endswith(".stats.json")]
    assert 2 <= len(done) < 5
    time.sleep(3)
    again = _run(args, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming:" in again.stderr
    _check_s3_run(s3_server, "runs/night1", len(prompts))


def test_unreachable_bucket_is_one_line(tmp_path, tiny_cache, s3_server) -> None:
    path = _prompts(tmp_path / "p.parquet", ["a red cube"])
    env = _env(tiny_cache, **s3_server)
    proc = _run(["--prompts", str(path), "--output", "s3://no-such-bucket/run"], env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: output s3://no-such-bucket/run"), proc.stderr


@pytest.mark.parametrize("uri", ["s3://no-such-bucket/p.parquet", "s3://no-such-bucket/prompts/"])
def test_prompts_in_a_missing_bucket_are_one_line(tmp_path, tiny_cache, s3_server, uri) -> None:
    proc = _run(["--prompts", uri, "--output", str(tmp_path / "run")], _env(tiny_cache, **s3_server), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: prompts: {uri}"), proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_appended_night_on_s3_killed_and_rerun_adds_every_new_sample_once(tmp_path, tiny_cache, shared_ray,
                                                                             s3_server) -> None:
    """Night 1 on 4 prompts; night 2 on 10 (the same 4 first) is SIGKILLed after its first new shard and rerun:
    night 1's objects keep their bytes, every prompt has its sample once, shards.txt lists all five shards."""
    import pyarrow as pa

    _client(s3_server).create_bucket(Bucket=BUCKET)
    prompts = compbench_prompts("shape_val", 10)
    ids = [f"s{i}" for i in range(10)]
    one, two = tmp_path / "n1.parquet", tmp_path / "n2.parquet"
    pq.write_table(pa.table({"prompt": prompts[:4], "prompt_id": ids[:4]}), one)
    pq.write_table(pa.table({"prompt": prompts, "prompt_id": ids}), two)
    output, prefix = f"s3://{BUCKET}/runs/grow", "runs/grow"
    env = _env(tiny_cache, **shared_ray, **s3_server)
    base = ["--output", output, "--num-actors", "1", "--shard-size", "2"]
    assert _run(["--prompts", str(one), *base], env).returncode == 0
    night1 = {k: _get(s3_server, k) for k in _keys(s3_server, f"{prefix}/shards/")}
    cmd = [sys.executable, SYNTH, "--config", "configs/tiny.yaml", "--no-progress", "--prompts", str(two), *base]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len([k for k in _keys(s3_server, f"{prefix}/shards/")
                                          if k.endswith(".stats.json")]) < 3:
        time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    assert len([k for k in _keys(s3_server, f"{prefix}/shards/") if k.endswith(".stats.json")]) < 5
    again = _run(["--prompts", str(two), *base], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {k: _get(s3_server, k) for k in night1} == night1
    _check_s3_run(s3_server, prefix, len(prompts))
    side = []
    for k in _keys(s3_server, f"{prefix}/shards/"):
        if k.endswith(".parquet"):
            side += pq.read_table(io.BytesIO(_get(s3_server, k))).to_pylist()
    assert sorted(r["prompt_id"] for r in side) == sorted(ids)
    assert {r["night"] for r in side if r["prompt_id"] in ids[:4]} == {1}
    listed = [u for u in _get(s3_server, f"{prefix}/shards.txt").decode().splitlines() if not u.startswith("#")]
    assert listed == [f"s3://{BUCKET}/{prefix}/shards/{s:06d}.tar" for s in range(5)]
    history = json.loads(_get(s3_server, f"{prefix}/run.json"))["history"]
    assert [h["night"] for h in history] == [1, 2, 3] and history[1]["new_shards"] == [2, 3, 4]
