"""Inversion against plain SD 1.5 sampling on the same prompts: seconds and acceptance per category.

    python benchmarks/compare_generators.py [--config configs/tiny.yaml] [--set k=v ...]
        [--categories color shape] [--prompts-per-category 2] [--samples-per-prompt 2] [--json] [--out FILE]
    # real weights on a GPU (the sampling section of the same config sets the sampler):
    python benchmarks/compare_generators.py --config configs/paper.yaml --set models.referee=DIR \\
        --categories color shape texture --prompts-per-category 8 --samples-per-prompt 4 --json

Both generators (``engine.generator`` inversion and sd_sampling, everything else the same config) run
the same rows, the first prompts of each category's T2I-CompBench val list, through the job's own shard
processor (``pipeline.process_shard``: generate, encode, score the stored PNG, filter, write a shard in
a temporary folder), on one set of loaded models. Per generator and category it reports what a run's
summary.json would: seconds per image (the samples' device ``seconds``: their share of the generator's
batches plus their own encoding and scoring), acceptance rate and seconds per accepted image; and the
FLOPs per image at the real model sizes from ``benchmarks/flops.py`` with their floor at the H100's
dense bf16 rate (FLOPs of the config's own schedule and image size: on the tiny preset, 64 px and its
short schedule). A warm-up batch per generator is run first and not counted; ``--reps`` runs per
generator, interleaved, and the fastest is reported (the records are the same in every rep). On the tiny and small
sets the scores are meaningless, so the acceptance rates are too; the seconds and the plumbing are real.

``--cascade sd_sampling:3,inversion:2 --target K``: the cascade beside each generator alone (both with the
target K, at most the cascade's budgets summed), judged by a scorer stub of known acceptance per generator and
category (``--stub-rates``; this benchmark only: random weights make real acceptance noise). A sample is
accepted iff a uniform draw keyed by (generator, prompt_id, sample index) falls below its rate. Reported: seconds
per accepted image of each generator alone and of the cascade, and the plan's prediction for the cascade
(``pipeline.budget.cascade_plan``, with the stub's rates and the seconds per sample measured in the generators'
own runs, as ``--plan --from-run`` would take them) against the measured value, per category and overall.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import run_main  # noqa: E402
from pipeline.config import GENERATORS, Config  # noqa: E402
from pipeline.config_loading import load_config, preset_path  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0  # the rate benchmarks/flops.py and cost.plan_tflops use for the floor
DEFAULT_CATEGORIES = ("color", "shape")
# The scorer stub's acceptance per category and generator (--cascade): sampling does colour well and shape badly.
DEFAULT_STUB_RATES = {"color": {"sd_sampling": 0.6, "inversion": 0.9}, "shape": {"sd_sampling": 0.05, "inversion": 0.7}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(preset_path("tiny")), help="YAML preset (default configs/tiny.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--categories", nargs="+", default=list(DEFAULT_CATEGORIES),
                   help="T2I-CompBench categories (their data/t2i-compbench/{category}_val.txt lists)")
    p.add_argument("--prompts-per-category", type=int, default=2)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--reps", type=int, default=2, help="runs per generator, interleaved; the fastest is reported")
    p.add_argument("--tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="device rate for the FLOP floor")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--cascade", metavar="GEN:N,GEN:N",
                   help="compare this cascade (stages in order, budgets per prompt) with each generator alone")
    p.add_argument("--target", type=int, default=2, help="with --cascade: accepted images wanted per prompt")
    p.add_argument("--stub-rates", type=json.loads, default=None, metavar="JSON",
                   help='with --cascade: {category: {generator: rate}} of the scorer stub (default: '
                        f"{json.dumps(DEFAULT_STUB_RATES)})")
    return p


def _rows(cfg: Config, categories: list[str], per_category: int, samples: int) -> list[Any]:
    from jobs.prompts import prompt_table
    from pipeline.io.compbench_data import COMPBENCH_DIR
    from schemas.prompts import validate_rows

    files = [COMPBENCH_DIR / f"{c}_val.txt" for c in categories]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"--categories: no prompt list {', '.join(missing)}")
    table = prompt_table(files, limit=per_category)
    return validate_rows([table], samples, cfg.job.max_prompt_chars, cfg.job.max_prompt_id_chars)


def _process(cfg: Config, gen: Any, vqa: Any, rows: list[Any]) -> list[dict[str, Any]]:
    """One shard of ``rows`` through the job's shard processor; its sidecar rows."""
    import pyarrow.parquet as pq

    from pipeline.io.shards import ShardSpec, shard_paths
    from pipeline.io.storage import filesystem_for
    from pipeline.process_shard import ShardProcessor

    with tempfile.TemporaryDirectory(prefix="compare-generators-") as out:
        fs, root = filesystem_for(out)
        fs.create_dir(f"{root}/shards", recursive=True)
        ShardProcessor(cfg, gen, vqa, {"vqa": cfg.models.vqa}).process(ShardSpec(0, rows), fs, root)
        return pq.read_table(shard_paths(root, 0)["parquet"]).to_pylist()


