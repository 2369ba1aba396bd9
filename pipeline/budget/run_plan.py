"""What a run will make and cost, before it starts (``jobs/synthesize.py --plan``); no torch, no models.

Per category: the acceptance rate p and the device seconds per sample s come from an earlier run's
summary.json (``--from-run``), or else p is ``cost.plan_acceptance_rate`` and s is the FLOP floor
of one image (``pipeline.engine.flop_floor``) at ``cost.plan_tflops`` x ``cost.plan_efficiency``.
With a target K and at most M attempts, a prompt's attempts stop at the K-th acceptance or at M
(in-shard refill never makes more, ``pipeline.budget.refill``); with attempts independent with rate p:
    E[attempts] = sum_{n<M} P(Bin(n, p) < K),  E[accepted] = E[min(K, Bin(M, p))],
    P(short) = P(Bin(M, p) < K).
Without a target every valid prompt makes its ``num_samples`` and p of them are accepted.
Several ``--from-run`` folders are grouped by the generator each recorded (run.json's
``engine.generator``): the plan takes its rates from the runs of the config's generator (else the floor)
and lists every generator's GPU-hours for the same prompts and target side by side.
"""

from __future__ import annotations

import json
from collections import defaultdict
from math import comb
from typing import Any

from pipeline.budget.accounting import NO_CATEGORY, category_of
from pipeline.budget.cascade_plan import cascade_plan, format_cascade
from pipeline.config import Config
from pipeline.engine.flop_floor import floor_per_image
from pipeline.errors import UserError
from pipeline.io import storage
from schemas.prompts import STATUS_OK, PromptRow

DEFAULT_GENERATOR = "inversion"  # engine.generator's default: runs made before the choice existed


def _binom_cdf_below(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) < k)."""
    return sum(comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(min(k, n + 1)))


def expected_attempts(p: float, k: int, m: int) -> float:
    return sum(_binom_cdf_below(k, n, p) for n in range(m))


def expected_accepted(p: float, k: int, m: int) -> float:
    return sum(min(k, j) * comb(m, j) * p**j * (1 - p) ** (m - j) for j in range(m + 1))


def short_probability(p: float, k: int, m: int) -> float:
    return _binom_cdf_below(k, m, p)


def _count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and value == value


def _category_counts(name: Any, v: Any) -> str | None:
    """Why a summary's category entry cannot give rates, or None."""
    if not isinstance(v, dict):
        return f"category {name!r} is not a mapping"
    bad = [k for k in ("samples", "accepted", "seconds") if not _count(v.get(k))]
    if bad:
        return f"category {name!r} has no non-negative number for {', '.join(bad)}"
    if v["accepted"] > v["samples"]:
        return f"category {name!r} has more accepted ({v['accepted']}) than samples ({v['samples']})"
    return None


def _run_categories(run: str, flag: str = "--from-run") -> tuple[str, dict[str, dict[str, Any]]]:
    """An earlier run's generator (run.json's engine.generator; a run made before the choice existed, or a
    folder with no run.json, is inversion) and its summary's per-category samples, accepted and seconds."""
    fs, out = storage.filesystem_for(run)
    path = storage.join(out, "summary.json")
    if not storage.exists(fs, path):
        raise UserError(f"{flag} {run}: no summary.json (not a finished run folder)")
    try:
        summary = json.loads(storage.read_bytes(fs, path))
    except (ValueError, RecursionError):
        raise UserError(f"{flag} {run}: summary.json is not valid JSON") from None
    cats = summary.get("categories") if isinstance(summary, dict) else None
    if not isinstance(cats, dict):
        raise UserError(f"{flag} {run}: summary.json is not a run summary (no 'categories' mapping)")
    for name, v in cats.items():
        problem = _category_counts(name, v)
        if problem:
            raise UserError(f"{flag} {run}: summary.json: {problem}"[:300])
    cats = {k: v for k, v in cats.items() if v["samples"]}
    if not cats:
        raise UserError(f"{flag} {run}: summary.json has no per-category samples and device seconds "
                        "(a run made before cost accounting, or one with no samples)")
    return _generator_of(fs, out), cats


