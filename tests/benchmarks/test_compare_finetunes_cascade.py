"""benchmarks/compare_finetunes.py --cascade-run: a third LoRA on the cascade's samples and its GORS row."""

from __future__ import annotations

import json

from benchmarks import compare_finetunes as cf


def test_cascade_run_adds_a_finetune_and_a_row(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    args = ["--sd-run", "R-sd", "--inversion-run", "R-inv", "--cascade-run", "R-cas", "--output", str(out),
            "--category", "color", "--dry-run"]
    assert cf.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    finetunes = [line for line in lines if line.startswith("python jobs/finetune.py")]
    evals = [line for line in lines if line.startswith("python jobs/evaluate.py")]
    assert len(finetunes) == 3 and "--run R-cas" in finetunes[2] and str(out / "lora-cascade") in finetunes[2]
    assert len(evals) == 5
    cascade_eval = next(line for line in evals if str(out / "eval" / "gors_cascade") in line)
    assert f"sampling.lora={out / 'lora-cascade'}" in cascade_eval and "engine.generator=sd_sampling" in cascade_eval

    # The table reads the cascade LoRA's card and its evaluation like the others'.
    parsed = cf.build_parser().parse_args(args)
    for key, *_ in cf.rows_of(parsed):
        (out / "eval" / key).mkdir(parents=True)
        (out / "eval" / key / "results.json").write_text(json.dumps({"categories": {"color": {"mean": 0.5}}}))
    for which, pairs in (("sd", 10), ("inversion", 11), ("cascade", 12)):
        (out / f"lora-{which}").mkdir()
        (out / f"lora-{which}" / "finetune.json").write_text(json.dumps({
            "runs": [{"accepted": pairs, "data_device_hours": 0.1}], "steps": 2, "training_device_hours": 0.2,
            "base_model": "sd"}))
    table = cf.table(parsed)
    labels = [r["row"] for r in table["rows"]]
    assert labels[3] == "GORS on cascade samples" and len(labels) == 5
    assert table["rows"][3]["accepted_pairs"] == 12
    assert "| GORS on cascade samples |" in cf.markdown(table)
    # Without --cascade-run: the four rows as before.
    assert [k for k, *_ in cf.rows_of(cf.build_parser().parse_args(args[:4] + args[6:]))] == [k for k, *_ in cf.ROWS]
