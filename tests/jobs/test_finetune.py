"""``referee-synth finetune`` end to end on the tiny models (CPU): kill and resume, Ray Train vs one process,
and sampling from the result with ``--generator sd_sampling --lora``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.jobs.test_synthesize import _env, _prompts, _run, _sidecars
from tests.pipeline.finetune.runs import write_run

pytestmark = pytest.mark.slow

FINETUNE = str(ROOT / "jobs" / "finetune.py")


def _finetune(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, FINETUNE, "--config", "configs/tiny.yaml", "--no-progress", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "run"
    write_run(out, shards=1, per_shard=4)
    return out


@pytest.fixture(scope="module")
def uninterrupted(run_folder, tiny_cache) -> Path:
    out = run_folder.parent / "uninterrupted"
    proc = _finetune(["--run", str(run_folder), "--output", str(out)], _env(tiny_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_output_is_a_lora_with_card_and_loss_curve(uninterrupted, run_folder) -> None:
    card = json.loads((uninterrupted / "finetune.json").read_text())
    assert card["steps"] == 4 and card["runs"][0]["uri"] == str(run_folder) and card["runs"][0]["config_hash"] == "h"
    assert card["runs"][0]["accepted"] == 4 and card["adapted_layers"] == {"unet": 32, "text_encoder": 8}
    assert card["samples_seen"] == 8 and card["samples_per_s"] > 0 and card["training_device_hours"] > 0
    assert card["runs"][0]["data_device_hours"] == pytest.approx(3.0 / 3600, abs=1e-6)  # its marker says 3 s
    points = {d["point"] for d in card["objective"]["deviations"]}
    assert {"base model", "per-process randomness", "precision", "prompt list", "inference with the LoRA"} <= points
    lines = (uninterrupted / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss" and [int(x.split(",")[0]) for x in lines[1:]] == [1, 2, 3, 4]
    assert "load_lora_weights" in (uninterrupted / "README.md").read_text()
    assert (uninterrupted / "loss.png").read_bytes().startswith(b"\x89PNG")
    weights = _weights(uninterrupted)
    assert any(k.startswith("unet.") for k in weights) and any(k.startswith("text_encoder.") for k in weights)


def test_killed_after_a_checkpoint_then_rerun_ends_with_the_uninterrupted_weights(
        uninterrupted, run_folder, tiny_cache) -> None:
    out = run_folder.parent / "killed"
    args = ["--run", str(run_folder), "--output", str(out)]
    killed = _finetune(args, _env(tiny_cache, REFEREE_SYNTH_FINETUNE_EXIT_AFTER="2"))
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    again = _finetune(args, _env(tiny_cache))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from the checkpoint at step 2" in again.stderr
    a, b = _weights(uninterrupted), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "loss.csv").read_text() == (uninterrupted / "loss.csv").read_text()
    # another setup on the same output is refused, not mixed into the checkpoints
    other = _finetune([*args, "--set", "finetune.lr_unet=0.5"], _env(tiny_cache))
    assert other.returncode == 2 and "checkpoints of another setup" in other.stderr


def test_misuse_is_one_line_and_exit_2(tmp_path, tiny_cache) -> None:
    for args, needle in [(["--run", str(tmp_path / "nope")], "not a run folder"),
                         (["--run", f"{tmp_path}:-1"], "positive"),
                         (["--run", str(tmp_path), "--set", "finetune.rank=0"], "finetune.rank must be >= 1")]:
        proc = _finetune([*args, "--output", str(tmp_path / "out")], _env(tiny_cache))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert needle in proc.stderr


def _first_step_gradients(trainer_pt: Path) -> list[torch.Tensor]:
    """AdamW's first moment after one step is (1 - beta1) x the (clipped) gradient."""
    state = torch.load(trainer_pt, map_location="cpu", weights_only=True)
    opt = state["optimizer"]
    assert state["step"] == 1
    return [opt["state"][i]["exp_avg"] / 0.1 for i in sorted(opt["state"])]


