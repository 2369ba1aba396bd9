from __future__ import annotations

import pyarrow as pa

from schemas.prompts import STATUS_INVALID, STATUS_OK, samples_of
from tests.prompt_tables import read_rows, write_prompts


def test_bad_rows_get_statuses_and_good_rows_pass(tmp_path) -> None:
    path = write_prompts(
        tmp_path / "p.parquet",
        prompt=["a red car", None, "", "   \t", "x" * 51, "a blue cup", "a cat 🐱\x07", "ok"],
        prompt_id=["a", "b", "c", "d", "e", "a", "g", "waytoolongid"],
    )
    rows = read_rows(path)
    by_id = {r.row: r for r in rows}
    assert [r.status for r in rows] == [STATUS_OK] + [STATUS_INVALID] * 5 + [STATUS_OK, STATUS_INVALID]
    assert by_id[1].error == "prompt is null"
    assert by_id[2].error == "prompt is empty"
    assert by_id[3].error == "prompt is whitespace only"
    assert "51 characters" in by_id[4].error
    assert by_id[5].error == "duplicate prompt_id (first used by row 0)"
    assert "prompt_id has 12 characters" in by_id[7].error
    # Control characters and emoji are just text.
    assert by_id[6].prompt == "a cat 🐱\x07"
    assert samples_of(by_id[0]) == 2 and samples_of(by_id[1]) == 1


def test_defaults_and_extra_columns(tmp_path) -> None:
    num = pa.array([3, None], pa.int32())
    path = write_prompts(tmp_path / "p.parquet", prompt=["a", "b"], source=["x", "y"], num_samples=num)
    rows = read_rows(path, samples=5)
    assert [r.prompt_id for r in rows] == ["0", "1"]
    assert [r.num_samples for r in rows] == [3, 5]
    assert rows[0].extra == {"source": "x"}


def test_bom_nan_null_ids_and_seed_overflow_are_row_level(tmp_path) -> None:
    path = write_prompts(
        tmp_path / "p.parquet",
        prompt=["\ufeffa red cube", "a blue ball", "a green bench", "a pink chair", "a cat"],
        prompt_id=[None, "0", None, "2", "big"],
        score=[float("nan"), float("inf"), 1.5, None, float("-inf")],
        seed=pa.array([None, None, None, None, 2**63 - 1], pa.int64()),
    )
    rows = read_rows(path, samples=2)
    assert rows[0].prompt == "a red cube"
    ids = [r.prompt_id for r in rows]
    assert len(set(ids)) == 5 and ids[1] == "0" and ids[3] == "2"  # explicit ids keep their text
    assert [r.status for r in rows] == [STATUS_OK] * 4 + [STATUS_INVALID]
    assert "does not fit int64" in rows[4].error
    assert [r.extra["score"] for r in rows] == [None, None, 1.5, None, None]
    one = read_rows(path, samples=1)  # seed + index 0 fits
    assert one[4].status == STATUS_OK


def test_integer_prompt_ids_are_accepted_as_text(tmp_path) -> None:
    path = write_prompts(tmp_path / "p.parquet", prompt=["a", "b"], prompt_id=[7, 9])
    assert [r.prompt_id for r in read_rows(path)] == ["7", "9"]