def _rates(records: list[dict[str, Any]]) -> dict[str, Any]:
    made = [r for r in records if r["status"] in ("accepted", "rejected", "failed")]
    accepted = sum(r["status"] == "accepted" for r in made)
    seconds = sum(r["seconds"] for r in made)
    return {
        "samples": len(made), "accepted": accepted, "failed": sum(r["status"] == "failed" for r in made),
        "acceptance_rate": accepted / len(made) if made else None,
        "seconds_per_image": seconds / len(made) if made else None,
        "seconds_per_accepted": seconds / accepted if accepted else None,
    }


def _flops(cfg: Config, tflops: float) -> dict[str, Any]:
    from benchmarks.flops import count

    counted = count(cfg, tflops)
    return {"flops_per_image": counted["total_flops"], "floor_seconds_per_image": counted["floor_seconds_per_image"]}


def _summarise(cfg: Config, reps: list[list[dict[str, Any]]], tflops: float) -> dict[str, Any]:
    """Per category the rates of the fastest rep (the records, hence the acceptances, are the same in
    every rep: same seeds; only the seconds vary with the machine's load)."""
    flops = _flops(cfg, tflops)
    per_rep = [_by_category(records) for records in reps]
    per_cat = {}
    for name in per_rep[0]:
        rates = [_rates(cats[name]) for cats in per_rep]
        best = min(rates, key=lambda r: r["seconds_per_image"] or 0.0)
        per_cat[name] = {**best, "seconds_per_image_reps": [r["seconds_per_image"] for r in rates], **flops}
    overall = min((_rates(records) for records in reps), key=lambda r: r["seconds_per_image"] or 0.0)
    generators = {r["generator"] for records in reps for r in records}
    assert generators == {cfg.engine.generator}, f"records say {generators}, asked {cfg.engine.generator}"
    return {**flops, "overall": overall, "categories": per_cat}


