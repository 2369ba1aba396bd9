"""`models fetch` end to end: a stub hub (HF_ENDPOINT) and a plain file server on 127.0.0.1 serving small
files in the released formats; the CLI in a subprocess, as a user runs it (huggingface_hub reads its
environment at import). The manifest passed in records the digests of the files this test builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.models.loading import model_sources
from tests.conftest import ROOT
from tests.pipeline.models.model_servers import StubRepo, file_server, folder_files, stub_hub
from tests.pipeline.models.released_files import BLIP2_EXPECT, VQA_EXPECT, build_released, file_entry

SD, CLIP, OWL, BERT = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "openai/clip-vit-base-patch32",
                       "google/owlv2-base-patch16-ensemble", "bert-base-uncased")
COMMITS = {SD: "1" * 40, CLIP: "2" * 40, OWL: "3" * 40, BERT: "4" * 40}
REFEREE, VQA = "blip2-referee-vit-g", "blip-vqa-capfilt-large-480"


def _lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin"))


@pytest.fixture(scope="module")
def served(tiny_cfg, tmp_path_factory) -> dict:
    """What the servers hold: hub repos (the tiny set's folders under the real ids), Salesforce files, manifest."""
    work = tmp_path_factory.mktemp("served")
    released = build_released(work)
    tiny = model_sources(tiny_cfg.models)
    folders = {SD: Path(tiny["stable_diffusion"]), CLIP: Path(tiny["clip"]), OWL: Path(tiny["detector"]),
               BERT: released.bert}
    repos = {rid: StubRepo(COMMITS[rid], folder_files(f), {p for p in folder_files(f) if _lfs(p)})
             for rid, f in folders.items()}
    manifest = {
        "version": 1, "base_url": "http://127.0.0.1:9/unused",
        "files": {n: {"path": f"sfr/{n}", **file_entry(data)} for n, data in released.files.items()},
        "converted": {
            REFEREE: {"converter": "blip2", "tokenizer": BERT, "expect": BLIP2_EXPECT,
                      "inputs": {"lavis_checkpoint": "blip2_pretrained.pth", "vision_checkpoint": "eva_vit_g.pth"}},
            VQA: {"converter": "blip-vqa", "tokenizer": BERT, "expect": VQA_EXPECT,
                  "inputs": {"checkpoint": "model_base_vqa_capfilt_large.pth"}},
        },
        "hub": {rid: {"revision": r.commit, "files": {p: file_entry(d, _lfs(p)) for p, d in r.files.items()}}
                for rid, r in repos.items()},
    }
    (work / "models.yaml").write_text(yaml.safe_dump(manifest))
    return {"repos": repos, "files": {f"/sfr/{n}": d for n, d in released.files.items()},
            "manifest": work / "models.yaml", "itm": released.referee_itm_weight}


def _env(home: Path, endpoint: str | None, offline: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(home / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="1" if offline else "0",
               TRANSFORMERS_OFFLINE="1" if offline else "0")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return env


def _fetch(home: Path, served: dict, endpoint: str | None, base_url: str, *extra: str, offline: bool = False):
    cmd = [sys.executable, "jobs/models.py", "fetch", "--preset", "paper", "--cache", str(home / "models"),
           "--manifest", str(served["manifest"]), "--base-url", base_url, "--no-progress", "--retries", "1", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(home, endpoint, offline), capture_output=True, text=True,
                          timeout=600)


def _hub_repo(home: Path, repo_id: str) -> Path:
    return home / "hf" / "hub" / ("models--" + repo_id.replace("/", "--"))


def test_fetch_from_nothing_resumes_after_a_404_then_does_nothing_and_the_models_load_offline(served, tmp_path) -> None:
    files = dict(served["files"])
    missing = files.pop("/sfr/model_base_vqa_capfilt_large.pth")
    with stub_hub(served["repos"]) as (endpoint, hub), file_server(files) as (base, plain):
        first = _fetch(tmp_path, served, endpoint, base)
        # The VQA file is not on the server: one line, exit 2, nothing half-made; the rest is in place.
        assert first.returncode == 2, first.stderr
        errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: model_base_vqa_capfilt_large.pth: HTTP 404 Not Found from "
                          f"{base}/sfr/model_base_vqa_capfilt_large.pth"]
        assert "Traceback" not in first.stderr
        models = tmp_path / "models"
        assert (models / REFEREE / "conversion.json").is_file() and not (models / VQA).exists()
        assert [p.name for p in models.glob(".*")] == [".models-fetch.lock"]  # no half-converted folder
        assert not list((models / "downloads").glob("*.part"))

        files["/sfr/model_base_vqa_capfilt_large.pth"] = missing
        hub_requests = len(hub.requests)
        second = _fetch(tmp_path, served, endpoint, base)
        assert second.returncode == 0, second.stderr
        assert len(hub.requests) == hub_requests  # the hub part was complete: checked offline, not asked again
        assert [r[1] for r in plain.requests].count("/sfr/blip2_pretrained.pth") == 1
        plain_requests = len(plain.requests)

        # A second full call: everything checked, nothing downloaded, even offline.
        third = _fetch(tmp_path, served, endpoint, base, offline=True)
        assert third.returncode == 0, third.stderr
        assert len(hub.requests) == hub_requests and len(plain.requests) == plain_requests
    rows = [line.split()[0] for line in third.stdout.splitlines() if "/" in line.split()[1]]
    assert len(rows) == 5 and set(rows) == {"ok"}, third.stdout
    assert f"--set models.referee={models / REFEREE}" in third.stdout  # --cache is not where paper.yaml looks
    nxt = next(line for line in third.stdout.splitlines() if line.startswith("next:"))
    assert nxt.startswith("next: referee-synth doctor --preset paper --set models.referee=")
    assert nxt.endswith(f"--cache {models}")

    record = json.loads((models / VQA / "conversion.json").read_text())
    assert record["converter"] == "blip-vqa" and record["made_by"] == "referee-synth models fetch"
    assert record["inputs"]["model_base_vqa_capfilt_large.pth"]["sha256"] == \
        file_entry(missing)["sha256"]
    for repo_id, commit in COMMITS.items():  # pinned by commit, yet offline runs ask for main
        assert (_hub_repo(tmp_path, repo_id) / "refs" / "main").read_text() == commit
    _load_offline(tmp_path, served)
    _doctor_says_ready(tmp_path, served)


def _load_offline(tmp_path: Path, served: dict) -> None:
    """Every model paper.yaml loads, offline at revision main, through the project's loaders."""
    models = tmp_path / "models"
    script = f"""
import torch
from pipeline.config_loading import load_config, preset_path
from pipeline.models.loading import load_clip, load_detector, load_generator_models, load_vqa_models
cfg = load_config(preset_path("paper"), ["models.device=cpu", "models.referee={models / REFEREE}",
                  "models.vqa={models / VQA}"])
gen = load_generator_models(cfg)
vqa = load_vqa_models(cfg)
load_clip(cfg.models, cfg.scoring.clip_model)
load_detector(cfg.models, cfg.scoring.detector_model)
torch.save(gen.referee.itm_head.weight, "{tmp_path / 'itm.pt'}")
print("loaded", vqa.model.config.vision_config.image_size)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(tmp_path, None, offline=True),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded 32" in proc.stdout
    import torch

    # the converted referee is the source's
    assert torch.equal(torch.load(tmp_path / "itm.pt", weights_only=True), served["itm"])


def test_a_wrong_hub_file_is_caught_by_its_digest_and_never_used(served, tmp_path) -> None:
    repos = dict(served["repos"])
    sd = repos[SD]
    name = "unet/diffusion_pytorch_model.safetensors"
    good = sd.files[name]
    repos[SD] = StubRepo(sd.commit, sd.files, sd.lfs, wrong={name: bytes(reversed(good))})  # same size
    with stub_hub(repos) as (endpoint, _), file_server(served["files"]) as (base, _):
        proc = _fetch(tmp_path, served, endpoint, base)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{SD}: {name}: sha256" in errors[0] and "does not match the recorded" in errors[0]
    snapshot = _hub_repo(tmp_path, SD) / "snapshots" / sd.commit
    assert not (snapshot / name).exists()  # no loader can pick it up
    assert list((_hub_repo(tmp_path, SD) / "blobs").glob("*.rejected"))
    assert not (tmp_path / "models" / REFEREE).exists()


def _doctor_says_ready(tmp_path: Path, served: dict) -> None:
    models = tmp_path / "models"
    cmd = [sys.executable, "jobs/doctor.py", "--preset", "paper", "--cache", str(models), "--manifest",
           str(served["manifest"]), "--set", "job.gpus_per_actor=0", "--set", f"models.referee={models / REFEREE}",
           "--set", f"models.vqa={models / VQA}", "--output", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path, None, offline=True), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout
    rows = {line.split()[1].rstrip(","): line for line in proc.stdout.splitlines() if line.startswith("  ok")}
    assert "files checked by models fetch" in rows["models.stable_diffusion"]
    assert "converted (blip2) by referee-synth" in rows["models.referee"]
    assert "converted (blip-vqa) by referee-synth" in rows["models.vqa"]
