"""The GPU check against the GPU machine's image (benchmarks/gpu_image.yaml): prepare_gpu_site.py refuses a site
that would not import there, and benchmarks/gpu.py --dry-run runs green in a CPU emulation of the image (its
package versions and .gpu_site only: no spaCy, Ray, diffusers or kornia but what .gpu_site carries)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import prepare_gpu_site
from benchmarks.gpu_image import check_site, load_image
from tests.conftest import ROOT


def _dist(site: Path, name: str, version: str, requires: list[str], python: str = ">=3.10") -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", f"Requires-Python: {python}",
             *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def test_a_site_that_needs_a_newer_hub_than_the_image_has_fails_the_check(tmp_path) -> None:
    image = load_image()
    assert image.versions["huggingface-hub"] == "1.33.0" and image.versions["torch"] == "2.11.0"
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    _dist(ok, "transformers", "5.24.0", ["huggingface-hub<3.0,>=1.31.0", "tokenizers<0.24.0,>=0.23.1", "typer",
                                         'tomli>=1.1; python_version < "3.11"'])
    _dist(bad, "transformers", "5.25.0", ["huggingface-hub<3.0,>=2.4.0", "tokenizers<0.24.0,>=0.23.1"])
    _dist(bad, "kornia", "9.0.0", ["torch>=2.12", "left-pad>=1"], python=">=3.13")
    good = check_site(ok, image)
    assert good.problems == [] and any("typer unchecked" in n for n in good.notes)
    problems = check_site(bad, image).problems
    assert any("requires huggingface-hub" in p and "the image has huggingface-hub 1.33.0" in p for p in problems)
    assert any("requires torch>=2.12" in p and "2.11.0" in p for p in problems)
    assert any("left-pad" in p and "neither" in p for p in problems)
    assert any("requires Python >=3.13" in p for p in problems)
    assert len(problems) == 4


def test_prepare_refuses_a_site_the_image_cannot_import(tmp_path, capsys) -> None:
    record = yaml.safe_load((ROOT / "benchmarks" / "gpu_image.yaml").read_text())
    record["versions"]["huggingface-hub"] = "1.20.0"  # older than the lock's transformers allows
    image = tmp_path / "image.yaml"
    image.write_text(yaml.safe_dump(record))
    dest = tmp_path / "site"
    assert prepare_gpu_site.main(["--dest", str(dest), "--image", str(image)]) == 2
    err = capsys.readouterr().err
    assert "requires huggingface-hub" in err and "1.20.0" in err and "removed" in err
    assert not dest.exists()


@pytest.fixture(scope="module")
def emulated_image(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The image's packages (benchmarks/gpu_image.py emulate) and a .gpu_site prepared from the lock."""
    from benchmarks.gpu_image import emulate

    root = tmp_path_factory.mktemp("gpu-image")
    report = emulate(root / "emu")
    site = root / "gpu_site"
    assert prepare_gpu_site.main(["--dest", str(site)]) == 0
    return root / "emu" / "site", site, report


def _run_emulated(emu: Path, site: Path, args: list[str], env: dict[str, str] | None = None, timeout: int = 600):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    clean.update(PYTHONPATH=f"{site}{os.pathsep}{emu}", HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-S", *args], cwd=ROOT, env=clean, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_gpu_dry_run_is_green_on_the_emulated_image(emulated_image, tiny_cache, tmp_path) -> None:
    emu, site, report = emulated_image
    assert "transformers==5.17.0" in report["installed"] and "huggingface-hub==1.33.0" in report["installed"]
    probe = _run_emulated(emu, site, ["-c", "\n".join([
        "import importlib.util as u, importlib.metadata as md",
        "print({m: u.find_spec(m) is not None for m in ('spacy', 'ray', 'diffusers', 'kornia', 'webdataset')})",
        "print(md.version('huggingface_hub'), md.version('transformers'))"])])
    assert probe.returncode == 0, probe.stderr[-2000:]
    found, versions = probe.stdout.splitlines()
    assert found == str({"spacy": False, "ray": False, "diffusers": True, "kornia": True, "webdataset": False})
    assert versions == "1.33.0 5.24.0"  # the image's hub; the site's transformers (the lock's) shadows 5.17
    out = tmp_path / "gpu.json"
    # The documented one command (benchmarks/README.md), on the tiny models: eager, auto view chunk, profile,
    # compiled (backend eager in a dry run), bf16-stored weights.
    run = _run_emulated(emu, site, ["benchmarks/gpu.py", "--dry-run", "--out", str(out), "--batches", "2",
                                    "--view-chunks", "auto", "--skip-reference", "--compile", "--profile",
                                    "--bf16-weights", "--profile-steps", "1", "--budget-s", "3000"],
                        env={"REFEREE_SYNTH_CACHE": str(tiny_cache), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    first = run.stdout.splitlines()[0]
    assert first.startswith("device cpu; python") and "huggingface_hub 1.33.0" in first
    r = json.loads(out.read_text())
    assert r["errors"] == [] and [c["status"] for c in r["configs"]] == ["ok"]
    for key in ("profile_eager", "compile_run", "profile_compiled", "bf16_weights_run"):
        assert r[key]["status"] == "ok", (key, r[key])
    assert set(r["profile_eager"]["component_seconds_per_step"]) >= {"sds", "decode", "augment", "referee_forward"}
    assert r["profile_compiled"]["compile"] and r["bf16_weights_run"]["cast_weights"] == "bf16"
    assert r["summary"]["compile_seconds_per_image"] > 0 and r["summary"]["bf16_weights_times_floor"] > 0
    pk = r["environment"]["packages"]
    assert pk["transformers"]["version"] == "5.24.0" and pk["transformers"]["from"] == str(site)
    assert pk["diffusers"]["from"] == str(site) and pk["huggingface_hub"]["from"] == str(emu)