def test_ray_train_two_workers_give_the_first_step_gradients_of_one_process(run_folder, tiny_cache, shared_ray) -> None:
    def steps(n: int, out: Path) -> list[str]:
        return ["--run", str(run_folder), "--steps", str(n), "--set", "finetune.checkpoint_every=1",
                "--output", str(out)]

    two_workers = ["--num-workers", "2", "--set", "finetune.batch_size=2"]
    # One process, both steps at once: it keeps the step-1 checkpoint (finetune.checkpoints_kept 2) and ends with the
    # weights the two workers' resumed run must reach. Its own resume is tested above.
    one = run_folder.parent / "one-process"
    proc = _finetune([*steps(2, one), "--set", "finetune.batch_size=4"], _env(tiny_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"step-0000001", "step-0000002"} <= {p.name for p in (one / "checkpoints").iterdir()}
    two = run_folder.parent / "two-workers"
    proc = _finetune([*steps(1, two), *two_workers], _env(tiny_cache, **shared_ray))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    ray_ckpts = sorted((two / "ray" / "finetune").glob("checkpoint_*/trainer.pt"))
    assert ray_ckpts, os.listdir(two / "ray" / "finetune")
    files = sorted(p.name for p in ray_ckpts[-1].parent.iterdir())
    assert files == ["data-rank0.json", "data-rank1.json", "trainer.pt"]
    g1 = _first_step_gradients(one / "checkpoints" / "step-0000001" / "trainer.pt")
    g2 = _first_step_gradients(ray_ckpts[-1])
    assert len(g1) == len(g2) == 40 * 2  # A and B of 32 UNet + 8 text-encoder layers
    assert any(float(g.abs().max()) > 0 for g in g1)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    card = json.loads((two / "finetune.json").read_text())
    assert card["processes"] == 2 and card["global_batch"] == 4

    # A rerun with more steps resumes from Ray Train's newest checkpoint (same storage path and name) and ends with
    # the single process's weights.
    first = (two / "loss.csv").read_text().splitlines()
    proc = _finetune([*steps(2, two), *two_workers], _env(tiny_cache, **shared_ray))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (two / "loss.csv").read_text().splitlines()
    assert lines[:2] == first and len(lines) == 3
    assert json.loads((two / "finetune.json").read_text())["steps"] == 2
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_sd_sampling_with_the_lora_records_it_in_every_sample(uninterrupted, tmp_path, tiny_cache, shared_ray) -> None:
    path = _prompts(tmp_path / "p.parquet", ["a red car", "a blue cup"])
    args = ["--prompts", str(path), "--generator", "sd_sampling", "--set", "sampling.steps=2", "--threshold", "0.0",
            "--num-actors", "1"]
    with_lora = _run([*args, "--output", str(tmp_path / "lora"), "--lora", str(uninterrupted)],
                     _env(tiny_cache, **shared_ray))
    assert with_lora.returncode == 0, with_lora.stderr[-3000:]
    base = _run([*args, "--output", str(tmp_path / "base")], _env(tiny_cache, **shared_ray))
    assert base.returncode == 0, base.stderr[-3000:]
    rows, base_rows = _sidecars(tmp_path / "lora"), _sidecars(tmp_path / "base")
    label = dict(rows[0]["model_ids"])["lora"]
    assert label.startswith(f"{uninterrupted}#sha256=")
    assert len(rows) == 2 and all(dict(r["model_ids"]).get("lora") == label for r in rows)
    assert all("lora" not in dict(r["model_ids"]) for r in base_rows)
    assert {r["config_hash"] for r in rows}.isdisjoint({r["config_hash"] for r in base_rows})
    run = json.loads((tmp_path / "lora" / "run.json").read_text())
    assert run["config"]["sampling"]["lora"] == str(uninterrupted)
