"""run.json's reproducibility record: library versions in the config hash, the code version, the index files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import versions
from pipeline.config_loading import load_config
from pipeline.errors import UserError
from pipeline.io.run_folder import brace_pattern, make_run_info, prepare_run
from pipeline.io.storage import filesystem_for
from tests.conftest import ROOT


def _info(cfg):
    return make_run_info(cfg, {"vqa": "v"}, {"files": []}, "p.parquet", 2)


def test_run_json_records_library_versions_and_code_version(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(versions.CODE_VERSION_ENV, "v1.2-abc")
    info = _info(load_config())
    for lib in ("torch", "transformers", "diffusers", "kornia", "spacy", "ray"):
        assert info.libraries[lib] == versions._version(lib)
    assert info.libraries["spacy_model"].startswith("en_core_web_sm") and "3.8" in info.libraries["spacy_model"]
    assert info.code_version == "v1.2-abc"


def test_code_version_from_a_file_written_at_submit_time_else_unknown(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(versions.CODE_VERSION_ENV, raising=False)
    assert versions.code_version(tmp_path) == "unknown"  # no .git (as under `ray job submit`), no file
    (tmp_path / versions.CODE_VERSION_FILE).write_text("3568b59-dirty\n")
    assert versions.code_version(tmp_path) == "3568b59-dirty"


def test_a_library_upgrade_changes_the_hash_and_a_resume_is_refused(tmp_path, monkeypatch) -> None:
    fs, out = filesystem_for(str(tmp_path / "run"))
    cfg = load_config()
    prepare_run(fs, out, _info(cfg), force=False, output_uri="run")
    old_hash = cfg.hash()
    real = versions._version
    versions.output_versions.cache_clear()
    monkeypatch.setattr(versions, "_version", lambda d: "9.9.9" if d == "torch" else real(d))
    try:
        assert cfg.hash() != old_hash  # the versions that change outputs are part of the hash
        with pytest.raises(UserError, match=r"library versions differ \(torch [^,]+ -> 9.9.9\),.*--force"):
            prepare_run(fs, out, _info(cfg), force=False, output_uri="run")
        prepare_run(fs, out, _info(cfg), force=True, output_uri="run")  # forced: accepted, markers dropped
        assert json.loads((tmp_path / "run" / "run.json").read_text())["libraries"]["torch"] == "9.9.9"
    finally:
        versions.output_versions.cache_clear()


def test_ray_is_not_an_output_library_and_hashing_imports_no_torch() -> None:
    assert "ray" not in versions.OUTPUT_LIBRARIES
    code = ("import sys; from pipeline.config_loading import load_config; load_config().hash(); "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def test_brace_pattern_only_for_contiguous_shards() -> None:
    assert brace_pattern("/r", "/r", [0, 1, 2]) == "/r/shards/{000000..000002}.tar"
    assert brace_pattern("s3://b/r", "b/r", [3, 4]) == "s3://b/r/shards/{000003..000004}.tar"
    assert brace_pattern("/r", "/r", [0, 2]) is None and brace_pattern("/r", "/r", [5]) is None


@pytest.mark.parametrize("name", ["ru{a,b}n", "r,un", "r{un", "run}"])
def test_no_brace_pattern_for_a_folder_whose_name_webdataset_would_expand(name) -> None:
    """Issue 33, class 15: the pattern would expand the folder's own braces; the URL lines are enough."""
    assert brace_pattern(f"/x/{name}", f"/x/{name}", [0, 1, 2]) is None
    assert brace_pattern("/x/ünï", "/x/ünï", [0, 1]) == "/x/ünï/shards/{000000..000001}.tar"