def _generator_of(fs: Any, out: str) -> str:
    path = storage.join(out, "run.json")
    if not storage.exists(fs, path):
        return DEFAULT_GENERATOR
    try:
        run = json.loads(storage.read_bytes(fs, path))
    except (ValueError, RecursionError):
        return DEFAULT_GENERATOR
    config = run.get("config") if isinstance(run, dict) else None
    engine = config.get("engine") if isinstance(config, dict) else None
    generator = engine.get("generator") if isinstance(engine, dict) else None
    return generator if isinstance(generator, str) and generator else DEFAULT_GENERATOR


def _pooled(runs: list[str], cats_of_runs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Rates from the category counts of one or more runs, added up."""
    cats: dict[str, dict[str, float]] = defaultdict(lambda: {"samples": 0, "accepted": 0, "seconds": 0.0})
    for run_cats in cats_of_runs:
        for name, v in run_cats.items():
            for key in cats[name]:
                cats[name][key] += v[key]
    per = {k: (v["accepted"] / v["samples"], v["seconds"] / v["samples"]) for k, v in cats.items()}
    samples = sum(v["samples"] for v in cats.values())
    overall = (sum(v["accepted"] for v in cats.values()) / samples, sum(v["seconds"] for v in cats.values()) / samples)
    return {"source": {"kind": "run", "run": ", ".join(runs), "runs": list(runs)}, "per_category": per,
            "overall": overall}


def rates_from_run(run: str) -> dict[str, Any]:
    """Per-category acceptance rate and seconds per sample of an earlier run (its summary.json)."""
    return _pooled([run], [_run_categories(run)[1]])


def _cascade_split(run: str, flag: str) -> dict[str, dict[str, dict[str, Any]]]:
    """A cascade run's per-generator categories (summary.json's ``generators``), checked as categories are."""
    fs, out = storage.filesystem_for(run)
    summary = json.loads(storage.read_bytes(fs, storage.join(out, "summary.json")))
    gens = summary.get("generators") if isinstance(summary, dict) else None
    if not isinstance(gens, dict) or not gens:
        raise UserError(f"{flag} {run}: a cascade run whose summary.json has no 'generators' split")
    out_cats = {}
    for gen, g in gens.items():
        cats = g.get("categories") if isinstance(g, dict) else None
        for name, v in (cats or {}).items():
            problem = _category_counts(name, v)
            if problem:
                raise UserError(f"{flag} {run}: summary.json: generators.{gen}: {problem}"[:300])
        cats = {k: v for k, v in (cats or {}).items() if v["samples"]}
        if cats:
            out_cats[gen] = cats
    return out_cats


def rates_by_generator(runs: list[str], flag: str = "--from-run") -> dict[str, dict[str, Any]]:
    """Rates per generator from earlier runs; several runs of one generator are pooled. A cascade run counts
    for each of its generators, with the samples each made."""
    grouped: dict[str, list[tuple[str, dict[str, dict[str, Any]]]]] = defaultdict(list)
    for run in runs:
        generator, cats = _run_categories(run, flag)
        if generator == "cascade":
            for gen, gen_cats in _cascade_split(run, flag).items():
                grouped[gen].append((run, gen_cats))
            continue
        grouped[generator].append((run, cats))
    return {g: _pooled([r for r, _ in items], [c for _, c in items]) for g, items in sorted(grouped.items())}


def project_generators(by_generator: dict[str, dict[str, Any]], prompts: dict[str, int], target: int,
                       max_samples: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Per generator and category: the GPU-hours to bring ``prompts[category]`` prompts to ``target``
    accepted images (at most ``max_samples`` attempts each) at that generator's earlier rates; without a
    target, the seconds per accepted image (1 / p attempts of s seconds)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for generator, rates in by_generator.items():
        cats = {}
        for name, n in sorted(prompts.items()):
            p, secs = rates["per_category"].get(name, rates["overall"])
            hours = n * expected_attempts(p, target, max_samples) * secs / 3600 if target else None
            cats[name] = {"prompts": n, "acceptance_rate": round(p, 4), "seconds_per_sample": round(secs, 4),
                          "seconds_per_accepted": round(secs / p, 4) if p > 0 else None,
                          "gpu_hours": round(hours, 4) if hours is not None else None}
        out[generator] = cats
    return out


def compare_generators(rows: list[PromptRow], num_shards: int, cfg: Config,
                       by_generator: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The same prompts and target planned with each generator's earlier rates: GPU-hours side by side."""
    out = {}
    for generator, rates in by_generator.items():
        plan = make_plan(rows, num_shards, cfg, rates)
        out[generator] = {
            "runs": rates["source"]["runs"],
            **{k: plan[k] for k in ("expected_samples", "expected_accepted", "expected_short_prompts", "gpu_hours",
                                    "cost")},
            "categories": {name: {k: c[k] for k in ("acceptance_rate", "seconds_per_sample", "expected_samples",
                                                    "gpu_hours")} for name, c in plan["categories"].items()},
        }
    return out


