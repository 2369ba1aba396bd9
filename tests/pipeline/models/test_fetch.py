"""The model table and the fetch plan: every preset is covered, the recorded architecture is the released one,
converted folders are checked by key set and shapes, and the table's own errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.models import needs_of
from pipeline.config_loading import load_config, preset_path
from pipeline.errors import UserError
from pipeline.models import convert_blip2, convert_blip_vqa
from pipeline.models.download import DownloadError
from pipeline.models.fetch import Options, check_converted, fetch_models, plan, record_problem
from pipeline.models.hub_fetch import fetch_repo
from pipeline.models.manifest import BASE_URL_ENV, ConvertedSpec, load_manifest, parse_manifest
from tests.conftest import ROOT
from tests.pipeline.models.released_files import BLIP2_EXPECT, VQA_EXPECT, build_bert, build_released

KEYS = ROOT / "tests" / "parity" / "data"  # the released files' key lists, from the original classes


@pytest.mark.parametrize("preset", ["paper", "vlminv", "zoo", "sd15", "gors"])
def test_every_shipped_preset_is_covered_by_the_model_table(preset, tmp_path) -> None:
    manifest = load_manifest()
    cfg = load_config(preset_path(preset))
    targets = plan(needs_of(cfg), cfg.models.revision, manifest, tmp_path)
    assert {t.kind for t in targets} <= {"hub", "converted"}
    assert all(t.repo.files for t in targets if t.kind == "hub")  # listed with digests, not the generic patterns
    assert {t.key for t in targets if t.kind == "converted"} == set(manifest.converted)
    hub = {t.key for t in targets if t.kind == "hub"}
    assert ("openai/clip-vit-large-patch14" in hub) == (preset == "zoo")
    assert "bert-base-uncased" in hub  # the converters' tokenizer comes with them


def test_the_tiny_set_needs_nothing_and_a_users_folder_is_left_alone(tmp_path) -> None:
    assert needs_of(load_config(preset_path("tiny"))) == []
    own = tmp_path / "my-referee"
    own.mkdir()
    cfg = load_config(preset_path("paper"), [f"models.referee={own}"])
    targets = plan(needs_of(cfg), "main", load_manifest(), tmp_path)
    assert [(t.kind, t.roles) for t in targets if t.key == str(own)] == [("folder", ["models.referee"])]


def test_a_hub_id_the_project_cannot_load_is_refused_before_any_download(tmp_path) -> None:
    cfg = load_config(preset_path("paper"), ["models.referee=Salesforce/blip2-itm-vit-g"])
    with pytest.raises(UserError, match="models.referee: Salesforce/blip2-itm-vit-g lacks the BLIP-2 stage-1 caption"):
        fetch_models(needs_of(cfg), "main", load_manifest(), Options(models_dir=tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [".models-fetch.lock"]


def _meta(keys: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v[0], dtype=getattr(torch, v[1]), device="meta") for k, v in keys.items()}


def _dotted(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def test_the_recorded_architecture_is_what_the_converters_read_off_the_released_files(tmp_path) -> None:
    expect = load_manifest().converted
    state = _meta(json.loads((KEYS / "lavis_blip2_keys.json").read_text())["keys"])
    blip2 = convert_blip2.infer_config(state, Path("blip2_pretrained.pth")).to_dict()
    assert {k: _dotted(blip2, k) for k in expect["blip2-referee-vit-g"].expect} == \
        expect["blip2-referee-vit-g"].expect
    vqa_keys = json.loads((KEYS / "blip_vqa_keys.json").read_text())
    tok = convert_blip_vqa.load_tokenizer(build_bert(tmp_path / "bert"))
    vqa = convert_blip_vqa.infer_config(_meta(vqa_keys["keys"]), tok, Path("vqa.pth")).to_dict()
    got = {k: _dotted(vqa, k) for k in expect["blip-vqa-capfilt-large-480"].expect}
    assert got == expect["blip-vqa-capfilt-large-480"].expect


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("released")
    released = build_released(work)
    for name, data in released.files.items():
        (work / name).write_bytes(data)
    out = {"blip2": work / "referee", "blip-vqa": work / "vqa"}
    convert_blip2.convert_lavis_blip2(work / "blip2_pretrained.pth", out["blip2"], released.bert,
                                      vision_checkpoint=work / "eva_vit_g.pth")
    convert_blip_vqa.convert_blip_vqa(work / "model_base_vqa_capfilt_large.pth", out["blip-vqa"], released.bert)
    return out


def test_a_converted_folder_is_checked_by_architecture_key_set_and_shapes(converted, tmp_path) -> None:
    blip2 = ConvertedSpec("blip2-referee-vit-g", "blip2", {}, "bert-base-uncased", BLIP2_EXPECT)
    check_converted(converted["blip2"], blip2)
    check_converted(converted["blip-vqa"], ConvertedSpec("vqa", "blip-vqa", {}, "bert-base-uncased", VQA_EXPECT))
    full_size = ConvertedSpec("vqa", "blip-vqa", {}, "bert-base-uncased", load_manifest().converted[
        "blip-vqa-capfilt-large-480"].expect)
    with pytest.raises(UserError, match="vision_config.hidden_size = 64, expected 768: the downloaded checkpoint"):
        check_converted(converted["blip-vqa"], full_size)
    # A folder whose caption head lost a tensor: the key set no longer matches the model's.
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(converted["blip2"], broken)
    head = load_file(broken / "caption_head" / "model.safetensors")
    del head["dense.bias"]
    save_file(head, broken / "caption_head" / "model.safetensors")
    with pytest.raises(UserError, match=r"converted caption_head weights differ .* \(e.g. dense.bias\)"):
        check_converted(broken, blip2)
    assert record_problem(broken, blip2) == "no conversion.json (not made by `referee-synth models fetch`)"


def test_offline_with_nothing_cached_is_one_line(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import: never the network
    repo = load_manifest().hub["bert-base-uncased"]
    with pytest.raises(UserError, match="not complete in the Hugging Face cache .* HF_HUB_OFFLINE is set; unset it"):
        fetch_repo(repo, cache_dir=tmp_path, stamps_dir=tmp_path / "stamps")


def test_the_base_url_is_overridden_by_the_flag_then_the_environment(monkeypatch) -> None:
    m = load_manifest()
    published = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    assert m.url("eva_vit_g.pth") == published
    monkeypatch.setenv(BASE_URL_ENV, "http://mirror.internal/sfr/")
    assert m.url("eva_vit_g.pth") == "http://mirror.internal/sfr/LAVIS/models/BLIP2/eva_vit_g.pth"
    assert m.url("eva_vit_g.pth", "http://other") == "http://other/LAVIS/models/BLIP2/eva_vit_g.pth"


@pytest.mark.parametrize(("data", "message"), [
    ({"version": 2}, "expected a mapping with version: 1"),
    ({"version": 1, "files": {"a.pth": {"path": "a", "sha256": "abc"}}}, "files.a.pth: sha256 must be 64"),
    ({"version": 1, "files": {"a.pth": {"path": "a", "size": -1}}}, "files.a.pth: size must be"),
    ({"version": 1, "converted": {"x": {"converter": "blip2", "inputs": {"checkpoint": "b.pth"},
                                        "tokenizer": "t"}}}, "converted.x: input b.pth is not under files"),
    ({"version": 1, "hub": {"a/b": {"files": {}}}}, "hub.a/b: needs a revision"),
])
def test_a_malformed_model_table_is_one_line(data, message) -> None:
    with pytest.raises(UserError, match=message):
        parse_manifest(data, Path("m.yaml"))


def test_an_unreadable_model_table_is_one_line(tmp_path) -> None:
    (tmp_path / "m.yaml").write_text("files: [unclosed")
    with pytest.raises(UserError, match="m.yaml: not valid YAML"):
        load_manifest(tmp_path / "m.yaml")
    with pytest.raises(UserError, match="cannot read"):
        load_manifest(tmp_path / "absent.yaml")
    assert issubclass(DownloadError, UserError)  # download failures reach the user as one line, exit 2


def test_a_folder_converted_by_hand_is_checked_and_kept_never_replaced(converted, tmp_path) -> None:
    import shutil

    from pipeline.models.fetch import Target, _fetch_converted, read_record

    folder = tmp_path / "blip-vqa-capfilt-large-480"
    shutil.copytree(converted["blip-vqa"], folder)
    before = sorted(p.name for p in folder.iterdir())
    manifest = load_manifest()  # its full-size expect: this small folder fails the check
    spec = manifest.converted["blip-vqa-capfilt-large-480"]
    target = Target("converted", spec.name, ["models.vqa"], converted=spec, folder=folder)
    with pytest.raises(UserError, match="is there without conversion.json and fails the check .*move it away"):
        _fetch_converted(target, manifest, Options(models_dir=tmp_path), tokenizer=None)
    assert sorted(p.name for p in folder.iterdir()) == before  # untouched
    small = ConvertedSpec(spec.name, "blip-vqa", spec.inputs, spec.tokenizer, VQA_EXPECT)
    line = _fetch_converted(Target("converted", spec.name, ["models.vqa"], converted=small, folder=folder),
                            manifest, Options(models_dir=tmp_path), tokenizer=None)
    assert line.status == "ok" and "made by hand" in line.detail
    assert read_record(folder)["made_by"] == "found in place, checked by models fetch"
    assert record_problem(folder, small) is None  # a second call: nothing to do
