"""benchmarks/compare_finetunes.py end to end on the tiny models: two finetunes, four evaluations, one table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.jobs.test_synthesize import _env
from tests.pipeline.finetune.runs import write_run

pytestmark = pytest.mark.slow


def test_the_four_rows_come_from_their_own_generators_and_loras(tmp_path, tiny_cache, shared_ray) -> None:
    from pipeline.io.reader import sidecar_records

    write_run(tmp_path / "sd", per_shard=3, generator="sd_sampling", config_hash="sd")
    write_run(tmp_path / "inv", per_shard=5, config_hash="inv")
    out = tmp_path / "cmp"
    cmd = [sys.executable, "benchmarks/compare_finetunes.py", "--sd-run", str(tmp_path / "sd"), "--inversion-run",
           str(tmp_path / "inv"), "--output", str(out), "--category", "color", "--finetune-config", "configs/tiny.yaml",
           "--eval-config", "configs/tiny.yaml", "--steps", "2", "--limit", "1", "--images-per-prompt", "1",
           "--num-actors", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tiny_cache, **shared_ray), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    rows = {r["row"]: r for r in table["rows"]}
    assert list(rows) == ["base SD (no finetune)", "GORS on SD samples", "GORS on inversion samples",
                          "inversion generator"]
    assert rows["GORS on SD samples"]["accepted_pairs"] == 3
    assert rows["GORS on inversion samples"]["accepted_pairs"] == 5
    assert all(set(r["scores"]) == {"color"} for r in rows.values())
    for key, generator, lora in [("base", "sd_sampling", None), ("gors_sd", "sd_sampling", "lora-sd"),
                                 ("gors_inversion", "sd_sampling", "lora-inversion"), ("inversion", "inversion", None)]:
        records = sidecar_records(str(out / "eval" / key / "run"))
        assert {r["generator"] for r in records} == {generator}
        labels = {dict(r["model_ids"]).get("lora") for r in records}
        if lora is None:
            assert labels == {None}
        else:
            assert len(labels) == 1 and next(iter(labels)).startswith(f"{out / lora}#sha256=")
    assert "| GORS on inversion samples |" in (out / "table.md").read_text()