def exit_fractions(runs: list[str], flag: str = "--from-run") -> dict[str, float]:
    """Per category, the share of its full iterations a monitored earlier run's samples ran (summary.json's
    ``monitor``: iterations run / iterations full, early exits included); categories of runs made without
    monitoring are absent. Several runs are pooled."""
    run_sum: dict[str, float] = defaultdict(float)
    full_sum: dict[str, float] = defaultdict(float)
    for run in runs:
        fs, out = storage.filesystem_for(run)
        path = storage.join(out, "summary.json")
        if not storage.exists(fs, path):
            raise UserError(f"{flag} {run}: no summary.json (not a finished run folder)")
        try:
            monitor = json.loads(storage.read_bytes(fs, path)).get("monitor") or {}
        except ValueError:
            raise UserError(f"{flag} {run}: summary.json is not valid JSON") from None
        for name, c in (monitor.get("categories") or {}).items():
            run_sum[name] += c.get("iterations_run", 0)
            full_sum[name] += c.get("iterations_full", 0)
    return {name: run_sum[name] / full_sum[name] for name in full_sum if full_sum[name] > 0}


def rates_from_floor(cfg: Config, rows: list[PromptRow] | None = None,
                     exits: dict[str, float] | None = None) -> dict[str, Any]:
    """Seconds per sample from the FLOP floor, per category of ``rows``: its zoo referees, its scorer, the
    monitor's checks and, with ``exits`` (``exit_fractions``), the iterations early exit leaves out."""
    c = cfg.cost
    floor = floor_per_image(cfg, c.plan_tflops, c.plan_efficiency)
    per_category, flops = {}, {}
    for name in sorted({category_of(r.category) for r in rows or [] if r.status == STATUS_OK}):
        category = None if name == NO_CATEGORY else name
        f = floor_per_image(cfg, c.plan_tflops, c.plan_efficiency, category, _joint_iterations(cfg, exits, name))
        per_category[name] = (c.plan_acceptance_rate, f["seconds_per_image"])
        flops[name] = f["flops_per_image"]
    used = sorted(set(exits or {}) & set(per_category))
    source = {
        "kind": "flop_floor", **floor, "acceptance_rate": c.plan_acceptance_rate, "flops_per_image_by_category": flops,
        "exit_fractions": {k: round((exits or {})[k], 4) for k in used},
        "note": (f"FLOP floor of one image at the real model sizes ({floor['flops_per_image'] / 1e15:.2f} PFLOP) "
                 f"at {c.plan_tflops:g} TFLOP/s x efficiency {c.plan_efficiency:g}; acceptance rate "
                 f"{c.plan_acceptance_rate:g} assumed (no --from-run)"
                 + (f"; early exit as measured in --from-run for {', '.join(used)}" if used else "")),
    }
    overall = (c.plan_acceptance_rate, floor["seconds_per_image"])
    return {"source": source, "per_category": per_category, "overall": overall}