def _by_category(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    cats: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        cats.setdefault(r["category"] or "(none)", []).append(r)
    return dict(sorted(cats.items()))


def compare(base: Config, categories: list[str], per_category: int, samples: int, tflops: float,
            reps: int = 2) -> dict[str, Any]:
    from pipeline.models.loading import load_generator_models, load_vqa_models

    rows = _rows(base, categories, per_category, samples)
    gen, vqa = load_generator_models(base), load_vqa_models(base)  # loaded once: both generators share them
    cfgs = {}
    for name in GENERATORS:
        cfgs[name] = copy.deepcopy(base)
        cfgs[name].engine.generator = name
        _process(cfgs[name], gen, vqa, rows[:1])  # warm-up: first-call costs (allocations, lazy inits) not counted
    records: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in GENERATORS}
    for _ in range(reps):  # interleaved, so a change of machine load hits both generators alike
        for name in GENERATORS:
            records[name].append(_process(cfgs[name], gen, vqa, rows))
    results = {name: _summarise(cfgs[name], records[name], tflops) for name in GENERATORS}
    return {
        "models": "tiny" if base.models.tiny else "small" if base.models.small else base.models.stable_diffusion,
        "device": str(gen.device), "categories": categories, "prompts_per_category": per_category,
        "samples_per_prompt": samples, "reps": reps, "tflops": tflops,
        "image_size": base.latent.size * 8,
        "sampling": {"scheduler": base.sampling.scheduler, "steps": base.sampling.steps,
                     "guidance_scale": base.sampling.guidance_scale},
        "inversion": {"iterations": base.optim.iterations, "tail_iterations": base.optim.tail_iterations,
                      "num_views": base.augment.num_views, "batch_size": base.engine.batch_size},
        "generators": results, "comparison": _comparison(results),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _comparison(results: dict[str, Any]) -> dict[str, Any]:
    """Per category: inversion's seconds per accepted image over sampling's (> 1: sampling is cheaper)."""
    inv, sd = results["inversion"], results["sd_sampling"]
    out = {}
    for name in inv["categories"]:
        a, b = inv["categories"][name], sd["categories"].get(name, {})
        out[name] = {
            "seconds_per_image_ratio": _ratio(a["seconds_per_image"], b.get("seconds_per_image")),
            "seconds_per_accepted_ratio": _ratio(a["seconds_per_accepted"], b.get("seconds_per_accepted")),
            "flops_ratio": _ratio(a["flops_per_image"], b.get("flops_per_image")),
        }
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def format_table(result: dict[str, Any]) -> str:
    lines = [f"models {result['models']} on {result['device']}; {result['prompts_per_category']} prompts x "
             f"{result['samples_per_prompt']} samples per category",
             f"{'generator':<12}{'category':<14}{'samples':>8}{'acc.rate':>9}{'s/image':>10}{'s/accepted':>12}"
             f"{'TFLOP/img':>11}{'floor s':>9}"]
    for gname, g in result["generators"].items():
        for cname, c in [*g["categories"].items(), ("(all)", g["overall"])]:
            lines.append(f"{gname:<12}{cname[:13]:<14}{c['samples']:>8}{_fmt(c['acceptance_rate'], '.3f'):>9}"
                         f"{_fmt(c['seconds_per_image'], '.3f'):>10}{_fmt(c['seconds_per_accepted'], '.3f'):>12}"
                         f"{g['flops_per_image'] / 1e12:>11.2f}{g['floor_seconds_per_image']:>9.3f}")
    for cname, c in result["comparison"].items():
        lines.append(f"{cname}: inversion / sampling = {_fmt(c['seconds_per_image_ratio'], '.1f')}x s/image, "
                     f"{_fmt(c['seconds_per_accepted_ratio'], '.1f')}x s/accepted, "
                     f"{_fmt(c['flops_ratio'], '.0f')}x FLOPs")
    return "\n".join(lines)


# ---- --cascade: the cascade beside each generator alone, judged by a scorer stub of known acceptance ----------
class _StubScorers:
    """Accepts a sample iff a uniform draw keyed by (generator, prompt_id, sample index) is below the rate of
    its generator and category (the benchmark's known acceptance; the product never uses it)."""

    name = "stub"

    def __init__(self, rates: dict[str, dict[str, float]]) -> None:
        self.rates = rates
        self.current: tuple[str, str, int] = ("", "", 0)

    def scorer_name(self, category: str | None) -> str:
        return self.name

    def prepare(self, names: Any) -> None:
        pass

    def judge(self, image: Any, prompt: str, category: str | None) -> Any:
        import hashlib

        from pipeline.scoring.scorers import Judgement

        generator, prompt_id, k = self.current
        u = int(hashlib.sha256(f"{generator}:{prompt_id}:{k}".encode()).hexdigest()[:12], 16) / 16**12
        rate = self.rates.get(category or "", {}).get(generator, 0.0)
        return Judgement(scorer=self.name, score=1.0 if u < rate else 0.0)


def _stubbed_process(cfg: Config, gen: Any, rates: dict[str, dict[str, float]], rows: list[Any]) -> list[dict]:
    """``_process`` with the scorer stub in place of the category's scorer."""
    import pyarrow.parquet as pq

    from pipeline.io.shards import ShardSpec, shard_paths
    from pipeline.io.storage import filesystem_for
    from pipeline.process_shard import ShardProcessor

    class Stubbed(ShardProcessor):
        def _encode_and_score(self, image: Any, p: Any) -> Any:
            self.scorers.current = (self.stages[p.stage].generator, p.row.prompt_id, p.request.sample_index)
            return super()._encode_and_score(image, p)

    with tempfile.TemporaryDirectory(prefix="compare-cascade-") as out:
        fs, root = filesystem_for(out)
        fs.create_dir(f"{root}/shards", recursive=True)
        proc = Stubbed(cfg, gen, None, {"vqa": "stub"})
        proc.scorers = _StubScorers(rates)
        proc.process(ShardSpec(0, rows), fs, root)
        return pq.read_table(shard_paths(root, 0)["parquet"]).to_pylist()


def parse_cascade(text: str) -> list[dict[str, Any]]:
    stages = []
    for part in text.split(","):
        name, _, n = part.partition(":")
        if name not in GENERATORS or not n.isdigit() or int(n) < 1:
            raise UserError(f"--cascade: expected GENERATOR:N,... with generators {', '.join(GENERATORS)}, "
                            f"got {text!r}")
        stages.append({"generator": name, "max_samples": int(n)})
    return stages


def _fastest(reps: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rep with the fewest device seconds (its records equal the others' but for the seconds)."""
    return min(reps, key=lambda recs: sum(r["seconds"] for r in recs))


def _per_category(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {name: _rates(recs) for name, recs in _by_category(records).items()} | {"(all)": _rates(records)}


def compare_cascade(base: Config, categories: list[str], per_category: int, stages: list[dict[str, Any]],
                    target: int, rates: dict[str, dict[str, float]], reps: int = 2) -> dict[str, Any]:
    from pipeline.budget.cascade_plan import cascade_plan
    from pipeline.config_loading import from_dict
    from pipeline.models.loading import load_generator_models

    rows = _rows(base, categories, per_category, 1)
    total = sum(s["max_samples"] for s in stages)
    data = base.to_dict()
    data["job"].update(target_accepted=target, max_samples_per_prompt=total)
    cfgs = {}
    for name in [s["generator"] for s in stages]:
        cfgs[name] = from_dict({**data, "engine": {**data["engine"], "generator": name}, "cascade": {"stages": []}})
    cfgs["cascade"] = from_dict({**data, "engine": {**data["engine"], "generator": "cascade"},
                                 "cascade": {"stages": stages}})
    gen = load_generator_models(cfgs["cascade"])  # one set for all: the cascade's stages need every part
    for cfg in cfgs.values():
        _stubbed_process(cfg, gen, rates, rows[:1])  # warm-up, not counted
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in cfgs}
    for _ in range(reps):
        for name, cfg in cfgs.items():
            runs[name].append(_stubbed_process(cfg, gen, rates, rows))
    measured = {name: _fastest(reps_) for name, reps_ in runs.items()}
    # The plan's inputs as --plan --from-run reads them: the stub's acceptance, each generator's own seconds.
    by_generator = {}
    for name in cfgs:
        if name == "cascade":
            continue
        cats = _per_category(measured[name])
        per = {c: (rates.get(c, {}).get(name, 0.0), v["seconds_per_image"]) for c, v in cats.items() if c != "(all)"}
        by_generator[name] = {"source": {"kind": "run", "run": f"{name} alone", "runs": [f"{name} alone"]},
                              "per_category": per, "overall": (0.0, cats["(all)"]["seconds_per_image"])}
    plan = cascade_plan(cfgs["cascade"], rows, by_generator)
    got = _per_category(measured["cascade"])
    prediction = {}
    for name, c in [*plan["categories"].items(), ("(all)", plan)]:
        predicted, value = c["seconds_per_accepted"], got.get(name, {}).get("seconds_per_accepted")
        prediction[name] = {"predicted_seconds_per_accepted": predicted, "measured_seconds_per_accepted": value,
                            "relative_error": (predicted - value) / value if predicted is not None and value else None}
    made = {g: sum(r["generator"] == g and r["status"] in ("accepted", "rejected", "failed")
                   for r in measured["cascade"]) for g in by_generator}
    return {
        "models": "tiny" if base.models.tiny else "small" if base.models.small else base.models.stable_diffusion,
        "device": str(gen.device), "categories": categories, "prompts_per_category": per_category,
        "target": target, "stages": stages, "stub_rates": rates, "reps": reps,
        "runs": {name: _per_category(recs) for name, recs in measured.items()},
        "cascade_samples_by_generator": made,
        "planned_samples_by_generator": {g: m["expected_samples"] for g, m in plan["mix"].items()},
        "plan": plan, "prediction": prediction,
    }


def format_cascade_table(result: dict[str, Any]) -> str:
    lines = [f"models {result['models']} on {result['device']}; {result['prompts_per_category']} prompts per category, "
             f"target {result['target']}; cascade {result['stages']}; stub rates {result['stub_rates']}",
             f"{'run':<13}{'category':<14}{'samples':>8}{'accepted':>9}{'s/accepted':>12}"]
    for name, cats in result["runs"].items():
        for cname, c in cats.items():
            lines.append(f"{name:<13}{cname[:13]:<14}{c['samples']:>8}{c['accepted']:>9}"
                         f"{_fmt(c['seconds_per_accepted'], '.3f'):>12}")
    for cname, c in result["prediction"].items():
        err = c["relative_error"]
        lines.append(f"plan vs measured, {cname}: {_fmt(c['predicted_seconds_per_accepted'], '.3f')} vs "
                     f"{_fmt(c['measured_seconds_per_accepted'], '.3f')} s/accepted "
                     f"({'n/a' if err is None else f'{err:+.1%}'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.prompts_per_category, args.samples_per_prompt, args.reps) < 1:
        raise UserError("--prompts-per-category, --samples-per-prompt and --reps must be >= 1")
    base = load_config(args.config, args.set)
    if args.cascade:
        result = compare_cascade(base, args.categories, args.prompts_per_category, parse_cascade(args.cascade),
                                 args.target, args.stub_rates or DEFAULT_STUB_RATES, args.reps)
        text = json.dumps(result, indent=1)
        if args.out:
            Path(args.out).write_text(text)
        print(text if args.json else format_cascade_table(result))
        return 0
    result = compare(base, args.categories, args.prompts_per_category, args.samples_per_prompt, args.tflops,
                     args.reps)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    run_main(main)
