"""The distributed job end to end: real local Ray, tiny models, real tar and Parquet files."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.models.tiny import TINY_LAYOUT_VERSION
from tests.conftest import ROOT, compbench_prompts

pytestmark = pytest.mark.slow
SYNTH = str(ROOT / "jobs" / "synthesize.py")


def _env(tiny_cache: Path, **extra: str) -> dict[str, str]:
    # This interpreter's bin folder first, as in an activated virtualenv (`ray`, `python`).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, REFEREE_SYNTH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               PATH=path)
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    # One actor unless a test asks for more (a later --num-actors wins): each actor costs ~7 CPU-s of imports and
    # model loading, most of a tiny run, and the tests share 2 cores.
    cmd = [sys.executable, SYNTH, "--config", "configs/tiny.yaml", "--no-progress", "--num-actors", "1", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _killed_after_first_shard_then_resumed(
    args: list[str], one: Path, env: dict[str, str]
) -> subprocess.CompletedProcess:
    """Run on one actor, SIGKILL the driver once a shard is published, rerun; the rerun's process."""
    cmd = [sys.executable, SYNTH, "--config", "configs/tiny.yaml", "--no-progress", *args, "--output", str(one),
           "--num-actors", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((one / "shards").glob("*.stats.json")):
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list((one / "shards").glob("*.stats.json"))) < 3, "kill landed too late to test a resume"
    time.sleep(2)
    again = _run([*args, "--output", str(one), "--num-actors", "1"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    return again


def _prompts(path: Path, prompts: list, **cols) -> Path:
    pq.write_table(pa.table({"prompt": prompts, **cols}), path)
    return path


def _sidecars(out: Path) -> list[dict]:
    rows = []
    for f in sorted((out / "shards").glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def _tar_samples(out: Path) -> dict[str, dict]:
    import webdataset as wds

    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]  # as users glob: accepted samples only
    samples = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        samples[s["__key__"]] = s
    return samples


def _check_complete_run(out: Path, expected: set[tuple[int, int]]) -> list[dict]:
    """Every (row, sample) exactly once; accepted ones in a tar with image, caption and metadata."""
    from PIL import Image

    side = _sidecars(out)
    got = [(r["row"], r["sample_index"]) for r in side]
    assert len(got) == len(set(got)), "a sample was written twice"
    assert set(got) == expected
    keys = [r["key"] for r in side]
    assert all(k.isdigit() for k in keys) and len(keys) == len(set(keys))
    tars = _tar_samples(out)
    accepted = {r["key"]: r for r in side if r["status"] == "accepted"}
    assert set(tars) == set(accepted)
    for key, s in tars.items():
        assert {"png", "txt", "json"} <= set(s)
        assert Image.open(io.BytesIO(s["png"])).size == (64, 64)
        meta = json.loads(s["json"])
        assert s["txt"].decode() == accepted[key]["prompt"] == meta["prompt"]
        assert meta["vqa_score"] > meta["threshold"]  # GORS: strictly greater
    for r in side:
        if r["status"] == "rejected":
            assert r["vqa_score"] <= r["threshold"]
    n_shards = len(list((out / "shards").glob("*.parquet")))
    assert len(list((out / "shards").glob("*.stats.json"))) == n_shards
    return side


def test_end_to_end_two_actors_with_bad_rows(tmp_path, tiny_cache, shared_ray) -> None:
    good = compbench_prompts("color_val", 7)
    prompts = good[:3] + [None, "", "   ", "x" * 1001] + good[3:] + [good[0]]
    ids = [f"id{i}" for i in range(len(prompts) - 1)] + ["id0"]  # last one duplicates id0
    # Tiny-model scores are meaningless; per-category thresholds make the accept/reject split certain.
    cats = ["color", "shape"] * 6
    path = _prompts(tmp_path / "p.parquet", prompts, prompt_id=ids, category=cats)
    out = tmp_path / "run"
    job = ["--prompts", str(path), "--output", str(out), "--num-actors", "2", "--shard-size", "3",
           "--samples-per-prompt", "2", "--set", "filter.thresholds={color: 0.0, shape: 1.0}"]
    proc = _run(job, _env(tiny_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Started a local Ray instance" in proc.stderr and "dashboard at" in proc.stderr
    assert "http://127.0.0.1:" in proc.stderr  # the local dashboard listens on loopback only
    bad = {3, 4, 5, 6, 11}
    expected = {(r, k) for r in range(len(prompts)) if r not in bad for k in range(2)} | {(r, 0) for r in bad}
    side = _check_complete_run(out, expected)
    status = {r["row"]: r for r in side if r["sample_index"] == 0}
    assert status[3]["error"] == "prompt is null" and status[4]["error"] == "prompt is empty"
    assert status[5]["error"] == "prompt is whitespace only" and "1001 characters" in status[6]["error"]
    assert status[11]["error"].startswith("duplicate prompt_id")
    assert all(status[r]["status"] == "invalid_input" for r in bad)
    made = [r for r in side if r["row"] not in bad]
    assert {r["status"] for r in made if r["category"] == "color"} == {"accepted"}
    assert {r["status"] for r in made if r["category"] == "shape"} == {"rejected"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_completed"] == summary["shards_total"] == 4
    assert summary["samples"] == len(side) and summary["invalid_input"] == 5
    run = json.loads((out / "run.json").read_text())
    assert run["input"]["total_rows"] == len(prompts) and run["num_shards"] == 4

    # Rerun (on the shared head: the local Ray was tested above): everything complete, nothing rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = _run(job, _env(tiny_cache, **shared_ray))
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == mtimes

    # A different config on the same output is refused with one line, unless forced.
    changed = _run(["--prompts", str(path), "--output", str(out), "--shard-size", "3", "--samples-per-prompt", "2",
                    "--threshold", "0.5"], _env(tiny_cache))
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines()[-1].startswith("error: output ")
    assert "--force" in changed.stderr and "Traceback" not in changed.stderr


def test_driver_sigkill_then_resume(tmp_path, tiny_cache, shared_ray) -> None:
    prompts = compbench_prompts("shape_val", 12)
    path = _prompts(tmp_path / "p.parquet", prompts)
    out = tmp_path / "run"
    args = ["--prompts", str(path), "--output", str(out), "--num-actors", "1", "--shard-size", "2"]
    cmd = [sys.executable, SYNTH, "--config", "configs/tiny.yaml", "--no-progress", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tiny_cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "shards").glob("*.stats.json"))) < 2:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in (out / "shards").glob("*.stats.json"))
    assert 2 <= len(done_before) < 6, "kill landed too late to test a resume"
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()
            if p.name.split(".")[0] + ".stats.json" in done_before}
    time.sleep(3)  # let the orphaned local Ray notice its driver is gone
    again = _run(args, _env(tiny_cache, **shared_ray))  # the resume needs no Ray of its own
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming:" in again.stderr
    _check_complete_run(out, {(r, 0) for r in range(len(prompts))})
    for name, mtime in kept.items():
        assert (out / "shards" / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"


@pytest.mark.parametrize("hook", ["REFEREE_SYNTH_KILL_ACTOR_ON_SHARD", "REFEREE_SYNTH_RAISE_ON_SHARD"])
def test_actor_death_or_error_mid_shard_is_retried(tmp_path, tiny_cache, shared_ray, hook) -> None:
    path = _prompts(tmp_path / "p.parquet", compbench_prompts("texture_val", 6))
    out = tmp_path / "run"
    proc = _run(["--prompts", str(path), "--output", str(out), "--num-actors", "2", "--shard-size", "2"],
                _env(tiny_cache, **shared_ray, **{hook: "1:1"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_complete_run(out, {(r, 0) for r in range(6)})
    assert json.loads((out / "summary.json").read_text())["retries"] == 1


def test_shard_failing_every_retry_exits_1_then_rerun_completes(tmp_path, tiny_cache, shared_ray) -> None:
    path = _prompts(tmp_path / "p.parquet", compbench_prompts("color_val", 4))
    out = tmp_path / "run"
    args = ["--prompts", str(path), "--output", str(out), "--shard-size", "2", "--set", "job.max_shard_retries=1"]
    proc = _run(args, _env(tiny_cache, **shared_ray, REFEREE_SYNTH_KILL_ACTOR_ON_SHARD="1:5"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "000001" in proc.stderr.strip().splitlines()[-1]
    assert not (out / "shards" / "000001.stats.json").exists()
    again = _run(args, _env(tiny_cache, **shared_ray))
    assert again.returncode == 0, again.stderr[-3000:]
    _check_complete_run(out, {(r, 0) for r in range(4)})


def _missing(p: Path) -> Path:
    return p / "missing.parquet"


def _not_parquet(p: Path) -> Path:
    (p / "x.parquet").write_text("hello")
    return p / "x.parquet"


def _no_prompt_column(p: Path) -> Path:
    pq.write_table(pa.table({"text": ["a"]}), p / "t.parquet")
    return p / "t.parquet"


def _empty_table(p: Path) -> Path:
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), p / "e.parquet")
    return p / "e.parquet"


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_missing, "no such file or folder"),
        (_not_parquet, "not a readable Parquet file"),
        (_no_prompt_column, "no 'prompt' column"),
        (_empty_table, "no prompt rows"),
    ],
)
def test_input_file_errors_exit_2_with_one_line(tmp_path, tiny_cache, make, needle) -> None:
    proc = _run(["--prompts", str(make(tmp_path)), "--output", str(tmp_path / "run")], _env(tiny_cache), timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error: "), proc.stderr


def test_bad_config_override_exits_2(tmp_path, tiny_cache) -> None:
    path = _prompts(tmp_path / "p.parquet", ["a red cube"])
    proc = _run(["--prompts", str(path), "--output", str(tmp_path / "run"), "--set", "sds.cfg=3"], _env(tiny_cache))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: " + proc.stderr.strip().split("error: ", 1)[1]
    ] and "unknown key 'sds.cfg'" in proc.stderr


def test_cluster_file_validates_against_rays_schema() -> None:
    import jsonschema
    import ray
    import yaml

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    # No dashboard or client port opened beyond localhost.
    head_cmds = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds


def test_never_more_actors_than_shards_to_do() -> None:
    """A resumed run or a short night with fewer shards left than --num-actors starts one actor per shard:
    the others would only load the models (on a cluster, GPU time) and wait."""
    from jobs.synthesize import _pool_size
    from pipeline.config_loading import load_config, preset_path

    cfg = load_config(preset_path("tiny"), ["job.num_actors=4", "job.gpus_per_actor=0.5"])
    assert _pool_size(cfg, local=False, shards=1) == (1, 0.5)
    assert _pool_size(cfg, local=False, shards=3) == (3, 0.5)
    assert _pool_size(cfg, local=False, shards=40) == (4, 0.5)


def test_driver_plans_without_loading_model_libraries(tmp_path) -> None:
    """The driver names the models and plans the shards without torch or transformers (about 4 s
    of imports per job); the actors resolve and build the models. The cache folder stays untouched."""
    path = _prompts(tmp_path / "p.parquet", ["a red cube", "a blue ball"])
    cache = tmp_path / "empty-cache"
    code = (
        "import json, sys\n"
        "from jobs.synthesize import _plan, build_parser, config_from_args\n"
        "args = build_parser().parse_args(sys.argv[1:])\n"
        "plan = _plan(args, config_from_args(args))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'kornia') if m in sys.modules)\n"
        "print(json.dumps({'ids': plan['model_ids'], 'shards': len(plan['todo']), 'heavy': heavy}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "--prompts", str(path), "--output", str(tmp_path / "run"),
         "--config", "configs/tiny.yaml", "--set", f"models.tiny_cache_dir={cache}", "--shard-size", "1"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["heavy"] == []
    assert got["shards"] == 2
    assert got["ids"] == {k: f"{TINY_LAYOUT_VERSION}-seed0/{k}" for k in ("stable_diffusion", "referee", "vqa")}
    assert not cache.exists()


def test_missing_converted_vqa_checkpoint_stops_the_driver_before_any_model_work(tmp_path) -> None:
    """The paper preset scores with the converted 480-px checkpoint: without it the job says how to
    make it, in one line, exit 2, before Ray, actors or torch, and leaves no run folder behind."""
    path = _prompts(tmp_path / "p.parquet", ["a red cube"])
    missing, out = tmp_path / "no-vqa", tmp_path / "run"
    args = ["--prompts", str(path), "--output", str(out), "--config", "configs/paper.yaml", "--no-progress",
            "--set", f"models.vqa={missing}"]
    proc = subprocess.run([sys.executable, SYNTH, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: models.vqa")
    assert f"python jobs/convert_checkpoints.py blip-vqa --checkpoint model_base_vqa_capfilt_large.pth " \
           f"--output {missing}" in lines[0]
    assert not out.exists()
    code = (
        "import sys\n"
        "from jobs.synthesize import _plan, build_parser, config_from_args\n"
        "from pipeline.errors import UserError\n"
        "args = build_parser().parse_args(sys.argv[1:])\n"
        "try:\n    _plan(args, config_from_args(args))\nexcept UserError:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'kornia', 'ray') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_run_json_and_summary_record_the_scorers_exactness(tmp_path, tiny_cache, shared_ray) -> None:
    path = _prompts(tmp_path / "p.parquet", ["a red cube"])
    out = tmp_path / "run"
    proc = _run(["--prompts", str(path), "--output", str(out)], _env(tiny_cache, **shared_ray))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run, summary = (json.loads((out / name).read_text()) for name in ("run.json", "summary.json"))
    assert run["scorer"] == summary["scorer"]
    record = run["scorer"]
    assert record["exact"] is False and any("tiny random-weight" in d for d in record["deviations"])
    assert record["vqa_weights"] == run["model_ids"]["vqa"] and record["spacy_version"]
    assert record["spacy_model"].startswith("en_core_web_sm")


# ---- accept-until-target, cost accounting, --plan (issue 16) -----------------------------------------

# Device time differs run to run, and a resumed shard records the invocation that made it (run.json history);
# everything else must not differ.
_VOLATILE = ("seconds", "score_seconds", "night")


def _stable(rows: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k not in _VOLATILE} for r in rows), key=lambda r: r["key"])


def _per_prompt(side: list[dict]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for r in sorted(side, key=lambda r: (r["row"], r["sample_index"])):
        out.setdefault(r["row"], []).append(r["status"])
    return out


def test_target_threshold_zero_and_unreachable(tmp_path, tiny_cache, shared_ray) -> None:
    """Threshold 0: exactly 2 accepted and 2 samples per valid prompt; a threshold no score reaches:
    5 samples each, exit 0, every prompt listed short. summary.json: seconds per accepted, per category."""
    prompts = compbench_prompts("color_val", 3) + [None]
    path = _prompts(tmp_path / "p.parquet", prompts, category=["color", "shape", "color", "color"])
    base = ["--prompts", str(path), "--num-actors", "1", "--shard-size", "2", "--target-accepted", "2",
            "--max-samples", "5", "--gpu-hour-price", "3.6"]
    easy = _run([*base, "--output", str(tmp_path / "easy"), "--threshold", "0"], _env(tiny_cache, **shared_ray))
    assert easy.returncode == 0, easy.stderr[-3000:]
    side = _check_complete_run(tmp_path / "easy", {(r, k) for r in range(3) for k in range(2)} | {(3, 0)})
    assert _per_prompt(side)[0] == ["accepted"] * 2
    summary = json.loads((tmp_path / "easy" / "summary.json").read_text())
    assert summary["accepted"] == 6 and summary["short_prompts_total"] == 0 and summary["target_accepted"] == 2
    assert summary["seconds_per_accepted"] == pytest.approx(summary["device_seconds"] / 6, rel=1e-3)
    assert summary["cost_per_accepted"] == pytest.approx(summary["seconds_per_accepted"] / 1000, rel=1e-2)
    cats = summary["categories"]
    assert set(cats) == {"color", "shape"} and cats["color"]["accepted"] == 4 and cats["shape"]["prompts"] == 1
    assert cats["color"]["acceptance_rate"] == 1.0 and cats["color"]["seconds_per_accepted"] > 0
    assert all(r["seconds"] > r["score_seconds"] > 0 for r in side if r["status"] == "accepted")

    hard = _run([*base, "--output", str(tmp_path / "hard"), "--threshold", "1"], _env(tiny_cache, **shared_ray))
    assert hard.returncode == 0, hard.stderr[-3000:]
    side = _check_complete_run(tmp_path / "hard", {(r, k) for r in range(3) for k in range(5)} | {(3, 0)})
    summary = json.loads((tmp_path / "hard" / "summary.json").read_text())
    assert summary["accepted"] == 0 and summary["seconds_per_accepted"] is None
    short = summary["short_prompts"]
    assert [i["row"] for i in short["color"]] == [0, 2] and [i["row"] for i in short["shape"]] == [1]
    assert all(i["short_by"] == 2 and i["tried"] == 5 and i["accepted"] == 0 for v in short.values() for i in v)
    assert "3 prompt(s) short" in hard.stderr


def test_target_refill_is_the_same_on_two_actors_one_actor_and_after_a_sigkill(tmp_path, tiny_cache,
                                                                               shared_ray) -> None:
    """Refills (shape prompts never accepted, color always) mix prompts in batches; the records and the
    accepted images do not depend on the actor count, and a killed run resumed gives the same."""
    prompts = compbench_prompts("shape_val", 6)
    path = _prompts(tmp_path / "p.parquet", prompts, category=["color", "shape"] * 3)
    args = ["--prompts", str(path), "--shard-size", "2", "--target-accepted", "2", "--max-samples", "4",
            "--set", "filter.thresholds={color: 0.0, shape: 1.0}"]
    two = _run([*args, "--output", str(tmp_path / "two"), "--num-actors", "2"], _env(tiny_cache, **shared_ray))
    assert two.returncode == 0, two.stderr[-3000:]
    expected = {(r, k) for r in range(6) for k in range(2 if r % 2 == 0 else 4)}
    side_two = _check_complete_run(tmp_path / "two", expected)

    one = tmp_path / "one"
    _killed_after_first_shard_then_resumed(args, one, _env(tiny_cache, **shared_ray))
    side_one = _check_complete_run(one, expected)
    assert _stable(side_one) == _stable(side_two)
    images = [{k: s["png"] for k, s in _tar_samples(out).items()} for out in (tmp_path / "two", one)]
    assert images[0] == images[1] and len(images[0]) == 6


def test_plan_writes_plan_json_without_torch_or_a_run_folder(tmp_path) -> None:
    path = _prompts(tmp_path / "p.parquet", ["a red cube", "a blue ball", None], category=["color", "shape", "color"])
    out = tmp_path / "run"
    code = (
        "import sys\n"
        "from jobs.synthesize import main\n"
        "rc = main(sys.argv[1:])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'kornia', 'ray') if m in sys.modules)\n"
        "print('HEAVY', heavy, rc)\n"
    )
    args = ["--plan", "--prompts", str(path), "--output", str(out), "--config", "configs/paper.yaml",
            "--target-accepted", "2", "--max-samples", "5", "--gpu-hour-price", "2"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY [] 0" in proc.stdout and "GPU-hours" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["valid_prompts"] == 2 and plan["invalid_rows"] == 1 and plan["shards"] == 1
    assert plan["source"]["kind"] == "flop_floor" and plan["source"]["efficiency"] == 0.5
    # p = 0.5, K = 2, M = 5: E[attempts] = 1 + 1 + 3/4 + 1/2 + 5/16 per prompt.
    assert plan["expected_samples"] == pytest.approx(2 * 3.5625, abs=0.1)
    assert plan["cost"] == pytest.approx(plan["gpu_hours"] * 2, abs=0.01)

    # From an earlier run's summary: its per-category rates and seconds.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    cats = {"color": {"samples": 10, "accepted": 10, "seconds": 20.0}, "shape": {"samples": 10, "accepted": 0,
                                                                               "seconds": 40.0}}
    (earlier / "summary.json").write_text(json.dumps({"categories": cats}))
    proc = subprocess.run([sys.executable, SYNTH, *args, "--from-run", str(earlier)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((out / "plan.json").read_text())["categories"]
    assert plan["color"]["expected_samples"] == 2 and plan["color"]["expected_short_prompts"] == 0
    assert plan["shape"]["expected_samples"] == 5
    assert plan["shape"]["gpu_hours"] == pytest.approx(5 * 4 / 3600, abs=1e-4)
    bad = subprocess.run([sys.executable, SYNTH, *args, "--from-run", str(tmp_path / "nothing")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --from-run")