def _joint_iterations(cfg: Config, exits: dict[str, float] | None, name: str) -> float | None:
    """Mean referee iterations per sample when early exit ran a fraction of a sample's iterations (the SDS tail
    is always run); None: all of them."""
    if not exits or name not in exits or not cfg.monitor.enabled or not cfg.monitor.early_exit:
        return None
    full = cfg.optim.iterations + cfg.optim.tail_iterations
    return max(1.0, exits[name] * full - cfg.optim.tail_iterations)


def _category_plan(rows: list[PromptRow], p: float, secs: float, cfg: Config) -> dict[str, Any]:
    k, m = cfg.job.target_accepted, cfg.job.max_samples_per_prompt
    n = len(rows)
    if k:
        samples, accepted = n * expected_attempts(p, k, m), n * expected_accepted(p, k, m)
        short = n * short_probability(p, k, m)
    else:
        samples = float(sum(r.num_samples for r in rows))
        accepted, short = p * samples, 0.0
    hours = samples * secs / 3600
    price = cfg.cost.gpu_hour_price
    return {
        "prompts": n, "acceptance_rate": round(p, 4), "seconds_per_sample": round(secs, 4),
        "expected_samples": round(samples, 1), "expected_accepted": round(accepted, 1),
        "expected_short_prompts": round(short, 1), "gpu_hours": round(hours, 4),
        "cost": round(hours * price, 2) if price > 0 else None,
    }


