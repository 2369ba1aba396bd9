"""The sample record's one type declaration (SIDECAR_SCHEMA): the dataclass agrees with it, KEY.json is typed
by it, and the dataset card's features are derived from it and understood by `datasets`."""

from __future__ import annotations

import dataclasses
import json
import math

import pyarrow as pa
import pytest

from schemas.samples import SIDECAR_SCHEMA, SampleRecord, card_features, sidecar_table


def _record(**changes) -> SampleRecord:
    base = dict(key="0000000000000", shard=0, row=0, prompt_id="p0", prompt="a red cup", category="color",
                sample_index=0, seed=7, status="accepted")
    return SampleRecord(**{**base, **changes})


def test_the_dataclass_and_the_schema_declare_the_same_fields() -> None:
    assert {f.name for f in dataclasses.fields(SampleRecord)} == set(SIDECAR_SCHEMA.names)


def test_key_json_has_the_declared_type_in_every_field() -> None:
    rec = _record(threshold=1, vqa_score=1, vqa_answers=[1, 0.5], final_losses={"itm": 2}, seconds=3,
                  itm_score=math.nan, score_parts={"clipscore": 0}, extra={"source": "x", "n": 2},
                  referee_scores={"clip": {"kind": "clip", "score": 1, "loss": 0, "weight": 2}})
    d = rec.to_json_dict()
    assert list(d) == SIDECAR_SCHEMA.names
    assert type(d["threshold"]) is float and type(d["vqa_score"]) is float and type(d["seconds"]) is float
    assert [type(v) for v in d["vqa_answers"]] == [float, float] and type(d["final_losses"]["itm"]) is float
    assert d["itm_score"] is None  # JSON has no NaN
    assert d["score_parts"] == {"clipscore": 0.0} and type(d["score_parts"]["clipscore"]) is float
    assert d["referee_scores"] == {"clip": {"kind": "clip", "score": 1.0, "loss": 0.0, "weight": 2.0}}
    assert d["extra"] == {"source": "x", "n": 2}  # the input's own columns, as the input had them
    json.dumps(d, allow_nan=False)  # standard JSON
    # The sidecar row holds the same values (extra as JSON text), typed by the same schema.
    row = sidecar_table([rec]).to_pylist()[0]
    assert row["threshold"] == 1.0 and json.loads(row["extra"]) == d["extra"] and math.isnan(row["itm_score"])


def test_a_wrong_type_is_refused_when_written() -> None:
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        _record(vqa_score="high").to_json_dict()


def test_the_card_features_cover_every_field_and_load_in_datasets() -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features._from_yaml_list(card_features("webp"))
    assert list(features) == ["webp", "txt", "json", "__key__", "__url__"]
    assert isinstance(features["webp"], datasets.Image)
    meta = features["json"]
    assert list(meta) == SIDECAR_SCHEMA.names
    assert meta["vqa_score"] == datasets.Value("float64") and meta["vqa_answers"] == datasets.List(
        datasets.Value("float64"))
    assert all(isinstance(meta[k], datasets.Json) for k in ("final_losses", "score_parts", "referee_scores",
                                                              "model_ids", "extra"))
    # Records of different scorers, one null here and a number there, encode into one table.
    recs = [_record(scorer="spatial_detector", score_parts={"spatial_detector": 0.9}, vqa_answers=[]),
            _record(scorer="blip_vqa", score_parts={"blip_vqa": 0.2}, vqa_answers=[0.5], itm_score=0.4)]
    rows = [{"webp": None, "txt": r.prompt, "json": r.to_json_dict(), "__key__": r.key, "__url__": "u"}
            for r in recs]
    ds = datasets.Dataset.from_list(rows, features=features)
    assert ds[0]["json"]["score_parts"] == {"spatial_detector": 0.9} and ds[1]["json"]["vqa_answers"] == [0.5]
    assert ds[0]["json"]["itm_score"] is None and ds[1]["json"]["itm_score"] == 0.4


def test_a_type_the_card_cannot_declare_is_named() -> None:
    from schemas import samples

    odd = pa.schema([("when", pa.timestamp("s"))])
    with pytest.raises(TypeError, match="when: no dataset-card dtype"):
        samples._card_feature(odd.field("when"))