def with_cascade(plan: dict[str, Any], cfg: Config, rows: list[PromptRow],
                 by_generator: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A cascade's plan: ``make_plan``'s frame with the cascade's expectations (``cascade_plan``) as its
    per-category rows and totals, the stages' details under ``cascade``."""
    c = cascade_plan(cfg, rows, by_generator)
    price = cfg.cost.gpu_hour_price
    for name, cat in c["categories"].items():
        samples = sum(s["expected_samples"] for s in cat["stages"])
        accepted = sum(s["expected_accepted"] for s in cat["stages"])
        hours = cat["gpu_hours"]
        plan["categories"][name] = {
            "prompts": cat["prompts"], "acceptance_rate": round(accepted / samples, 4) if samples else 0.0,
            "seconds_per_sample": round(hours * 3600 / samples, 4) if samples else 0.0,
            "expected_samples": round(samples, 1), "expected_accepted": round(accepted, 1),
            "expected_short_prompts": round(cat["expected_short_prompts"], 1), "gpu_hours": round(hours, 4),
            "cost": round(hours * price, 2) if price > 0 else None,
        }
    for key in ("expected_samples", "expected_accepted", "expected_short_prompts", "gpu_hours"):
        plan[key] = round(c[key], 4)
    plan["cost"] = round(c["gpu_hours"] * price, 2) if price > 0 else None
    plan["max_samples_per_prompt"] = sum(s.max_samples for s in cfg.cascade.stages)
    runs = sorted({r for g in by_generator.values() for r in g["source"]["runs"]})
    plan["source"] = ({"kind": "run", "run": ", ".join(runs), "runs": runs} if runs else
                      {"kind": "flop_floor", "note": "FLOP floor of each stage's generator; acceptance rate "
                       f"{cfg.cost.plan_acceptance_rate:g} assumed for both (no --from-run)"})
    plan["cascade"] = c
    return plan


def make_plan(rows: list[PromptRow], num_shards: int, cfg: Config, rates: dict[str, Any]) -> dict[str, Any]:
    by_cat: dict[str, list[PromptRow]] = defaultdict(list)
    for r in rows:
        if r.status == STATUS_OK:
            by_cat[category_of(r.category)].append(r)
    cats = {}
    for name, members in sorted(by_cat.items()):
        p, secs = rates["per_category"].get(name, rates["overall"])
        cats[name] = _category_plan(members, p, secs, cfg)
    total = {key: round(sum(c[key] for c in cats.values()), 4)
             for key in ("expected_samples", "expected_accepted", "expected_short_prompts", "gpu_hours")}
    price = cfg.cost.gpu_hour_price
    target = cfg.job.target_accepted
    return {
        "prompts": len(rows), "valid_prompts": sum(len(v) for v in by_cat.values()),
        "invalid_rows": sum(r.status != STATUS_OK for r in rows), "shards": num_shards,
        "shard_size": cfg.job.shard_size, "target_accepted": target or None,
        "max_samples_per_prompt": cfg.job.max_samples_per_prompt if target else None,
        "samples_per_prompt": None if target else cfg.job.samples_per_prompt,
        "source": rates["source"], **total, "gpu_hour_price": price or None,
        "cost": round(total["gpu_hours"] * price, 2) if price > 0 else None, "categories": cats,
    }


def format_plan(plan: dict[str, Any]) -> str:
    target = plan["target_accepted"]
    head = (f"plan: {plan['valid_prompts']} prompts ({plan['invalid_rows']} invalid rows), {plan['shards']} shards; "
            + (f"target {target} accepted per prompt, at most {plan['max_samples_per_prompt']} samples"
               if target else f"{plan['samples_per_prompt']} samples per prompt"))
    src = plan["source"]
    lines = [head, "from: " + (f"run {src['run']}" if src["kind"] == "run" else src["note"])]
    lines += _category_table(plan["categories"])
    total = (f"total: {plan['expected_samples']:.1f} samples, {plan['expected_accepted']:.1f} accepted, "
             f"{plan['expected_short_prompts']:.1f} prompts short, {plan['gpu_hours']:.3f} GPU-hours")
    if plan["cost"] is not None:
        total += f", cost {plan['cost']:.2f} at {plan['gpu_hour_price']:g} per GPU-hour"
    lines.append(total)
    lines += _generator_lines(plan.get("generators") or {})
    if plan.get("cascade"):
        lines += format_cascade(plan["cascade"])
    return "\n".join(lines)


_PLAN_COLUMNS = (  # (header, key, format): widths follow the widest cell, so large counts never run together
    ("prompts", "prompts", "d"), ("acc.rate", "acceptance_rate", ".3f"), ("s/sample", "seconds_per_sample", ".2f"),
    ("samples", "expected_samples", ".1f"), ("accepted", "expected_accepted", ".1f"),
    ("short", "expected_short_prompts", ".1f"), ("GPU-h", "gpu_hours", ".3f"),
)


def _category_table(categories: dict[str, dict[str, Any]]) -> list[str]:
    cells = {name: [format(c[key], fmt) for _, key, fmt in _PLAN_COLUMNS] for name, c in categories.items()}
    widths = [max([len(head), *(len(row[i]) for row in cells.values())]) + 2
              for i, (head, _, _) in enumerate(_PLAN_COLUMNS)]
    lines = [f"{'category':<16}" + "".join(f"{head:>{w}}" for (head, _, _), w in zip(_PLAN_COLUMNS, widths))]
    for name, row in cells.items():
        lines.append(f"{name[:15]:<16}" + "".join(f"{v:>{w}}" for v, w in zip(row, widths)))
    return lines


def _generator_lines(generators: dict[str, Any]) -> list[str]:
    """The same plan with each earlier run's generator: GPU-hours for the same prompts and target."""
    if not generators:
        return []
    names = list(generators)
    cats = sorted({c for g in generators.values() for c in g["categories"]})
    rows = {cat: ["n/a" if v is None else format(v, ".3f") for v in
                  (generators[n]["categories"].get(cat, {}).get("gpu_hours") for n in names)] for cat in cats}
    rows["total"] = [format(generators[n]["gpu_hours"], ".3f") for n in names]
    widths = [max(14, len(n[:13]) + 1, *(len(r[i]) + 2 for r in rows.values())) for i, n in enumerate(names)]
    lines = ["generators, same prompts and target, from their earlier runs (GPU-hours):",
             f"{'category':<16}" + "".join(f"{n[:13]:>{w}}" for n, w in zip(names, widths))]
    for cat, cells in rows.items():
        lines.append(f"{cat[:15]:<16}" + "".join(f"{v:>{w}}" for v, w in zip(cells, widths)))
    if len(names) > 1:
        best = min(names, key=lambda n: generators[n]["gpu_hours"])
        lines.append(f"cheapest for this target: {best}")
    return lines
